"""What every stage shares: the keys it reads, the entry point (load params.yaml, validate, run,
summarise), and the timed run that writes its summary.

Each stage module declares what it reads on its `run` (`@stage.reads("dataset", "paths.raw")`)
and ends with `if __name__ == "__main__": stage.main("<name>", run)`."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from src.config.checks import remote_credentials, validate
from src.config.compose import load_params
from src.config.paths import resolve_path
from src.config.schema import RUN_NODE, RUNTIME_KEYS
from src.errors import ConfigError, StageError
from src.outputs import console, folders, running
from src.outputs.atomic import write_json
from src.outputs.folders import clean_stale

log = logging.getLogger(__name__)

StageRun = Callable[[DictConfig], dict]
Identity = Callable[[DictConfig], dict]
_ABSENT = object()


def view(cfg: DictConfig, keys: tuple[str, ...], identity: Identity | None = None) -> DictConfig:
    """The part of `cfg` a stage reads: only `keys` (dotted; a section brings all its keys), plus,
    for a stage that logs to MLflow, the pipeline run's `identity(cfg)` computed from the whole
    config. Read-only; reading any other key raises. A view of a view works."""
    data: dict = {}
    for key in (*keys, *(k for k in RUNTIME_KEYS if k in cfg)):
        value = OmegaConf.select(cfg, key, throw_on_missing=True, default=_ABSENT)
        if value is _ABSENT:
            raise ConfigError(f"{key}: the stage reads it, but the config has no such key")
        node: dict = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    if identity is not None:
        data[RUN_NODE] = identity(cfg)
    sliced = OmegaConf.create(data)
    OmegaConf.set_struct(sliced, True)
    OmegaConf.set_readonly(sliced, True)
    return sliced


def reads(
    *keys: str, logged: tuple[str, ...] = (), identity: Identity | None = None
) -> Callable[[StageRun], StageRun]:
    """Declare the config keys a stage's `run` reads: it is then called with `view(cfg, ...)`
    whatever it is given, so it cannot read anything else. `logged` keys are read only to log
    epochs as they end (they change no output, so dvc.yaml need not list them); `identity`
    names the pipeline run the stage logs to (`src.tracking.store.run_identity`). `run.reads`
    and `run.logged` say what was declared (tests/test_dvc_deps.py checks dvc.yaml's params
    against them)."""

    def declare(run: StageRun) -> StageRun:
        @functools.wraps(run)
        def run_on_view(cfg: DictConfig) -> dict:
            return run(view(cfg, (*keys, *logged), identity))

        run_on_view.reads = keys  # type: ignore[attr-defined]
        run_on_view.logged = logged  # type: ignore[attr-defined]
        return run_on_view

    return declare


def summary_path(cfg: DictConfig, name: str) -> Path:
    """Where a stage's summary (counts, timings) goes: `reports/<stage>.json`."""
    return resolve_path(cfg.paths.reports) / f"{name}.json"


def read_summary(cfg: DictConfig, name: str) -> dict:
    """A stage's last summary (`summary_path`), or {} when it has not run."""
    path = summary_path(cfg, name)
    return json.loads(path.read_text()) if path.is_file() else {}


def clean_outputs(cfg: DictConfig) -> list[Path]:
    """Remove what killed runs left beside the outputs (see `clean_stale`); returns what went."""
    from src.config.checks import OUTPUT_KEYS

    parents = {resolve_path(cfg.paths[key]).parent for key in OUTPUT_KEYS if key in cfg.paths}
    parents.add(resolve_path(cfg.paths.models))
    parents |= {resolve_path(cfg.paths.cache) / name for name in ("prepare", "extract")}
    return [path for folder in sorted(parents) for path in clean_stale(folder)]


def recover(cfg: DictConfig, marks: Path = running.RUNNING_DIR, clean: bool = True) -> dict:
    """Finish what killed stage processes left (their marks, see `src.outputs.running`): their
    MLflow runs ended as the stage would have ended them (`finish_crashed_runs`), their temp
    folders removed (unless `clean` is off: `main` leaves that to `timed_run`, which does it
    next), their marks cleared. Marks of stages still running are left alone."""
    left = running.left_behind(marks)
    runs = [run_id for _, entry in left for run_id in entry.get("runs", [])]
    finished = {}
    if runs and cfg.tracking.enabled:
        from src.tracking import pipeline_run

        finished = pipeline_run.finish_crashed_runs(cfg, runs)
    removed = clean_outputs(cfg) if clean else []
    for path, _ in left:
        path.unlink(missing_ok=True)
    stages = [entry["stage"] for _, entry in left]
    if stages:
        log.info("finished what %d killed stage(s) left: %s", len(stages), ", ".join(stages))
    return {"killed_stages": stages, "runs": finished, "removed": [str(p) for p in removed]}


def timed_run(name: str, run: Callable[[DictConfig], dict], cfg: DictConfig) -> dict:
    """Run a stage, add its wall time, write its summary JSON and return it. Temp folders left
    by killed runs are removed first."""
    clean_outputs(cfg)
    declared = getattr(run, "reads", None)  # a stage's `@reads`; None for a wrapper of one
    for key in ("reports", "models"):  # marked as the pipeline's when it makes them
        if key == "reports" or declared is None or f"paths.{key}" in declared:
            folders.claim(resolve_path(cfg.paths[key]))
    start = time.perf_counter()
    result = run(cfg)
    result["seconds"] = round(time.perf_counter() - start, 2)
    write_json(summary_path(cfg, name), result)
    log.info("%s done in %.1f s", name, result["seconds"])
    return result


def usage(name: str) -> str:
    """What `python -m src.stages.<name> --help` prints: how it is run, then what the stage reads
    and writes (its module's docstring)."""
    module = sys.modules.get(f"src.stages.{name}") or sys.modules.get("__main__")
    about = (getattr(module, "__doc__", None) or "").strip()
    return (
        f"usage: python -m src.stages.{name}\n\n"
        "Runs one pipeline stage on the parameters in params.yaml; `dvc repro` runs every stage in\n"
        "order. It takes no arguments: set parameters with `python -m src.params key=value ...` or\n"
        "`dvc exp run -S key=value`.\n\n"
        f"{about}\n"
    )


def main(
    name: str, run: Callable[[DictConfig], dict], summary: bool = True, tensorflow: bool = False
) -> None:
    """Entry point of `python -m src.stages.<stage>`: `--help` prints `usage` and touches
    nothing; otherwise it finishes what killed stages left, then runs the stage marked as
    running (`timed_run`, or `run` alone for a stage without a summary). A stage that runs
    TensorFlow (`tensorflow`) starts it first, its start-up notices filtered out. Exits 2 on
    arguments or a bad config, 1 on a stage error."""
    arguments = sys.argv[1:]
    if any(a in ("-h", "--help") for a in arguments):
        print(usage(name), end="")
        sys.exit(0)
    if arguments:
        print(usage(name).split("\n\n")[0], file=sys.stderr)
        print(f"error: unexpected arguments {' '.join(arguments)}: see --help", file=sys.stderr)
        sys.exit(2)
    console.setup_logging()
    try:
        cfg = validate(load_params())
        remote_credentials()  # before a stage's outputs can be pushed with them
        if not summary:
            run(cfg)
            return
        recover(cfg, clean=False)  # timed_run removes the temp folders next
        if tensorflow:
            console.start_tensorflow()
        with running.marked(name):
            timed_run(name, run, cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
