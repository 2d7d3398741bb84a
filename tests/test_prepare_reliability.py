"""The prepare stage refuses, skips and reports bad inputs: labels the training split lacks, CSV
rows repeated or contradicting each other, empty and hidden folders, identical files in two
splits, oversized images, a full disk, a split left empty. Every input is a small real file."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import warnings
from collections import namedtuple
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from src.config.checks import validate
from src.config.compose import compose
from src.config.paths import REPO_ROOT
from src.data import decoding, memory
from src.errors import StageError
from src.outputs import folders
from src.stages import prepare
from tests import corpus
from tests.conftest import path_overrides, small_images

CLASSES = {"cats": 4, "dogs": 4}


def cfg_for(tmp_path: Path, root: Path, *overrides: str):
    """The `folder` dataset at `root`, 32 px, every output under tmp_path/work."""
    work = tmp_path / "work"
    cfg = validate(
        compose(
            [
                *small_images(root),
                *path_overrides(work),
                *overrides,
            ]
        )
    )
    folders.claim(work / "raw")  # as the download stage makes it
    (work / "raw" / "source.json").write_text(
        json.dumps({"kind": "local", "root": str(root), "fingerprint": "test"})
    )
    return cfg


def prepared(tmp_path: Path) -> Path:
    return tmp_path / "work" / "prepared"


def leftovers(tmp_path: Path) -> list[str]:
    """Hidden (temp) entries beside the prepared folder."""
    return [p.name for p in (tmp_path / "work").iterdir() if p.name.startswith(".")]


def three_splits(root: Path, test: dict | None = None, val: dict | None = None) -> Path:
    return corpus.split_tree(
        root, {"train": CLASSES, "val": val or {"cats": 1, "dogs": 1}, "test": test or {"cats": 2, "dogs": 2}}
    )


def csv_tree(root: Path, labels: list[str]) -> list[tuple[str, str]]:
    """Class folders under train/ and a flat test/ folder labelled by `Test.csv`."""
    corpus.split_tree(root, {"train": {"cats": 5, "dogs": 5}})
    return corpus.flat_test(root, labels)


# --- labels come from the training split ---------------------------------------------------


@pytest.mark.parametrize("split", ["val", "test"])
def test_class_folder_missing_from_train_is_an_error_naming_it(tmp_path, split):
    root = three_splits(tmp_path / "images")
    corpus.class_tree(root / split, {"horse": 2}, seed=9)
    cfg = cfg_for(tmp_path, root)
    with pytest.raises(StageError) as err:
        prepare.run(cfg)
    message = str(err.value)
    assert f"{split}/horse/: 2 image(s) of class 'horse'" in message
    assert "cats, dogs" in message and "dataset.unknown_labels=drop" in message
    assert not prepared(tmp_path).exists() and leftovers(tmp_path) == []


def test_csv_labels_missing_from_train_name_the_csv_line(tmp_path):
    root = tmp_path / "images"
    rows = csv_tree(root, ["cats", "dogs", "horse", "Cats"])
    corpus.labels_csv(root / "Test.csv", rows)
    cfg = cfg_for(tmp_path, root, "dataset.test_labels_csv=Test.csv")
    with pytest.raises(StageError) as err:
        prepare.run(cfg)
    message = str(err.value)
    assert "2 val/test image(s)" in message
    assert "Test.csv line 4: test/0002.png labelled 'horse'" in message
    assert "Test.csv line 5: test/0003.png labelled 'Cats' (did you mean 'cats'?)" in message
    assert "dataset.unknown_labels=drop" in message


def test_unknown_labels_dropped_on_request_and_counted(tmp_path):
    root = tmp_path / "images"
    rows = csv_tree(root, ["cats", "dogs", "horse", "Cats", "dogs"])
    corpus.labels_csv(root / "Test.csv", rows)
    cfg = cfg_for(tmp_path, root, "dataset.test_labels_csv=Test.csv", "dataset.unknown_labels=drop")
    info = prepare.run(cfg)
    assert info["classes"] == ["cats", "dogs"] and info["counts"]["test"] == 3
    assert info["report"]["unknown_labels_dropped"] == 2
    report = json.loads((prepared(tmp_path) / "report.json").read_text())
    assert [(e["source"], e["label"]) for e in report["unknown_labels_dropped"]] == [
        ("Test.csv line 4", "horse"),
        ("Test.csv line 5", "Cats"),
    ]
    manifest = pd.read_csv(prepared(tmp_path) / "manifest.csv")
    assert set(manifest["class"]) == {"cats", "dogs"}


def test_unknown_class_folder_dropped_on_request(tmp_path):
    root = three_splits(tmp_path / "images")
    corpus.class_tree(root / "test", {"horse": 3}, seed=9)
    info = prepare.run(cfg_for(tmp_path, root, "dataset.unknown_labels=drop"))
    assert info["classes"] == ["cats", "dogs"] and info["counts"] == {"train": 8, "val": 2, "test": 4}
    assert info["report"]["unknown_labels_dropped"] == 3


def test_repeated_csv_rows_are_reported_and_kept_once(tmp_path, caplog):
    root = tmp_path / "images"
    rows = csv_tree(root, ["cats", "dogs", "cats", "dogs"])
    corpus.labels_csv(root / "Test.csv", [*rows, rows[1]])
    cfg = cfg_for(tmp_path, root, "dataset.test_labels_csv=Test.csv")
    with caplog.at_level(logging.WARNING, logger="src.stages.prepare"):
        info = prepare.run(cfg)
    assert info["counts"]["test"] == 4 and info["report"]["csv_duplicate_rows"] == 1
    assert "repeats 1 row(s)" in caplog.text and "test/0001.png (dogs): lines 3 and 6" in caplog.text
    report = json.loads((prepared(tmp_path) / "report.json").read_text())
    assert report["csv_duplicate_rows"][0]["lines"] == [3, 6]


def test_conflicting_csv_rows_are_an_error_naming_lines_and_path(tmp_path):
    root = tmp_path / "images"
    rows = csv_tree(root, ["cats", "dogs", "cats"])
    corpus.labels_csv(root / "Test.csv", [*rows, (rows[0][0], "dogs")])
    cfg = cfg_for(tmp_path, root, "dataset.test_labels_csv=Test.csv")
    with pytest.raises(StageError) as err:
        prepare.run(cfg)
    message = str(err.value)
    assert "Test.csv" in message and "test/0000.png: 'cats' on line 2, 'dogs' on line 5" in message
    assert not prepared(tmp_path).exists()


def test_empty_training_class_folder_is_not_a_class(tmp_path, caplog):
    root = three_splits(tmp_path / "images")
    (root / "train" / "horse").mkdir()
    (root / "train" / "horse" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with caplog.at_level(logging.WARNING, logger="src.stages.prepare"):
        info = prepare.run(cfg_for(tmp_path, root))
    assert info["classes"] == ["cats", "dogs"] and info["report"]["empty_class_folders"] == 1
    assert "class folder train/horse/ has no images: not a class" in caplog.text
    corpus.class_tree(root / "test", {"horse": 1}, seed=9)
    with pytest.raises(StageError, match=r"test/horse/.*the training folder horse/ has no images"):
        prepare.run(cfg_for(tmp_path, root))


def test_class_without_test_images_is_reported(tmp_path, caplog):
    root = three_splits(tmp_path / "images", test={"cats": 2})
    with caplog.at_level(logging.WARNING, logger="src.stages.prepare"):
        info = prepare.run(cfg_for(tmp_path, root))
    assert info["report"]["classes_without_test"] == ["dogs"]
    assert "1 class(es) have no test images: dogs" in caplog.text
    report = json.loads((prepared(tmp_path) / "report.json").read_text())
    assert report["classes_missing"] == {"train": [], "val": [], "test": ["dogs"]}


def test_hidden_files_and_folders_are_skipped_at_every_depth(tmp_path):
    root = corpus.class_tree(tmp_path / "images", CLASSES)
    corpus.image(root / "cats" / ".ipynb_checkpoints" / "cats0-checkpoint.png", seed=50)
    corpus.image(root / "cats" / "nested" / ".cache" / "thumb.png", seed=51)
    corpus.image(root / ".ipynb_checkpoints" / "dogs" / "dogs0.png", seed=52)
    corpus.appledouble(root / "dogs" / "._dogs0.png")
    (root / "dogs" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    corpus.image(root / "dogs" / "nested" / "dogs_extra.png", seed=53)  # visible: still counted
    info = prepare.run(cfg_for(tmp_path, root))
    assert sum(info["counts"].values()) == 9 and info["skipped"] == 0
    manifest = pd.read_csv(prepared(tmp_path) / "manifest.csv")
    assert not manifest["path"].str.contains("/.", regex=False).any()
    assert manifest["path"].str.endswith("dogs_extra.png").sum() == 1


# --- identical files in two splits ---------------------------------------------------------


def leaky_tree(root: Path) -> Path:
    """Three splits where train/cats/cats0.png is copied into val (as a dog) and test, and
    train/dogs/dogs0.png is copied within train."""
    three_splits(root)
    original = root / "train" / "cats" / "cats0.png"
    shutil.copyfile(original, root / "val" / "dogs" / "copy.png")
    shutil.copyfile(original, root / "test" / "cats" / "copy.png")
    shutil.copyfile(root / "train" / "dogs" / "dogs0.png", root / "train" / "dogs" / "dup.png")
    return root


def test_leakage_across_splits_is_listed_and_warned(tmp_path, caplog):
    root = leaky_tree(tmp_path / "images")
    with caplog.at_level(logging.WARNING, logger="src.stages.prepare"):
        info = prepare.run(cfg_for(tmp_path, root))
    assert info["counts"] == {"train": 9, "val": 3, "test": 5}
    assert info["report"]["leakage_images"] == 2 and info["report"]["leakage_groups"] == 1
    assert info["report"]["leakage_dropped"] == 0 and info["report"]["duplicates_within_split"] == 1
    assert "leakage: 2 val/test image(s)" in caplog.text and "dataset.leakage=drop" in caplog.text
    leakage = pd.read_csv(prepared(tmp_path) / "leakage.csv")
    digest = hashlib.blake2b((root / "train" / "cats" / "cats0.png").read_bytes(), digest_size=16).hexdigest()
    assert list(leakage.columns) == ["hash", "split", "path"]
    assert sorted(leakage.itertuples(index=False, name=None)) == [
        (digest, "test", "test/cats/copy.png"),
        (digest, "train", "train/cats/cats0.png"),
        (digest, "val", "val/dogs/copy.png"),
    ]
    for key in ("classes", "image_size", "fingerprint", "counts", "skipped", "cache_key", "report"):
        assert key in json.loads((prepared(tmp_path) / "info.json").read_text())
    assert json.loads((prepared(tmp_path) / "report.json").read_text())["summary"] == info["report"]


def test_leakage_drop_removes_copies_from_val_and_test(tmp_path):
    root = leaky_tree(tmp_path / "images")
    info = prepare.run(cfg_for(tmp_path, root, "dataset.leakage=drop"))
    assert info["counts"] == {"train": 9, "val": 2, "test": 4}
    assert info["report"]["leakage_dropped"] == 2
    manifest = pd.read_csv(prepared(tmp_path) / "manifest.csv")
    assert manifest[manifest.path.str.contains("copy")].empty
    assert "train/cats/cats0.png" in set(manifest.path)
    assert len(pd.read_csv(prepared(tmp_path) / "leakage.csv")) == 3


def test_leakage_drop_that_empties_a_split_is_an_error(tmp_path):
    root = three_splits(tmp_path / "images", test={"cats": 1})
    shutil.copyfile(root / "train" / "cats" / "cats0.png", root / "test" / "cats" / "cats0.png")
    with pytest.raises(
        StageError, match=r"split 'test' has no images left: of its 1 files, 1 dropped as copies"
    ):
        prepare.run(cfg_for(tmp_path, root, "dataset.leakage=drop"))
    assert not prepared(tmp_path).exists() and leftovers(tmp_path) == []


# --- memory and disk -----------------------------------------------------------------------


def test_max_pixels_caps_the_size_really_decoded(tmp_path):
    root = corpus.class_tree(tmp_path / "images", CLASSES)
    Image.new("RGB", (1100, 1000), (10, 200, 30)).save(root / "cats" / "wide.png")  # 1.1 MP
    Image.new("RGB", (4000, 400), (10, 20, 230)).save(root / "dogs" / "big.jpg")  # 1.6 MP, 1/8: 500x50
    Image.new("RGB", (30000, 40), (200, 20, 30)).save(root / "dogs" / "strip.jpg")  # 1.2 MP, no smaller
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = prepare.run(cfg_for(tmp_path, root, "dataset.max_pixels=1000000"))
    assert not [w for w in caught if "DecompressionBomb" in w.category.__name__]
    skipped = pd.read_csv(prepared(tmp_path) / "skipped.csv")
    reasons = dict(zip(skipped.path.map(lambda p: Path(p).name), skipped.reason))
    assert sorted(reasons) == ["strip.jpg", "wide.png"]
    assert "1100x1000 = 1,100,000 pixels" in reasons["wide.png"]
    assert "dataset.max_pixels=1000000" in reasons["wide.png"]
    assert reasons["strip.jpg"].startswith("ImageTooLarge: 30000x40")
    assert "(after reduced-size JPEG decoding)" in reasons["strip.jpg"]
    manifest = pd.read_csv(prepared(tmp_path) / "manifest.csv")
    assert manifest.path.str.endswith("big.jpg").sum() == 1
    assert info["report"]["too_large"] == 2 and info["skipped"] == 2


MEASURE = """
import json, sys
from omegaconf import OmegaConf
from src.data import memory
from src.stages import prepare
info = prepare.run(OmegaConf.load(sys.argv[1]))
status = open("/proc/self/status").read().split("\\n")
peak_kb = int(next(line for line in status if line.startswith("VmHWM")).split()[1])
print(json.dumps({"peak_kb": peak_kb, "info": info}))
"""


def test_decompression_bomb_png_is_skipped_in_bounded_memory(tmp_path):
    root = corpus.class_tree(tmp_path / "images", CLASSES)
    corpus.bomb_png(root / "cats" / "bomb.png")  # 13000 x 13000 RGBA: 676 MB decoded
    cfg = cfg_for(tmp_path, root)
    OmegaConf.save(cfg, tmp_path / "params.yaml")
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "params.yaml")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "DecompressionBomb" not in done.stderr and "Traceback" not in done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["info"]["skipped"] == 1 and sum(result["info"]["counts"].values()) == 8
    skipped = pd.read_csv(prepared(tmp_path) / "skipped.csv")
    assert skipped.path.str.endswith("bomb.png").tolist() == [True]
    assert "13000x13000 = 169,000,000 pixels" in skipped.reason[0]
    assert "dataset.max_pixels=40000000" in skipped.reason[0]
    assert result["peak_kb"] < 1_500_000, f"peak memory {result['peak_kb']} kB"


@pytest.mark.parametrize(
    ("cpus", "ram", "workers"),
    [(16, None, 4), (16, 10**12, 4), (16, 5 * 480_000_000 // 2, 2), (16, 10**6, 1), (1, 10**12, 1)],
)
def test_decode_workers_fit_in_memory(monkeypatch, cpus, ram, workers):
    monkeypatch.setattr(memory, "_cpu_count", lambda: cpus)
    monkeypatch.setattr(memory, "_available_memory", lambda: ram)
    assert memory.decode_workers(40_000_000) == workers


def test_available_memory_is_read_from_the_system():
    available = memory._available_memory()
    assert available is not None and available > 0


def test_decoding_uses_the_memory_bounded_worker_count(tmp_path, monkeypatch):
    pools = []

    class Recording(decoding.ThreadPoolExecutor):
        def __init__(self, max_workers):
            pools.append(max_workers)
            super().__init__(max_workers=max_workers)

    monkeypatch.setattr(decoding, "ThreadPoolExecutor", Recording)
    monkeypatch.setattr(memory, "_available_memory", lambda: 480_000_000)  # one 40 MP image
    root = corpus.class_tree(tmp_path / "images", CLASSES)
    prepare.run(cfg_for(tmp_path, root))
    assert pools == [1, 1, 1]


def test_short_disk_is_refused_before_any_array_is_written(tmp_path, monkeypatch):
    root = corpus.class_tree(tmp_path / "images", CLASSES)
    cfg = cfg_for(tmp_path, root)
    before = prepare.run(cfg)
    seen = []
    Usage = namedtuple("Usage", "total used free")

    def full_disk(folder):
        seen.append(sorted(p.name for p in Path(folder).iterdir() if p.suffix == ".npy"))
        return Usage(10**12, 10**12 - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", full_disk)
    with pytest.raises(StageError) as err:
        prepare.run(cfg)
    message = str(err.value)
    assert "not enough disk space in" in message and str(tmp_path / "work") in message
    assert "1,000 bytes are available" in message and "dataset.image_size" in message
    assert seen == [[]]
    assert json.loads((prepared(tmp_path) / "info.json").read_text()) == before
    assert leftovers(tmp_path) == []


# --- an empty split stops the stage --------------------------------------------------------


def test_split_left_empty_by_unreadable_files_is_an_error_and_keeps_the_old_output(tmp_path):
    root = tmp_path / "images"
    rows = csv_tree(root, ["cats", "dogs", "cats"])
    corpus.labels_csv(root / "Test.csv", rows)
    cfg = cfg_for(tmp_path, root, "dataset.test_labels_csv=Test.csv")
    before = prepare.run(cfg)
    corpus.truncated_jpeg(root / "test" / "0000.png")
    corpus.appledouble(root / "test" / "0001.png")
    corpus.text_file(root / "test" / "0002.png")
    with pytest.raises(StageError) as err:
        prepare.run(cfg)
    message = str(err.value)
    skipped_csv = tmp_path / "work" / "reports" / "prepare_skipped.csv"
    assert "split 'test' has no images left" in message and "3 could not be read" in message
    assert str(skipped_csv) in message
    assert len(pd.read_csv(skipped_csv)) == 3
    assert json.loads((prepared(tmp_path) / "info.json").read_text()) == before
    assert len(pd.read_csv(prepared(tmp_path) / "manifest.csv").query("split == 'test'")) == 3
    assert leftovers(tmp_path) == []
