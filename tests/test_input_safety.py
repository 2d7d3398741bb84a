"""Inputs that must not slip through: label CSV rows naming files outside the dataset, file and
folder names that are not valid UTF-8, a file rewritten in place with its mtime set back."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pandas as pd
import pytest

from src.config.checks import validate
from src.config.compose import compose
from src.data import layouts
from src.errors import StageError
from src.outputs import hashing
from src.stages import download, prepare
from tests import corpus
from tests.conftest import path_overrides, small_images

SPLITS = {"train": {"cats": 4, "dogs": 4}, "val": {"cats": 1, "dogs": 1}, "test": {"cats": 2, "dogs": 2}}


def cfg_for(tmp_path: Path, root: Path, *overrides: str):
    """The `folder` dataset at `root`, 32 px, every output under tmp_path/work."""
    return validate(
        compose(
            [
                *small_images(root),
                *path_overrides(tmp_path / "work"),
                *overrides,
            ]
        )
    )


def flat_csv_tree(root: Path) -> list[tuple[str, str]]:
    """Class folders under train/, a flat test/ folder; returns its (path, label) rows."""
    corpus.split_tree(root, {"train": {"cats": 3, "dogs": 3}})
    return corpus.flat_test(root, ["cats", "dogs"])


def bytes_name(folder: Path, name: bytes) -> bytes:
    """The path (as bytes) of `name` in `folder`: a name that need not be valid UTF-8."""
    return os.path.join(os.fsencode(folder), name)


# --- label CSV rows stay inside the dataset ------------------------------------------------


def test_label_csv_row_with_an_absolute_path_is_refused(tmp_path):
    root = tmp_path / "images"
    rows = flat_csv_tree(root)
    secret = corpus.image(tmp_path / "elsewhere" / "secret.png", seed=99)
    corpus.labels_csv(root / "Test.csv", [*rows, (str(secret), "cats")])
    with pytest.raises(StageError) as err:
        layouts.scan_source(root, "Test.csv")
    message = str(err.value)
    assert str(root / "Test.csv") in message and "line 4" in message and str(secret) in message
    assert "relative to the folder the CSV describes" in message


@pytest.mark.parametrize("rel", ["../elsewhere/secret.png", "test/../../elsewhere/secret.png"])
def test_label_csv_row_climbing_out_of_the_dataset_is_refused(tmp_path, rel):
    root = tmp_path / "images"
    rows = flat_csv_tree(root)
    corpus.image(tmp_path / "elsewhere" / "secret.png", seed=99)
    corpus.labels_csv(root / "Test.csv", [(rel, "dogs"), *rows])
    with pytest.raises(StageError, match="outside the dataset") as err:
        layouts.scan_source(root, "Test.csv")
    assert "Test.csv" in str(err.value) and "line 2" in str(err.value) and rel in str(err.value)


def test_label_csv_dotdot_that_stays_inside_is_read_as_the_normalised_path(tmp_path):
    """A CSV inside test/ may name `../test/x.png` (relative to its own folder): still inside."""
    root = tmp_path / "images"
    (rel0, label0), (rel1, label1) = flat_csv_tree(root)
    name0, name1 = Path(rel0).name, Path(rel1).name
    corpus.labels_csv(root / "test" / "labels.csv", [(name0, label0), (f"../test/{name1}", label1)])
    scan = layouts.scan_source(root, "test/labels.csv")
    assert scan.found["test"] == [(label0, root / rel0), (label1, root / rel1)]


def test_label_csv_in_a_symlinked_test_folder_from_shared_storage_still_works(tmp_path):
    """test/ linked from outside the dataset: rows name paths inside the dataset (through the
    link), so they are read although the files' real paths lie elsewhere."""
    store = tmp_path / "shared"
    rows = flat_csv_tree(store)
    root = tmp_path / "images"
    corpus.split_tree(root, {"train": {"cats": 3, "dogs": 3}})
    os.symlink(store / "test", root / "test")
    corpus.labels_csv(root / "test" / "Test.csv", [(Path(rel).name, label) for rel, label in rows])
    corpus.labels_csv(root / "Test.csv", rows)
    for csv_name in ("Test.csv", "test/Test.csv"):
        scan = layouts.scan_source(root, csv_name)
        assert scan.found["test"] == [(label, root / rel) for rel, label in rows]


def test_prepare_refuses_an_escaping_csv_row_and_writes_nothing(tmp_path):
    root = tmp_path / "images"
    rows = flat_csv_tree(root)
    corpus.image(tmp_path / "elsewhere" / "secret.png", seed=99)
    corpus.labels_csv(root / "Test.csv", [*rows, ("../elsewhere/secret.png", "cats")])
    cfg = cfg_for(tmp_path, root, "dataset.test_labels_csv=Test.csv")
    download.run(cfg)
    with pytest.raises(StageError, match="line 4: '../elsewhere/secret.png'"):
        prepare.run(cfg)
    assert not (tmp_path / "work" / "prepared").exists()


# --- names that are not valid UTF-8 ------------------------------------------------------


def test_non_utf8_file_names_are_fingerprinted_and_prepared(tmp_path):
    root = corpus.split_tree(tmp_path / "images", SPLITS)
    os.rename(root / "train" / "cats" / "cats0.png", bytes_name(root / "train" / "cats", b"caf\xe9.png"))
    corpus.truncated_jpeg(root / "train" / "cats" / "bad.jpg")
    os.rename(root / "train" / "cats" / "bad.jpg", bytes_name(root / "train" / "cats", b"b\xe4d.jpg"))
    for split in SPLITS:  # a class folder whose name is not UTF-8: its class shown escaped
        os.rename(root / split / "dogs", bytes_name(root / split, b"d\xf6gs"))
    cfg = cfg_for(tmp_path, root)
    source, info = download.run(cfg), prepare.run(cfg)
    assert source["files"] == 15
    assert info["counts"] == {"train": 8, "val": 2, "test": 4}
    out = tmp_path / "work" / "prepared"
    manifest = pd.read_csv(out / "manifest.csv")
    assert "train/cats/caf\\xe9.png" in set(manifest["path"])
    assert "val/d\\xf6gs/dogs0.png" in set(manifest["path"])
    assert set(manifest["class"]) == {"cats", "d\\xf6gs"}
    assert pd.read_csv(out / "skipped.csv")["path"].str.endswith("train/cats/b\\xe4d.jpg").all()
    # the name is part of the fingerprint, as its bytes: a renamed file changes it
    again = download.run(cfg)["fingerprint"]
    assert again == source["fingerprint"]
    os.rename(
        bytes_name(root / "train" / "cats", b"caf\xe9.png"),
        bytes_name(root / "train" / "cats", b"caf\xe8.png"),
    )
    assert download.run(cfg)["fingerprint"] != source["fingerprint"]


def test_fingerprint_of_utf8_names_is_their_utf8_bytes(tmp_path):
    """Names that are valid UTF-8 enter the fingerprint as before: their UTF-8 bytes."""
    root = tmp_path / "images"
    corpus.text_file(root / "café" / "ünï.txt", "x")
    db = tmp_path / "h.sqlite"
    files, digest = download.fingerprint(root, db)
    content = hashing.file_digest(root / "café" / "ünï.txt", db)
    assert (files, digest) == (1, hashlib.sha256(f"café/ünï.txt|{content}\n".encode()).hexdigest())


def test_hash_store_remembers_a_non_utf8_path(tmp_path):
    path = Path(os.fsdecode(bytes_name(tmp_path, b"caf\xe9.bin")))
    path.write_bytes(b"one")
    db = tmp_path / "hashes.sqlite"
    first = hashing.file_digest(path, db)
    assert hashing.file_digest(path, db) == first
    path.write_bytes(b"two!")
    assert hashing.file_digest(path, db) != first


# --- the hash store notices a rewrite with the mtime set back ----------------------------


def test_rewrite_in_place_with_mtime_restored_gets_a_new_digest(tmp_path):
    path = tmp_path / "img.bin"
    path.write_bytes(b"AAAA" * 256)
    db = tmp_path / "hashes.sqlite"
    first = hashing.file_digest(path, db)
    before = path.stat()
    deadline = time.monotonic() + 3
    while True:  # the kernel's ctime clock may tick coarsely: rewrite until it has moved
        time.sleep(0.01)
        with open(path, "r+b") as f:  # same inode, same size, other bytes
            f.write(b"BBBB" * 256)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = path.stat()
        if after.st_ctime_ns != before.st_ctime_ns or time.monotonic() > deadline:
            break
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    assert after.st_ctime_ns != before.st_ctime_ns
    assert hashing.file_digest(path, db) != first
    assert hashing.file_digest(path, db) == hashing.file_digest(path, tmp_path / "fresh.sqlite")


def test_a_store_of_the_older_schema_is_left_alone_and_still_works(tmp_path):
    db = tmp_path / "hashes.sqlite"
    con = sqlite3.connect(db)
    con.execute(
        "CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER,"
        " sha256 TEXT)"
    )
    path = corpus.text_file(tmp_path / "f.txt", "one")
    st = path.resolve().stat()
    with con:
        con.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?)",
            (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, "0" * 64),
        )
    con.close()
    assert hashing.file_digest(path, db) == hashing.file_digest(path, tmp_path / "fresh.sqlite") != "0" * 64
