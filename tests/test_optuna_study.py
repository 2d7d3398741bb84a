"""`hparams_search=finetune_optuna` on the project's Optuna sweeper: two worker processes started
with the same command share one study in a real PostgreSQL, and trials that lose are pruned from
inside the job by a Keras callback, recorded as such in Optuna and MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from src.config.paths import REPO_ROOT
from src.tracking import sweep
from tests.conftest import SHARED, free_port, local_postgres, path_overrides, require_shared
from tests.test_sweep import children

pytestmark = pytest.mark.slow


def sweep_command(tmp_path: Path, name: str, *overrides: str) -> list[str]:
    """A 'ci' preset Optuna sweep with its own sweep folder and MLflow store, sharing the cache."""
    return [
        sys.executable, "-m", "src.train", "-m", "experiment=ci", "hparams_search=finetune_optuna",
        f"dataset.path={SHARED / 'data' / 'cats_vs_dogs'}",
        f"model.weights={SHARED / 'weights' / 'vgg16_imagenet_notop.weights.h5'}",
        f"tracking.uri=sqlite:///{tmp_path / f'{name}.db'}",
        f"hydra.sweep.dir={tmp_path / name}",
        *path_overrides(tmp_path / "work"),
        "hydra.sweeper.n_trials=2", "head.epochs=3",
        *overrides,
    ]  # fmt: skip


def child_runs(tmp_path: Path, name: str):
    parent = sweep.parent_of(tmp_path / name)
    assert parent is not None
    return children(MlflowClient(parent["tracking_uri"]), parent)


@pytest.fixture
def postgres():
    with local_postgres() as uri:
        yield uri


def test_two_workers_share_one_study_in_postgres(tmp_path, postgres):
    import optuna

    require_shared()
    shared = [f"hydra.sweeper.storage={postgres}", "hydra.sweeper.study_name=shared",
              "hydra.sweeper.pruner.name=none", "~hydra.sweeper.pruner.n_startup_trials",
              "~hydra.sweeper.pruner.n_warmup_steps"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    workers = [
        subprocess.Popen(
            sweep_command(tmp_path, f"worker{i}", *shared),
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=1200)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    study = optuna.load_study(study_name="shared", storage=postgres)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4  # no trial run twice
    runs = [r for name in ("worker0", "worker1") for r in child_runs(tmp_path, name)]
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(int(r.data.params["optuna_trial_id"]) for r in runs) == sorted(t._trial_id for t in trials)
    by_id = {t._trial_id: t for t in trials}
    for run in runs:  # each child run holds its trial's value
        trial = by_id[int(run.data.params["optuna_trial_id"])]
        assert run.data.metrics["val.accuracy"] == pytest.approx(trial.value, abs=1e-6)


def test_a_losing_trial_is_pruned_inside_the_job_and_recorded_as_pruned(tmp_path):
    import optuna

    require_shared()
    # no validation accuracy reaches 1.01: the pruner stops every trial after its first epoch
    pruner = ["hydra.sweeper.pruner.name=threshold", "+hydra.sweeper.pruner.lower=1.01",
              "hydra.sweeper.pruner.n_warmup_steps=0", "~hydra.sweeper.pruner.n_startup_trials"]  # fmt: skip
    done = subprocess.run(sweep_command(tmp_path, "pruned", *pruner), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]  # pruned is no failure
    study = optuna.load_study(study_name="finetune", storage=f"sqlite:///{tmp_path / 'pruned' / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [1] and t.user_attrs["pruned_at_epoch"] == 1 for t in trials)
    runs = child_runs(tmp_path, "pruned")
    assert {r.info.status for r in runs} == {"KILLED"}
    assert {r.data.tags["optuna.state"] for r in runs} == {"PRUNED"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'pruned.db'}")
    for run in runs:  # the epoch it ran is in MLflow, and nothing after it
        assert [m.step for m in client.get_metric_history(run.info.run_id, "head.val_accuracy")] == [1]
        assert "test.accuracy" not in run.data.metrics


def test_an_unreachable_storage_ends_the_sweep_and_its_parent_run_failed(tmp_path):
    """Nothing listens on the storage's port: the sweep stops before any job, and its MLflow
    parent run is FAILED with the reason, not RUNNING for good."""
    require_shared()
    unreachable = [f"hydra.sweeper.storage=postgresql://optuna@127.0.0.1:{free_port()}/optuna"]
    command = sweep_command(tmp_path, "offline", *unreachable)
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    parent = sweep.parent_of(tmp_path / "offline")
    assert parent is not None
    run = MlflowClient(parent["tracking_uri"]).get_run(parent["run_id"])
    assert run.info.status == "FAILED" and "OperationalError" in run.data.tags["error"]
    assert not children(MlflowClient(parent["tracking_uri"]), parent)
