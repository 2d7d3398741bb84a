"""The prepare stage on small real inputs: every image mode, corrupt files, numeric classes,
flat test folders labelled by CSV, stratified splits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from src import errors
from src.config.checks import validate
from src.config.compose import compose
from src.images.decode import natural_key
from src.stages import prepare, stage
from tests.conftest import GTSRB, path_overrides, small_images


def folder_cfg(tmp_path, root, *overrides):
    work = tmp_path / "work"
    cfg = compose(
        [
            *small_images(root),
            *path_overrides(work),
            *overrides,
        ]
    )
    validate(cfg)
    (work / "raw").mkdir(parents=True)
    (work / "raw" / "source.json").write_text(
        json.dumps({"kind": "local", "root": str(root), "fingerprint": "test"})
    )
    return cfg


def write_mixed_images(folder, n=10):
    """n images per class in every mode prepare must convert, plus one corrupt file."""
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "P", "CMYK", "LA"]
    for cls in ("alpha", "beta"):
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            mode = modes[i % len(modes)]
            array = rng.integers(0, 255, size=(40 + i, 50, 3), dtype=np.uint8)
            img = Image.fromarray(array).convert(mode)
            suffix = ".jpg" if mode in ("RGB", "L", "CMYK") else ".png"
            img.save(folder / cls / f"{cls}{i}{suffix}")
    (folder / "alpha" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "beta" / "notes.txt").write_text("not an image, ignored")


def test_natural_sort_puts_10_after_9():
    assert sorted(["10", "9", "2", "1"], key=natural_key) == ["1", "2", "9", "10"]
    assert sorted(["img10.png", "img2.png"], key=natural_key) == ["img2.png", "img10.png"]


def test_converts_every_mode_skips_corrupt_and_splits_stratified(tmp_path):
    root = tmp_path / "images"
    write_mixed_images(root, n=10)
    cfg = folder_cfg(tmp_path, root, "dataset.split.val_fraction=0.25", "dataset.split.test_fraction=0.2")
    info = stage.timed_run("prepare", prepare.run, cfg)
    out = tmp_path / "work" / "prepared"
    assert json.loads((out / "classes.json").read_text()) == ["alpha", "beta"]
    # per class: a fifth to test, then a quarter of the rest to val; the corrupt file drops out
    assert sum(info["counts"].values()) == 20 and info["counts"]["test"] == 4
    counts = pd.read_csv(out / "counts.csv", index_col="class")
    assert counts.loc["beta"].tolist() == [6, 2, 2] and counts.loc["alpha"].sum() == 10
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["path"].str.endswith("broken.jpg").tolist() == [True]
    assert info["skipped"] == 1
    for split, n in info["counts"].items():
        images = np.load(out / f"images_{split}.npy", mmap_mode="r")
        labels = np.load(out / f"labels_{split}.npy")
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8 and len(labels) == n
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == 20 and not manifest["path"].str.contains("broken").any()
    # splits are disjoint
    assert manifest["path"].is_unique
    assert json.loads((tmp_path / "work" / "reports" / "prepare.json").read_text())["seconds"] >= 0


def test_same_seed_same_split_and_no_leftover_temp_dirs(tmp_path):
    root = tmp_path / "images"
    write_mixed_images(root, n=8)
    cfg = folder_cfg(tmp_path, root)
    prepare.run(cfg)
    first = pd.read_csv(tmp_path / "work" / "prepared" / "manifest.csv")
    prepare.run(cfg)
    second = pd.read_csv(tmp_path / "work" / "prepared" / "manifest.csv")
    pd.testing.assert_frame_equal(first, second)
    assert [p.name for p in (tmp_path / "work").iterdir() if p.name.startswith(".")] == []


def test_gtsrb_numeric_classes_and_csv_labelled_flat_test(tmp_path):
    if not GTSRB.is_dir():
        pytest.skip(f"{GTSRB} not found")
    cfg = folder_cfg(
        tmp_path,
        GTSRB,
        "dataset.test_labels_csv=Test.csv",
        "dataset.limit_per_class.train=3",
        "dataset.limit_per_class.val=2",
        "dataset.limit_per_class.test=2",
    )
    info = prepare.run(cfg)
    assert info["classes"] == [str(i) for i in range(43)]
    assert info["counts"] == {"train": 129, "val": 86, "test": 86}
    manifest = pd.read_csv(tmp_path / "work" / "prepared" / "manifest.csv")
    test_rows = manifest[manifest.split == "test"]
    truth = pd.read_csv(GTSRB / "Test.csv")
    truth_by_path = dict(zip(truth.Path.map(lambda p: p.split("/")[-1]), truth.ClassId))
    for path, label in zip(test_rows.path, test_rows.label):
        assert truth_by_path[path.split("/")[-1]] == label  # class "10" is label 10


def test_flat_test_folder_without_csv_is_a_clear_error(tmp_path):
    root = tmp_path / "images"
    write_mixed_images(root / "train", n=4)
    (root / "test").mkdir()
    Image.new("RGB", (8, 8)).save(root / "test" / "0001.png")
    cfg = folder_cfg(tmp_path, root)
    with pytest.raises(errors.StageError, match="dataset.test_labels_csv"):
        prepare.run(cfg)
