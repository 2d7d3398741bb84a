"""`python -m src.train` never reads what a concurrent `dvc repro` may replace: DVC's prepared data
is snapshotted into the content-addressed cache (hard links, else copies; a snapshot whose key
no longer matches is discarded), and a run writes raw data, models and reports to its own
folders."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from src.config.compose import compose
from src.config.paths import REPO_ROOT
from src.outputs import folders
from src.stages import reuse
from tests.conftest import CATS_DOGS, VGG16_WEIGHTS, path_overrides, require_shared

# --- the snapshot alone, on hand-made folders ------------------------------------------------


@pytest.fixture
def cfg(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cfg = compose(["dataset=folder", f"dataset.path={images}", *path_overrides(tmp_path / "work")])
    raw = Path(cfg.paths.raw)
    raw.mkdir(parents=True)
    (raw / "source.json").write_text(json.dumps({"root": str(images), "fingerprint": "f"}))
    return cfg


def dvc_output(folder: Path, key: str, value: int = 1) -> Path:
    """A DVC-style prepared output: marker, info.json with `key`, two small arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / folders.MARKER).write_text("x\n")
    np.save(folder / "images_train.npy", np.full((2, 4, 4, 3), value, dtype=np.uint8))
    np.save(folder / "labels_train.npy", np.array([0, value], dtype=np.int32))
    (folder / "info.json").write_text(json.dumps({"cache_key": key, "fingerprint": f"fp{value}"}))
    return folder


def no_build(cfg):
    raise AssertionError("the matching DVC output should have been snapshotted, not rebuilt")


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_a_matching_dvc_output_is_snapshotted_into_the_cache_by_hard_links(cfg):
    key = reuse.stage_key(cfg, "prepare")
    dvc = dvc_output(Path(cfg.paths.prepared), key)
    result = reuse.reuse_or_run(cfg, "prepare", no_build)
    target = Path(cfg.paths.cache) / "prepare" / key
    assert result["reused"] is True and result["folder"] == str(target) == cfg.paths.prepared
    assert result["snapshot_of"] == str(dvc) and result["fingerprint"] == "fp1"
    for name in ("images_train.npy", "labels_train.npy", "info.json"):
        assert (target / name).stat().st_ino == (dvc / name).stat().st_ino  # hard-linked
    assert (target / folders.MARKER).is_file() and leftovers(target.parent) == []
    # DVC replaces its output (another config): the snapshot keeps what was trained on
    shutil.rmtree(dvc)
    dvc_output(dvc, "another-key", value=7)
    with open_dict(cfg):
        cfg.paths.prepared = str(dvc)
    again = reuse.reuse_or_run(cfg, "prepare", no_build)
    assert again["folder"] == str(target) and "snapshot_of" not in again
    assert np.load(target / "labels_train.npy").tolist() == [0, 1]


def test_where_hard_links_are_refused_the_files_are_copied(cfg, monkeypatch):
    key = reuse.stage_key(cfg, "prepare")
    dvc = dvc_output(Path(cfg.paths.prepared), key)

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(reuse.os, "link", refuse)
    target = reuse.snapshot(dvc, Path(cfg.paths.cache) / "prepare" / key, key)
    assert target is not None
    for name in ("images_train.npy", "labels_train.npy", "info.json"):
        assert (target / name).stat().st_ino != (dvc / name).stat().st_ino
        assert (target / name).read_bytes() == (dvc / name).read_bytes()


def test_a_key_mismatch_found_after_copying_is_not_used(cfg, monkeypatch):
    key = reuse.stage_key(cfg, "prepare")
    dvc = dvc_output(Path(cfg.paths.prepared), key)
    real = reuse._link_or_copy
    replaced = []

    def replaced_midway(src_fd, name, dst):
        if not replaced:  # DVC rewrites its output while the snapshot is made (unlink, write)
            (dvc / "info.json").unlink()
            (dvc / "info.json").write_text(json.dumps({"cache_key": "another-key"}))
            replaced.append(name)
        return real(src_fd, name, dst)

    monkeypatch.setattr(reuse, "_link_or_copy", replaced_midway)
    target = Path(cfg.paths.cache) / "prepare" / key
    assert reuse.snapshot(dvc, target, key) is None
    assert not target.exists() and leftovers(target.parent) == []

    # reuse_or_run then builds the output in the cache instead
    (dvc / "info.json").write_text(json.dumps({"cache_key": key}))
    replaced.clear()
    built = []

    def build(cfg):
        out = Path(cfg.paths.prepared)
        out.mkdir(parents=True)
        (out / "info.json").write_text(json.dumps({"cache_key": key}))
        built.append(out)
        return {"built": True}

    result = reuse.reuse_or_run(cfg, "prepare", build)
    assert built == [target] and result["reused"] is False and result["folder"] == str(target)
    assert cfg.paths.prepared == str(target) and "snapshot_of" not in result


# --- a real src.train run while `python -m src.stages.prepare` replaces DVC's output ---------------


def _copy_project(dest: Path) -> Path:
    """The code and configs in a folder of their own, so that the stage entry points there read
    their own params.yaml (the keys are the same: they digest the code's content)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("src", "conf", "hydra_plugins"):
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=ignore)
    return dest


def _run(repo: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_src_train_reads_a_snapshot_while_dvc_prepare_replaces_its_output(tmp_path):
    from mlflow import MlflowClient

    from src.tracking.pipeline_run import FINGERPRINT_TAG

    require_shared()
    repo = _copy_project(tmp_path / "repo")
    work = tmp_path / "work"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [
        "experiment=ci",
        f"dataset.path={CATS_DOGS}",
        f"model.weights={VGG16_WEIGHTS}",
        f"tracking.uri={uri}",
        "dataset.limit_per_class.val=4",
        "dataset.limit_per_class.test=4",
        *path_overrides(work),
    ]
    mine, other = [*common, "dataset.limit_per_class.train=8"], [*common, "dataset.limit_per_class.train=12"]

    # what `dvc repro` left for this config: download and prepare by their entry points
    _run(repo, "-m", "src.params", *mine)
    _run(repo, "-m", "src.stages.download")
    _run(repo, "-m", "src.stages.prepare")
    dvc_prepared = work / "prepared"
    expected = json.loads((dvc_prepared / "info.json").read_text())
    assert expected["counts"]["train"] == 16
    raw_source = work / "raw" / "source.json"
    raw_stamp = raw_source.stat().st_mtime_ns
    _run(repo, "-m", "src.params", *other)  # the next `dvc repro` will prepare another config

    hydra_dir = tmp_path / "hydra"
    log_file = tmp_path / "train.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "src.train", *mine, f"hydra.run.dir={hydra_dir}"],
            cwd=repo,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 600
            while "prepare done" not in log_file.read_text():
                assert proc.poll() is None, log_file.read_text()[-3000:]
                assert time.monotonic() < deadline, "src.train never finished its prepare stage"
                time.sleep(0.1)
            # a concurrent `dvc repro prepare` of another config replaces DVC's output now
            _run(repo, "-m", "src.stages.prepare")
            assert proc.poll() is None, "src.train ended before DVC's output was replaced"
            assert proc.wait(timeout=900) == 0, log_file.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    replaced = json.loads((dvc_prepared / "info.json").read_text())
    assert replaced["counts"]["train"] == 24 and replaced["cache_key"] != expected["cache_key"]

    reports = hydra_dir / "reports"
    prepare_summary = json.loads((reports / "prepare.json").read_text())
    folder = Path(prepare_summary["folder"])
    assert folder == work / "cache" / "prepare" / expected["cache_key"]
    assert prepare_summary["snapshot_of"] == str(dvc_prepared)
    assert prepare_summary["counts"] == expected["counts"]
    assert prepare_summary["fingerprint"] == expected["fingerprint"]
    extract_summary = json.loads((reports / "extract.json").read_text())
    assert Path(extract_summary["folder"]).parent == work / "cache" / "extract"
    assert extract_summary["splits"]["train"]["images"] == 16
    assert json.loads((folder / "info.json").read_text())["counts"]["train"] == 16

    evaluate_summary = json.loads((reports / "evaluate.json").read_text())
    run = MlflowClient(uri).get_run(evaluate_summary["mlflow"]["run_id"])
    assert run.data.tags[FINGERPRINT_TAG] == expected["fingerprint"]
    assert (reports / "metrics.json").is_file() and any((hydra_dir / "models").iterdir())

    # nothing of DVC's was written by src.train
    assert not (work / "reports" / "metrics.json").exists() and not (work / "models").exists()
    assert raw_source.stat().st_mtime_ns == raw_stamp
    assert (work / "cache" / "raw").is_dir()
