"""A stage killed with kill -9 leaves its mark in `.pipeline/running/`; the next run finishes
what it left: its MLflow run ends as the stage would have ended it (the registered version gets
its alias), its temp folders go, also when `dvc repro` restores every stage from the run-cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.outputs import running
from src.stages import stage
from src.tracking import store
from tests.test_dvc_pipeline import CI, copy_repo, ran_stages, sh
from tests.test_tracking_keys import scratch_cfg


def dead_pid() -> int:
    """The id of a process that has ended."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def write_mark(folder: Path, stage_name: str, pid: int, runs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stage_name}-{pid}.json"
    path.write_text(json.dumps({"stage": stage_name, "pid": pid, "started": time.time(), "runs": runs}))
    return path


def test_marks_are_removed_when_the_stage_ends_and_note_its_runs(tmp_path):
    with running.marked("evaluate", tmp_path) as mark:
        running.note_run("abc")
        running.note_run("abc")
        assert json.loads(mark.read_text())["runs"] == ["abc"]
        assert running.left_behind(tmp_path) == []  # this process runs
    assert not mark.exists()
    with pytest.raises(RuntimeError), running.marked("prepare", tmp_path) as mark:
        raise RuntimeError("a stage error ends the stage too")
    assert not mark.exists()
    left = write_mark(tmp_path, "extract", dead_pid(), [])
    (tmp_path / "broken.json").write_text("{")
    assert [path for path, _ in running.left_behind(tmp_path)] == [tmp_path / "broken.json", left]


def test_recover_ends_the_runs_of_killed_stages_and_leaves_live_ones(tmp_path):
    import mlflow

    cfg = scratch_cfg(tmp_path, "tracking.registered_model=tiny-classifier")
    experiment_id = store.use_store(cfg)
    client = mlflow.MlflowClient()
    trained = client.create_run(experiment_id).info.run_id  # a killed train_head logged epochs into it
    registered = client.create_run(experiment_id, tags={"dataset_fingerprint": "f1"}).info.run_id
    client.log_metric(registered, "test.accuracy", 0.9)
    client.create_registered_model("tiny-classifier")
    source = (tmp_path / "model").as_uri()
    version = client.create_model_version("tiny-classifier", source, run_id=registered).version
    live = client.create_run(experiment_id).info.run_id
    marks = tmp_path / "marks"
    pid = dead_pid()
    killed = [
        write_mark(marks, "train_head", pid, [trained]),
        write_mark(marks, "evaluate", pid, [registered]),
    ]
    mine = write_mark(marks, "finetune", os.getpid(), [live])  # still running: left alone
    scratch = Path(cfg.paths.models) / f".checkpoint.tmp-{pid}-x"
    scratch.mkdir(parents=True)

    done = stage.recover(cfg, marks)

    assert sorted(done["killed_stages"]) == ["evaluate", "train_head"]
    assert client.get_run(trained).info.status == "KILLED"
    assert client.get_run(registered).info.status == "FINISHED"
    assert client.get_run(registered).data.tags[pipeline_tag()] == "true"
    assert client.get_model_version("tiny-classifier", version).aliases == ["champion"]
    assert client.get_run(live).info.status == "RUNNING"
    assert not any(path.exists() for path in killed) and mine.exists() and not scratch.exists()
    assert stage.recover(cfg, marks)["killed_stages"] == []  # nothing left: nothing to do


def pipeline_tag() -> str:
    from src.tracking.pipeline_run import CRASH_TAG

    return CRASH_TAG


# evaluate killed (SIGKILL, as by kill -9) the moment after its model version is registered
KILLED_AFTER_REGISTERING = """
import os, signal
from src.stages import evaluate, stage
from src.tracking import pipeline_run
pipeline_run.assign_alias = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
stage.main("evaluate", evaluate.run)
"""
# prepare killed when its new output folder is built, before it replaces the old one
KILLED_BEFORE_REPLACING = """
import os, signal
from src.outputs import folders
from src.stages import prepare, stage
folders.replace_dir = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
stage.main("prepare", prepare.run)
"""


def kill_9(repo: Path, script: str) -> None:
    """Run `script` in `repo` as a stage process would run, expecting it to be killed by SIGKILL."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    killed = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-3000:]


def marks(repo: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in (repo / ".pipeline" / "running").glob("*.json"))


@pytest.mark.slow
def test_repro_after_kill_9_finishes_the_run_and_cleans_up_when_stages_come_from_the_run_cache(tmp_path):
    from mlflow import MlflowClient

    from tests.conftest import require_shared

    require_shared()
    repo = copy_repo(tmp_path)
    sh(repo, "python", "-m", "src.params", *CI)
    sh(repo, "dvc", "repro")
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer-learning")

    kill_9(repo, KILLED_AFTER_REGISTERING)
    crashed = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    versions = client.search_model_versions("name='image-classifier-ci'")
    version = next(v for v in versions if v.run_id == crashed.info.run_id)
    assert crashed.info.status == "RUNNING" and version.aliases == [] and marks(repo) == ["evaluate"]
    (repo / "reports" / "metrics.json").unlink()  # evaluate's outputs changed: DVC restores them

    output = sh(repo, "dvc", "repro")

    assert ran_stages(output) == {"recover"} and "'evaluate' is cached" in output, output
    finished = client.get_run(crashed.info.run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags[pipeline_tag()] == "true"
    # the same model scored the same: it does not beat the champion of the first run
    assert client.get_model_version("image-classifier-ci", version.version).aliases == ["candidate"]
    assert marks(repo) == []

    kill_9(repo, KILLED_BEFORE_REPLACING)
    left = [p for p in (repo / "data").iterdir() if ".tmp-" in p.name]
    assert left and marks(repo) == ["prepare"], "the killed prepare left no temp folder"
    (repo / "data" / "prepared" / "info.json").unlink()

    output = sh(repo, "dvc", "repro")

    assert ran_stages(output) == {"recover"} and "'prepare' is cached" in output, output
    assert not any(p.exists() for p in left) and marks(repo) == []
    assert ran_stages(sh(repo, "dvc", "repro")) == set()
