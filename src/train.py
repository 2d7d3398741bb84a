"""Run the pipeline in one process for a Hydra-composed config, or a sweep of such jobs:

    python -m src.train                                        # defaults
    python -m src.train experiment=ci head.dropout=0.3         # a preset plus overrides
    python -m src.train -m experiment=ci finetune.layers=0,2,4 # a Hydra multirun, one job per value
    python -m src.train -m experiment=ci finetune.layers=0,2 hydra/launcher=joblib  # parallel jobs
    python -m src.train -m experiment=ci hparams_search=finetune_optuna            # Optuna, pruned
    python -m src.train -m experiment=ci finetune.layers=0,2,4 hydra/launcher=ray   # jobs as Ray tasks

Unlike `dvc repro`, this reads `conf/` directly (not params.yaml) and runs outside DVC, so
DVC's cache does not serve it: prepared data and features are reused whenever their inputs
match through `src.stages.reuse`, so a sweep over head and fine-tune keys extracts features once.
It never reads or writes what `dvc repro` owns, which a concurrent `dvc repro` may replace
mid-run: prepared data and features are read only from `<paths.cache>/<stage>/<key>/` (what
`dvc repro` or `dvc pull` left in `data/prepared` and `data/features` is snapshotted there when
its key matches), the raw data goes to `<paths.cache>/raw/<digest>` (`reuse.raw_dir`), and
every job, single run or multirun, writes its models and reports to its own Hydra output
folder. In a multirun each job logs a child run under the sweep's MLflow parent run
(`src.tracking.sweep`); a failing job is recorded as FAILED and the sweep goes on. The job
returns the final model's validation accuracy, which Hydra sweepers such as Optuna maximise.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from src.config.checks import validate
from src.config.compose import resolve
from src.errors import ConfigError, StageError
from src.fitting import optuna_trials
from src.outputs import console
from src.stages import download, evaluate, extract, finetune, prepare, reuse, stage, train_head
from src.tracking import sweep

log = logging.getLogger(__name__)
# conf/hydra/launcher/ray.yaml takes the place of the Ray launcher's config of the same name, so
# Hydra checks it against that config's schema: wanted here, not worth a warning on every sweep
warnings.filterwarnings("ignore", message=".*validated against ConfigStore schema", category=UserWarning)

STAGES: list[tuple[str, Callable[[DictConfig], dict]]] = [
    ("download", download.run),
    ("prepare", prepare.run),
    ("extract", extract.run),
    ("train_head", train_head.run),
    ("finetune", finetune.run),
    ("evaluate", evaluate.run),
]


def _reusing(name: str, run: Callable[[DictConfig], dict]) -> Callable[[DictConfig], dict]:
    return lambda cfg: reuse.reuse_or_run(cfg, name, run)


def train(cfg: DictConfig) -> dict[str, dict]:
    """Validate `cfg`, run all stages in order (reusing matching prepared data and features),
    return each stage's summary.

    The raw data goes to `reuse.raw_dir(cfg)`, never to `paths.raw`; prepared data and features
    are read from the cache only (`reuse.reuse_or_run`), which points `cfg.paths.prepared` and
    `cfg.paths.features` there for the later stages. `paths.models` and `paths.reports` are
    used as given (`main` points them at the Hydra output folder)."""
    resolve(cfg)  # the derived `inputs` (and the checks their resolver runs) once, now
    validate(cfg)
    with open_dict(cfg):
        cfg.paths.raw = str(reuse.raw_dir(cfg))
    results = {}
    # one job at a time fetches the source and finds or builds its prepared data
    with reuse.lock(reuse.cache_dir(cfg) / "download.lock"):
        results["download"] = stage.timed_run("download", download.run, cfg)
        results["prepare"] = stage.timed_run("prepare", _reusing("prepare", prepare.run), cfg)
    results["extract"] = stage.timed_run("extract", _reusing("extract", extract.run), cfg)
    for name, run in STAGES[3:]:
        results[name] = stage.timed_run(name, run, cfg)
    return results


def validation_accuracy(results: dict[str, dict]) -> float:
    """The final model's validation accuracy (what sweepers maximise); NaN if none was measured."""
    return float((results["evaluate"].get("val") or {}).get("accuracy", math.nan))


def _job_folders(cfg: DictConfig, output_dir: Path) -> None:
    """A job (single run or one of a multirun) keeps its models and reports in its own Hydra
    output folder, never in `paths.models` / `paths.reports`, which `dvc repro` owns."""
    with open_dict(cfg):
        cfg.paths.models = str(output_dir / "models")
        cfg.paths.reports = str(output_dir / "reports")


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    console.quiet_libraries()  # Hydra set up logging (conf/config.yaml: hydra.job_logging)
    console.start_tensorflow()
    hydra_cfg = HydraConfig.get()
    _job_folders(cfg, Path(hydra_cfg.runtime.output_dir))
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            results = train(cfg)
        except (ConfigError, StageError) as err:
            log.error("%s", err)
            sys.exit(2 if isinstance(err, ConfigError) else 1)
        return validation_accuracy(results)

    parent = sweep.parent_of(Path(hydra_cfg.sweep.dir))
    overrides = list(hydra_cfg.overrides.task)
    run_id = None
    try:
        if parent is not None:
            run_id = sweep.start_child(cfg, parent, overrides, hydra_cfg.job.num)
            with open_dict(cfg):
                cfg.tracking.run_id = run_id
        results = train(cfg)
    except Exception as err:  # one failing job must not end the sweep
        if optuna_trials.is_pruned(err):
            log.info("job %d: %s", hydra_cfg.job.num, err)
            if parent is not None and run_id is not None:
                sweep.mark_pruned(parent, run_id, str(err))
            return math.nan
        log.error("job %d (%s) failed: %s", hydra_cfg.job.num, " ".join(overrides), err)
        if parent is not None and run_id is not None:
            sweep.mark_failed(parent, run_id, err)
        return math.nan
    accuracy = validation_accuracy(results)
    log.info("job %d: val accuracy %.4f", hydra_cfg.job.num, accuracy)
    return accuracy


if __name__ == "__main__":
    main()
