"""Inputs outside the pipeline (`dataset.path`, `model.weights`) are recorded in params.yaml and
dvc.lock as written when a clone elsewhere, and DVC's experiment copies, reach the same data by
that relative path; absolute otherwise."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from src.config.compose import compose
from src.config.paths import EXPERIMENT_COPY_PARENTS, REPO_ROOT, portable_input
from tests.conftest import require_shared


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    """A DVC repository `repo/` with a data folder `shared/` beside it."""
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "shared" / "data" / "pets").mkdir(parents=True)
    root = tmp_path / "repo"
    (root / ".dvc").mkdir(parents=True)
    return root


def test_a_folder_beside_the_repository_is_linked_beside_each_experiment_copy(repo):
    assert portable_input(Path("../shared/data/pets"), repo)
    for parent in EXPERIMENT_COPY_PARENTS:
        link = repo / parent / "shared"
        assert link.is_symlink() and link.resolve() == (repo.parent / "shared").resolve()
        copy = repo / parent / "tmpabc123"  # where DVC would run an experiment
        copy.mkdir()
        assert (copy / "../shared/data/pets").is_dir()
    assert portable_input(Path("../shared/data/pets"), repo)  # again: the links are kept


def test_names_dvc_uses_and_places_already_taken_are_refused(repo):
    (repo.parent / "celery").mkdir()
    assert not portable_input(Path("../celery"), repo)
    assert not (repo / EXPERIMENT_COPY_PARENTS[0] / "celery").exists()
    (repo / EXPERIMENT_COPY_PARENTS[0] / "shared").mkdir(parents=True)  # not a link to the data
    assert not portable_input(Path("../shared/data/pets"), repo)


def test_deeper_or_untracked_locations_are_not_portable_and_tracked_ones_are(repo):
    assert not portable_input(Path("../../elsewhere/pets"), repo)
    assert not portable_input(Path("../shared/../shared/data"), repo)
    (repo / "data" / "photos").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    assert not portable_input(Path("data/photos"), repo)  # ignored or untracked: no copy holds it
    (repo / "data" / "photos.dvc").write_text("outs:\n- path: photos\n")
    assert portable_input(Path("data/photos"), repo)


def test_inside_an_experiment_copy_no_links_are_made(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # DVC names the original repository
    assert portable_input(Path("../shared/data/pets"), repo)
    assert not (repo / ".dvc" / "tmp").exists()


def test_params_name_the_shared_data_relatively_and_other_places_absolutely(tmp_path):
    require_shared()
    cfg = compose(["experiment=ci"])
    assert cfg.inputs.images == "../shared/data/cats_vs_dogs"
    assert (REPO_ROOT / EXPERIMENT_COPY_PARENTS[0] / "shared").is_symlink()
    (tmp_path / "photos" / "a").mkdir(parents=True)
    cfg = compose(["experiment=ci", f"dataset.path={tmp_path / 'photos'}"])
    assert cfg.inputs.images == str((tmp_path / "photos").resolve())
