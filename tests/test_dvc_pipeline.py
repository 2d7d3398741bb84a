"""The real thing: `dvc repro` of the `ci` preset in a temporary copy of the repository,
caching (a second repro runs nothing, a head change reruns only what depends on it),
`dvc exp run -S` reaching the stages through Hydra composition, and the MLflow run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from src.config.paths import REPO_ROOT
from tests.conftest import SHARED, VGG16_WEIGHTS, path_overrides, require_shared

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# The `ci` preset without the export stage's conversions (about 50 s a run; tests/test_export.py,
# tests/test_console.py and CI's own `dvc repro` export every format)
CI = ("experiment=ci", "export.formats=[]")


def set_ci() -> list[str]:
    """`CI` as `dvc exp run -S` options."""
    return [arg for override in CI for arg in ("-S", override)]


def sh(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a command in `cwd` with the venv first on PATH (plus `env`); its output, failing on error."""
    env = {
        **os.environ,
        **(env or {}),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z_]+)'", output))


def copy_repo(top: Path) -> Path:
    """A git clone-like copy of the working tree under `top`, with `../shared` beside it, as in CI."""
    (top / "shared").symlink_to(SHARED)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    copy = top / "repo"
    for name in files:
        if (REPO_ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, copy / name)
    sh(copy, "git", "init", "-q")
    sh(copy, "git", "add", "-A")
    sh(copy, "git", "commit", "-qm", "snapshot")
    return copy


def run_queue(repo: Path, timeout: float = 900) -> str:
    """`dvc queue start` one worker and wait until nothing is queued or running; the final status."""
    sh(repo, "dvc", "queue", "start", "-j", "1")
    deadline = time.monotonic() + timeout
    while re.search(r"\b(Queued|Running)\b", status := sh(repo, "dvc", "queue", "status")):
        assert time.monotonic() < deadline, status
        time.sleep(5)
    return status


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    require_shared()
    return copy_repo(tmp_path_factory.mktemp("clone"))


def test_repro_ci_preset_caches_tracks_and_takes_exp_run_overrides(repo):
    from mlflow import MlflowClient

    sh(repo, "python", "-m", "src.params", *CI)
    first = sh(repo, "dvc", "repro")
    everything = {"recover", "download", "prepare", "extract", "train_head", "finetune", "evaluate", "export"}
    assert ran_stages(first) == everything
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert 0 <= metrics["test"]["accuracy"] <= 1 and 0 <= metrics["head_test"]["accuracy"] <= 1
    assert (repo / "models" / "final.keras").is_file() and (repo / "dvc.lock").is_file()
    assert "test.accuracy" in sh(repo, "dvc", "metrics", "show")

    # nothing changed: nothing runs
    assert ran_stages(sh(repo, "dvc", "repro")) == set()

    # the head's dropout feeds train_head, finetune and evaluate only
    sh(repo, "python", "-m", "src.params", *CI, "head.dropout=0.3")
    assert ran_stages(sh(repo, "dvc", "repro")) == {"train_head", "finetune", "evaluate", "export"}

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer-learning")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.data.params["head.dropout"] for r in runs] == ["0.5", "0.3"]
    run = runs[0]
    assert run.data.tags["preset"] == "ci" and len(run.data.tags["git_commit"]) == 40
    assert run.data.metrics["test.accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert len(client.get_metric_history(run.info.run_id, "head.loss")) == 1
    # train_head, finetune and evaluate are three processes, one run: epochs logged live, once
    assert run.info.status == "FINISHED" and run.data.tags["live.head"] == run.data.tags["live.finetune"]
    assert {"figures", "metrics.json", "classes.json", "config.yaml"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    assert len(client.search_model_versions("name='image-classifier-ci'")) == 2
    assert not (repo / "outputs").exists()

    # `dvc exp run -S` composes conf/ with Hydra into params.yaml, and the stages see it
    output = sh(repo, "dvc", "exp", "run", *set_ci(), "-S", "head.dropout=0.25")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["head"]["dropout"] == 0.25 and params["preset"] == "ci"
    assert ran_stages(output) == {"train_head", "finetune", "evaluate", "export"}
    latest = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert latest.data.params["head.dropout"] == "0.25"


def test_src_train_runs_all_stages_from_conf(tmp_path):
    """`python -m src.train` composes conf/ with Hydra (no params.yaml) and runs every stage."""
    require_shared()
    work = tmp_path / "work"
    outputs = path_overrides(work)
    sh(
        REPO_ROOT,
        "python",
        "-m",
        "src.train",
        "experiment=ci",
        f"dataset.path={SHARED / 'data' / 'cats_vs_dogs'}",
        f"model.weights={SHARED / 'weights' / 'vgg16_imagenet_notop.weights.h5'}",
        "finetune.layers=2",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        *outputs,
    )
    reports = tmp_path / "hydra" / "reports"  # its own folder: never paths.reports, which dvc repro owns
    summary = json.loads((reports / "finetune.json").read_text())
    assert summary["unfrozen"] == ["block5_conv3", "block5_pool"]
    assert (reports / "metrics.json").is_file() and (tmp_path / "hydra" / ".hydra" / "config.yaml").is_file()
    assert not (work / "reports").exists() and not (work / "models").exists()


def test_queued_experiments_run_in_temp_copies_and_log_to_the_project_store(repo):
    """`dvc exp run --queue` with two values plus `dvc queue start`: two experiments in
    `dvc exp show`, two more runs in the repository's MLflow store, no stray store in the copies."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer-learning")
    before = len(client.search_runs([experiment.experiment_id]))
    queued = sh(repo, "dvc", "exp", "run", "--queue", *set_ci(), "-S", "finetune.layers=0,2")
    assert queued.count("Queued experiment") == 2, queued
    status = run_queue(repo)
    assert status.count("Success") >= 2, status
    shown = sh(repo, "dvc", "exp", "show", "--json")
    layers = re.findall(r'"layers":\s*(\d+)', shown)
    assert {"0", "2"} <= set(layers)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == before + 2
    assert {r.data.params["finetune.layers"] for r in runs[:2]} == {"0", "2"}
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))


def test_content_changes_rerun_what_reads_them_and_outputs_over_data_are_refused(tmp_path):
    """A weights file or a dataset image replaced in place (same path, same size) is noticed by
    `dvc status` and rerun by `dvc repro`; an output pointed at the dataset never deletes it."""
    import h5py
    from omegaconf import OmegaConf

    from src.config.compose import compose, write_params
    from tests import corpus

    require_shared()
    repo = copy_repo(tmp_path)
    images = tmp_path / "images"
    for name in ("cats", "dogs"):
        for i in range(12):
            corpus.image(images / name / f"{name}{i}.bmp", 24, seed=i + (100 if name == "dogs" else 0))
    weights = tmp_path / "weights" / "vgg16.weights.h5"
    weights.parent.mkdir()
    shutil.copyfile(VGG16_WEIGHTS, weights)
    sh(
        repo,
        "python",
        "-m",
        "src.params",
        *CI,
        f"dataset.path={images}",
        f"model.weights={weights}",
    )
    assert len(ran_stages(sh(repo, "dvc", "repro"))) == 8  # seven stages, and recover (no lock entry yet)
    assert "up to date" in sh(repo, "dvc", "status")

    with h5py.File(weights, "r+") as f:  # other weights, same file name and size
        bias = f["layers/conv2d/vars/1"]
        bias[...] = bias[...] + 1.0
    status = sh(repo, "dvc", "status")
    assert "extract" in status and "finetune" in status and str(weights) in status
    assert ran_stages(sh(repo, "dvc", "repro")) == {"extract", "train_head", "finetune", "evaluate", "export"}

    corpus.image(images / "cats" / "cats0.bmp", 24, seed=999)  # other pixels, same size
    assert "download" in sh(repo, "dvc", "status")
    assert {"download", "prepare", "extract"} <= ran_stages(sh(repo, "dvc", "repro"))

    # params.yaml edited by hand (no `src.params` check): outputs over the dataset or the weights
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    owned = sorted(p.relative_to(tmp_path) for p in [*images.rglob("*"), *weights.parent.rglob("*")])
    for key, target, refusal in [
        ("paths.prepared", images, "both a dependency and an output"),  # DVC's own check
        ("paths.reports", weights.parent, "paths.reports="),  # the download stage's, before any deletion
    ]:
        cfg = compose(["experiment=ci", f"dataset.path={images}", f"model.weights={weights}"])
        OmegaConf.update(cfg, key, str(target))
        write_params(cfg, repo / "params.yaml")
        proc = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True, env=env)
        assert proc.returncode != 0 and refusal in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        assert (
            sorted(p.relative_to(tmp_path) for p in [*images.rglob("*"), *weights.parent.rglob("*")]) == owned
        )


def _refused(repo: Path, *args: str) -> str:
    """Run a command that must fail; its output."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode != 0, f"{' '.join(args)} succeeded:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


def test_bad_configs_stop_before_dvc_deletes_anything(tmp_path):
    """An output over the dataset, over the MLflow store, or a misspelt key: refused by
    `src.params`, by DVC's own Hydra composition (`dvc exp run -S`), and by `dvc repro` of a
    hand-edited params.yaml, with every file in place afterwards."""
    require_shared()
    repo = copy_repo(tmp_path)
    small = repo / "userdata" / "small"
    for name in ("cats", "dogs"):
        images = sorted((SHARED / "data" / "cats_vs_dogs" / "train" / name).iterdir())[:3]
        (small / name).mkdir(parents=True)
        for image in images:
            shutil.copyfile(image, small / name / image.name)
    before = sorted(p.relative_to(small) for p in small.rglob("*"))
    out = _refused(
        repo, "dvc", "exp", "run", "-S", "experiment=ci", "-S", "dataset.path=userdata/small",
        "-S", "paths.prepared=userdata/small",
    )  # fmt: skip
    assert "paths.prepared" in out and "dataset.path" in out
    assert sorted(p.relative_to(small) for p in small.rglob("*")) == before

    (repo / "mlruns" / "store.txt").write_text("the user's runs\n")
    params = (repo / "params.yaml").read_text()
    out = _refused(repo, "python", "-m", "src.params", "experiment=ci", "paths.prepared=mlruns")
    assert "paths.prepared" in out and "mlruns" in out and (repo / "params.yaml").read_text() == params
    sh(repo, "python", "-m", "src.params", "experiment=ci")
    edited = yaml.safe_load((repo / "params.yaml").read_text())
    edited["paths"]["prepared"] = "mlruns"  # by hand, past every check of src.params
    (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    out = _refused(repo, "dvc", "repro", "prepare")
    assert "paths.prepared" in out and (repo / "mlruns" / "store.txt").read_text() == "the user's runs\n"

    sh(repo, "git", "checkout", "params.yaml")
    for args in (
        ("python", "-m", "src.params", "experiment=ci", "+head.dropuot=0.3"),
        ("dvc", "exp", "run", "-S", "experiment=ci", "-S", "+head.dropuot=0.3"),
    ):
        out = _refused(repo, *args)
        assert "head.dropuot is not a known key" in out
    assert "dropuot" not in (repo / "params.yaml").read_text()

    out = _refused(
        repo, "dvc", "exp", "run", "-S", "experiment=ci", "-S", "tracking.uri=http://me:s3cr3t@host:5000"
    )
    assert "tracking.uri carries credentials" in out and "s3cr3t" not in out
    assert not any("s3cr3t" in p.read_text() for p in (repo / "params.yaml", repo / "dvc.lock") if p.exists())
