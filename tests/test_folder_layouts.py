"""Folders as users have them: splits, class folders and images linked from other storage,
symlink loops, label CSVs with `;` and other delimiters, GTSRB's official layout."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest

from src.config.checks import validate
from src.config.compose import compose
from src.data import layouts
from src.errors import StageError
from src.images import decode, files
from src.outputs import hashing
from src.stages import download, prepare
from tests import corpus
from tests.conftest import GTSRB, path_overrides, small_images

CLASSES = {"cats": 4, "dogs": 4}
GT_HEADER = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]


def cfg_for(tmp_path: Path, root: Path, *overrides: str, dataset: str = "folder"):
    """The `dataset` config (`folder`) at `root`, 32 px, every output under tmp_path/work."""
    return validate(
        compose(
            [
                *small_images(root, dataset),
                *path_overrides(tmp_path / "work"),
                *overrides,
            ]
        )
    )


def download_and_prepare(cfg) -> tuple[dict, dict]:
    """The download stage (which fingerprints the folder) and then prepare, as `dvc repro` runs them."""
    return download.run(cfg), prepare.run(cfg)


def prepared(tmp_path: Path) -> Path:
    return tmp_path / "work" / "prepared"


def manifest(tmp_path: Path) -> pd.DataFrame:
    return pd.read_csv(prepared(tmp_path) / "manifest.csv", dtype={"class": str})


def fingerprint(root: Path, tmp_path: Path) -> tuple[int, str]:
    return download.fingerprint(root, tmp_path / "hashes.sqlite")


def link(target: Path, at: Path) -> Path:
    """A symlink `at` -> `target` (its parent folder made as needed)."""
    at.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, at)
    return at


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def gtsrb_official(
    base: Path, n_classes: int, per_class: int = 3, per_class_test: int = 2, gt_at: Path | None = None
) -> dict[str, str]:
    """GTSRB as its archives unpack into `base`: `Final_Training/Images/000NN/000NN_00000.ppm`
    with `GT-000NN.csv`, `Final_Test/Images/NNNNN.ppm` with `GT-final_test.test.csv` (no
    labels) and the ground truth `GT-final_test.csv` (`;`) in `gt_at` (no file when None).
    Returns the test file names and their ClassId."""
    train = base / "Final_Training" / "Images"
    for c in range(n_classes):
        folder = train / f"{c:05d}"
        names = [f"00000_{i:05d}.ppm" for i in range(per_class)]
        for i, name in enumerate(names):
            corpus.image(folder / name, seed=1000 + c * 10 + i)
        rows = [[name, 24, 24, 1, 1, 22, 22, c] for name in names]
        write_csv(folder / f"GT-{c:05d}.csv", GT_HEADER, rows, ";")
    test = base / "Final_Test" / "Images"
    labels = {f"{i:05d}.ppm": str(i % n_classes) for i in range(n_classes * per_class_test)}
    for i, name in enumerate(labels):
        corpus.image(test / name, seed=5000 + i)
    write_csv(
        test / "GT-final_test.test.csv", GT_HEADER[:-1], [[n, 24, 24, 1, 1, 22, 22] for n in labels], ";"
    )
    if gt_at is not None:
        rows = [[name, 24, 24, 1, 1, 22, 22, label] for name, label in labels.items()]
        write_csv(gt_at / "GT-final_test.csv", GT_HEADER, rows, ";")
    return labels


# --- symlinked folders and files -----------------------------------------------------------


def test_symlinked_split_folders_are_read_and_fingerprinted(tmp_path):
    store = corpus.split_tree(
        tmp_path / "store", {"train": CLASSES, "val": {"cats": 2, "dogs": 2}, "test": {"cats": 1, "dogs": 1}}
    )
    root = tmp_path / "images"
    for split in ("train", "val", "test"):
        link(store / split, root / split)
    source, info = download_and_prepare(cfg_for(tmp_path, root))
    assert source["files"] == 14
    assert info["counts"] == {"train": 8, "val": 4, "test": 2}
    # the same relative paths and bytes as the folder linked to: the same fingerprint
    assert fingerprint(root, tmp_path) == fingerprint(store, tmp_path) == (14, source["fingerprint"])
    assert manifest(tmp_path)["path"].str.startswith(("train/", "val/", "test/")).all()


def test_symlinked_class_folders_subfolders_and_files_are_read(tmp_path):
    store = corpus.class_tree(tmp_path / "store", {"cats": 5, "more_dogs": 2}, seed=1)
    root = corpus.split_tree(tmp_path / "images", {"train": {"dogs": 3}, "test": {"cats": 1, "dogs": 1}})
    link(store / "cats", root / "train" / "cats")  # a class folder
    link(store / "more_dogs", root / "train" / "dogs" / "more")  # a subfolder of a class folder
    for i in range(2):  # single files
        link(store / "cats" / f"cats{i}.png", root / "test" / "cats" / f"linked{i}.png")
    source, info = download_and_prepare(cfg_for(tmp_path, root, "dataset.split.val_fraction=0.2"))
    assert source["files"] == 14 and fingerprint(root, tmp_path)[0] == 14
    counts = pd.read_csv(prepared(tmp_path) / "counts.csv", index_col="class")
    assert counts.loc["cats"].tolist() == [4, 1, 3] and counts.loc["dogs"].tolist() == [4, 1, 1]
    assert manifest(tmp_path)["path"].str.startswith("train/dogs/more/").sum() == 2


def test_linked_split_tree_was_not_found_by_path_rglob(tmp_path):
    """Path.rglob does not enter symlinked folders (Python 3.11): the walker must."""
    store = corpus.class_tree(tmp_path / "store", CLASSES)
    root = tmp_path / "images"
    link(store, root / "train")
    assert not [p for p in root.rglob("*") if p.is_file()]
    assert len(list(files.walk_files(root))) == 8


def test_symlink_loops_end_and_are_reported(tmp_path, caplog):
    root = corpus.split_tree(tmp_path / "images", {"train": CLASSES, "test": {"cats": 1, "dogs": 1}})
    link(root, root / "train" / "cats" / "up")  # to the dataset root
    link(Path(".."), root / "train" / "dogs" / "parent")  # relative, to its split folder
    link(Path("."), root / "test" / "dogs" / "self")  # to its own folder
    link(root / "train", root / "train" / "all")  # a "class" folder that is its split folder
    caplog.set_level(logging.WARNING)
    source, info = download_and_prepare(cfg_for(tmp_path, root))
    assert source["files"] == 10
    assert sum(info["counts"].values()) == 10
    assert json.loads((prepared(tmp_path) / "classes.json").read_text()) == ["cats", "dogs"]
    loops = [r.getMessage() for r in caplog.records if "symlink loop" in r.getMessage()]
    for name in ("train/cats/up", "train/dogs/parent", "test/dogs/self", "train/all"):
        assert any(str(root / name) in message for message in loops), name


def test_walker_skips_hidden_names_and_reports_broken_links(tmp_path, caplog):
    root = corpus.class_tree(tmp_path / "images", CLASSES)
    corpus.image(root / "cats" / ".cache" / "thumb.png")
    link(tmp_path / "unmounted" / "dogs", root / "horses")
    link(tmp_path / "store" / ".hidden", root / "cats" / "visible")  # broken as well
    caplog.set_level(logging.WARNING)
    found = list(files.walk_files(root))
    assert len(found) == 8 and all(p.is_relative_to(root) for p in found)
    assert sum("broken link" in r.getMessage() for r in caplog.records) == 2


def test_download_of_a_folder_of_links_to_nothing_still_refuses(tmp_path):
    root = tmp_path / "images"
    link(tmp_path / "unmounted" / "train", root / "train")
    with pytest.raises(StageError, match="holds no files"):
        download.run(cfg_for(tmp_path, root))


def test_fingerprint_of_an_unlinked_tree_is_unchanged(tmp_path):
    """The walker finds what the previous rglob-based fingerprint found, in the same order."""
    root = corpus.split_tree(tmp_path / "images", {"train": CLASSES, "val": {"cats": 1, "dogs": 1}})
    corpus.image(root / "train" / ".ipynb_checkpoints" / "x.png")
    listed = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    assert sorted(files.walk_files(root)) == listed
    db = tmp_path / "hashes.sqlite"
    expected = "".join(
        f"{p.relative_to(root).as_posix()}|{d}\n" for p, d in zip(listed, hashing.digests(listed, db))
    )
    assert fingerprint(root, tmp_path) == (10, hashlib.sha256(expected.encode()).hexdigest())


# --- label CSVs ----------------------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [";", "\t", "|", ","])
def test_label_csv_delimiter_is_sniffed_and_columns_found_by_name(tmp_path, delimiter):
    root = corpus.split_tree(tmp_path / "images", {"train": {"0": 4, "1": 4}})
    rows = corpus.flat_test(root, ["1", "0", "1"])
    gt = [[rel, 24, 24, 1, 1, 22, 22, label] for rel, label in rows]
    write_csv(root / "GT-final_test.csv", GT_HEADER, gt, delimiter)
    source, info = download_and_prepare(cfg_for(tmp_path, root, "dataset.test_labels_csv=GT-final_test.csv"))
    assert info["counts"]["test"] == 3
    test = manifest(tmp_path).query("split == 'test'")
    assert dict(zip(test["path"], test["class"])) == dict(rows)


def test_semicolon_csv_with_lower_case_header_and_bom(tmp_path):
    root = corpus.split_tree(tmp_path / "images", {"train": {"cats": 4, "dogs": 4}})
    rows = corpus.flat_test(root, ["dogs", "cats"])
    lines = "\ufefflabel;file\n" + "".join(f"{label};{rel}\n" for rel, label in rows)
    (root / "labels.csv").write_text(lines, encoding="utf-8")
    download_and_prepare(cfg_for(tmp_path, root, "dataset.test_labels_csv=labels.csv"))
    test = manifest(tmp_path).query("split == 'test'")
    assert dict(zip(test["path"], test["class"])) == dict(rows)


# --- GTSRB as published --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["beside_images", "at_top"])
@pytest.mark.parametrize("dataset", ["folder", "gtsrb"])
def test_official_gtsrb_layout_gives_numeric_classes_and_test_labels(tmp_path, where, dataset):
    if where == "beside_images":  # dataset.path is the GTSRB folder, the ground truth beside the images
        root = base = tmp_path / "GTSRB"
        gt_at = base / "Final_Test" / "Images"
    else:  # the three archives unpacked into one folder: GTSRB/... and GT-final_test.csv at the top
        root, base = tmp_path / "unpacked", tmp_path / "unpacked" / "GTSRB"
        gt_at = root
    labels = gtsrb_official(base, n_classes=11, gt_at=gt_at)
    # dataset=gtsrb names Test.csv, which this layout lacks: GT-final_test.csv is used instead
    source, info = download_and_prepare(cfg_for(tmp_path, root, dataset=dataset))
    assert info["classes"] == [str(c) for c in range(11)]
    assert info["counts"] == {"train": 22, "val": 11, "test": 22}
    rows = manifest(tmp_path)
    assert not rows["path"].str.endswith(".csv").any()
    train = rows[rows["split"] != "test"]
    assert (train["class"] == train["path"].str.extract(r"Images/(\d{5})/")[0].astype(int).astype(str)).all()
    test = rows.query("split == 'test'")
    assert dict(zip(test["path"].map(lambda p: Path(p).name), test["class"])) == labels
    assert (test["label"] == test["class"].astype(int)).all()  # label index == ClassId: classes in order
    assert source["files"] == 33 + 11 + 22 + 2


def test_official_gtsrb_class_names_are_those_of_the_class_id_folders(shared):
    """`00042` and the shared `train/42/` tree give the same class names."""
    names = sorted((d.name for d in (GTSRB / "train").iterdir()), key=decode.natural_key)
    assert names == [layouts.gtsrb_class(f"{c:05d}") for c in range(43)]


def test_official_gtsrb_test_images_without_ground_truth_are_refused(tmp_path):
    root = tmp_path / "GTSRB"
    gtsrb_official(root, n_classes=3, gt_at=None)
    with pytest.raises(StageError, match="GT-final_test.csv"):
        download_and_prepare(cfg_for(tmp_path, root))


def test_official_gtsrb_training_archive_alone_carves_val_and_test(tmp_path):
    root = tmp_path / "GTSRB"
    gtsrb_official(root, n_classes=3, per_class=5, gt_at=None)
    for image in (root / "Final_Test" / "Images").iterdir():
        image.unlink()
    (root / "Final_Test" / "Images").rmdir()
    _, info = download_and_prepare(cfg_for(tmp_path, root))
    assert info["classes"] == ["0", "1", "2"]
    assert info["counts"] == {"train": 9, "val": 3, "test": 3}
