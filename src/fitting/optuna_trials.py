"""Optuna trials inside sweep jobs: the study a job belongs to, and a Keras callback that reports
each epoch's validation accuracy to the job's trial and stops the job when the study's pruner
says the trial is losing.

The sweeper (`hydra/sweeper=optuna_study`, `hydra_plugins/optuna_study_sweeper`) asks the study
for a trial, passes its id to the job as `optuna_trial_id`, and tells the study the job's result
(or that it was pruned). Study and trials live in an Optuna RDB storage that every job can reach:
`hydra.sweeper.storage` (e.g. `postgresql://…`, shared by several sweeper processes), else an
SQLite file in the sweep folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from src.config.schema import OPTUNA_TRIAL_KEY

log = logging.getLogger(__name__)

TRIAL_KEY = OPTUNA_TRIAL_KEY  # the config key the sweeper sets in each job
PRUNED_ATTR = "pruned_at_epoch"  # trial user attribute the job sets when it stops itself


def storage_url(sweeper: DictConfig, sweep_dir: str | Path) -> str:
    """The study's storage: `hydra.sweeper.storage`, else `<sweep dir>/optuna.db`."""
    return sweeper.get("storage") or f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"


def make_pruner(cfg: DictConfig | None):
    """The pruner `hydra.sweeper.pruner` describes: `name` (median | threshold | none) and its arguments."""
    import optuna

    cfg = OmegaConf.to_container(cfg or {"name": "none"}, resolve=True)
    name = cfg.pop("name", "median")
    classes = {
        "median": optuna.pruners.MedianPruner,
        "threshold": optuna.pruners.ThresholdPruner,
        "none": optuna.pruners.NopPruner,
    }
    if name not in classes:
        raise ValueError(f"hydra.sweeper.pruner.name={name!r}: choose one of {', '.join(classes)}")
    return classes[name](**cfg)


def job_trial(cfg: DictConfig):
    """The Optuna trial this Hydra job runs, or None outside an `optuna_study` sweep."""
    if cfg.get(TRIAL_KEY) is None:
        return None
    import optuna
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    study = optuna.load_study(  # with the sweeper's pruner: the job asks it whether to stop
        study_name=hydra_cfg.sweeper.study_name,
        storage=storage_url(hydra_cfg.sweeper, hydra_cfg.sweep.dir),
        pruner=make_pruner(hydra_cfg.sweeper.get("pruner")),
    )
    return optuna.trial.Trial(study, int(cfg[TRIAL_KEY]))


def pruning_callback(trial, phase: str, monitor: str = "val_accuracy"):
    """A Keras callback reporting `monitor` after each epoch to `trial` (steps count on across
    the head's and the fine-tuning's epochs) and raising `optuna.TrialPruned` when the study's
    pruner stops the trial; None without a trial."""
    if trial is None:
        return None
    import keras
    import optuna

    mine = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    first_step = max(mine.intermediate_values, default=0)  # the head's epochs, when fine-tuning

    class Pruning(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if not logs or monitor not in logs:
                return
            step = first_step + epoch + 1
            trial.report(float(logs[monitor]), step)
            if trial.should_prune():
                trial.set_user_attr(PRUNED_ATTR, step)
                value = float(logs[monitor])
                message = (
                    f"trial {trial.number} pruned after {phase} epoch {epoch + 1}: {monitor} {value:.4f}"
                )
                log.info("%s", message)
                raise optuna.TrialPruned(message)

    return Pruning()


def is_pruned(err: BaseException) -> bool:
    """Whether `err` is Optuna's `TrialPruned` (checked without importing Optuna)."""
    kind = type(err)
    return kind.__name__ == "TrialPruned" and kind.__module__.startswith("optuna")
