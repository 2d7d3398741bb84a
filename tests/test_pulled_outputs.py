"""Outputs that DVC checked out or pulled into another checkout: `prepare` finds the raw images of
this checkout, not the absolute folder that `source.json` recorded where `download` ran."""

from __future__ import annotations

from pathlib import Path

from src.config.compose import compose
from src.stages.prepare import source_root
from tests.conftest import path_overrides


def test_a_downloaded_dataset_is_the_one_under_this_checkouts_raw_folder(tmp_path):
    cfg = compose(path_overrides(tmp_path / "here"))
    elsewhere = tmp_path / "other-clone" / "data" / "raw" / "flowers"
    elsewhere.mkdir(parents=True)  # exists, but belongs to another checkout
    source = {"kind": "download", "dataset": "flowers", "root": str(elsewhere)}
    assert source_root(cfg, source) == tmp_path / "here" / "raw" / "flowers"


def test_a_local_folder_recorded_elsewhere_is_found_from_dataset_path(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cfg = compose([*path_overrides(tmp_path / "here"), f"dataset.path={images}"])
    moved = {"kind": "local", "root": str(tmp_path / "gone" / "images")}
    assert source_root(cfg, moved) == images.resolve()
    recorded = {"kind": "local", "root": str(images)}  # still there: used as recorded
    assert source_root(cfg, recorded) == Path(images)
