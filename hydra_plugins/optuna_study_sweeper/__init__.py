"""A Hydra sweeper on current Optuna (`hydra/sweeper=optuna_study`) whose studies can be shared
by many sweeper processes and whose trials can be pruned from inside the job.

Each trial is asked from the study (`study.ask` with the search space of `hydra.sweeper.params`
and any sweep overrides on the command line), launched as a Hydra job with `optuna_trial_id`
set, and told the job's return value; a job its pruner stopped (`src.fitting.optuna_trials`) is told
PRUNED, a failed one FAIL. With `storage` pointing at a database every process reaches
(`postgresql://…`) and a fixed `study_name`, every process started with the same command joins
the same study (`load_if_exists`) and runs `n_trials` of it; the storage hands out each trial
once. Without `storage` the study lives in `<sweep dir>/optuna.db`.

Hydra only loads plugins from the `hydra_plugins` package, hence this folder; the job side is
`src/fitting/optuna_trials.py`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def distribution(key: str, sweep: Any):
    """The Optuna distribution of one Hydra sweep value: choice(...) / a,b,c, range(...), interval(...)
    (floats, or ints when both ends are ints; `tag(log, ...)` for a log scale)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution(list(sweep.list))
    if isinstance(sweep, RangeSweep):
        values = list(range(int(sweep.start), int(sweep.stop), int(sweep.step or 1)))
        return CategoricalDistribution(values)
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log_scale)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise ValueError(f"hydra.sweeper.params.{key}: {sweep!r} is no choice, range or interval")


def make_sampler(cfg: DictConfig, shared: bool):
    import optuna

    cfg = OmegaConf.to_container(cfg or {}, resolve=True)
    name = cfg.pop("name", "tpe")
    if shared and cfg.get("seed") is not None:  # one seed would make every worker ask the same trials
        log.info("study shared through its storage: each worker samples with its own random state")
        cfg["seed"] = None
    classes = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    if name not in classes:
        raise ValueError(f"hydra.sweeper.sampler.name={name!r}: choose one of {', '.join(classes)}")
    return classes[name](**cfg)


class OptunaStudySweeper(Sweeper):
    def __init__(
        self,
        study_name: str,
        direction: str = "maximize",
        storage: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        sampler: DictConfig | None = None,
        pruner: DictConfig | None = None,
        params: DictConfig | None = None,
    ) -> None:
        self.study_name, self.direction, self.storage = study_name, direction, storage
        self.n_trials, self.n_jobs = int(n_trials), max(int(n_jobs), 1)
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.params = dict(params or {})
        self.job_idx = 0

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _join_study(self, storage: str):
        """Create the study, or load it when another worker did; workers that start together on
        an empty database race to create Optuna's tables, so the loser retries."""
        import optuna
        from sqlalchemy.exc import SQLAlchemyError

        from src.fitting.optuna_trials import make_pruner

        for attempt in range(5):
            try:
                return optuna.create_study(
                    study_name=self.study_name,
                    storage=storage,
                    sampler=make_sampler(self.sampler_cfg, shared=self.storage is not None),
                    pruner=make_pruner(self.pruner_cfg),
                    direction=self.direction,
                    load_if_exists=True,
                )
            except SQLAlchemyError as err:
                if attempt == 4:
                    raise
                log.info("study %s not ready (%s); retrying", self.study_name, type(err).__name__)
                time.sleep(1 + attempt)

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        from src.config.checks import refuse_credentials
        from src.fitting.optuna_trials import PRUNED_ATTR, TRIAL_KEY, storage_url

        parser = OverridesParser.create()
        space = {
            k: distribution(k, parser.parse_override(f"{k}={v}").value()) for k, v in self.params.items()
        }
        fixed = []
        for override in parser.parse_overrides(arguments):
            if override.is_sweep_override():
                space[override.get_key_element()] = distribution(override.get_key_element(), override.value())
            else:
                fixed.append(override.input_line)
        # a password in the storage URL would land in every job's logged overrides and config
        refuse_credentials("hydra.sweeper.storage", self.config.hydra.sweeper.get("storage"))
        storage = storage_url(self.config.hydra.sweeper, self.config.hydra.sweep.dir)
        os.makedirs(self.config.hydra.sweep.dir, exist_ok=True)
        try:
            study = self._join_study(storage)
        except Exception as err:
            from src.tracking.sweep import fail_sweep

            fail_sweep(Path(self.config.hydra.sweep.dir), err)
            raise
        log.info("study %s in %s: %d trials of %s", self.study_name, storage.split("@")[-1], self.n_trials,
                 ", ".join(space))  # fmt: skip
        done = 0
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch: list[Sequence[str]] = [
                [*fixed, *(f"{k}={v}" for k, v in t.params.items()), f"+{TRIAL_KEY}={t._trial_id}"]
                for t in trials
            ]
            returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            finished = {t.number: t for t in study.get_trials(deepcopy=False)}
            for trial, result in zip(trials, returns):
                attrs = finished[trial.number].user_attrs
                try:
                    value = float(result.return_value)
                except Exception:  # noqa: BLE001 - a job that raised has no value
                    value = math.nan
                if PRUNED_ATTR in attrs:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                elif math.isnan(value):
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, value)
            done += len(trials)
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        log.info(
            "study %s: %s", self.study_name, ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
        )
        best = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        if best:
            log.info("best so far: %s = %s, %s", study.best_trial.number, study.best_value, study.best_params)
