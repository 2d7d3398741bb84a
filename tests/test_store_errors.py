"""A locked or broken MLflow store: tried again while it is locked, then one line naming the
store instead of a driver's traceback, also from the evaluate stage."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from src.config.compose import compose
from src.stages import evaluate
from src.tracking import store
from tests.test_tracking_keys import scratch_cfg, tiny_model, write_prepared


def cfg_with_store(tmp_path, uri: str):
    return compose(["model=small_cnn", "model.weights=null", "finetune=none", f"tracking.uri={uri}"])


def test_a_file_that_is_no_database_is_one_line_naming_the_store(tmp_path):
    broken = tmp_path / "mlflow.db"
    broken.write_bytes(b"this is no sqlite database\n" * 100)
    cfg = cfg_with_store(tmp_path, f"sqlite:///{broken}")
    start = time.monotonic()
    with pytest.raises(store.StoreError) as err:
        store.reach_store(cfg, tries=2)
    message = str(err.value)
    assert message.startswith(f"the MLflow store sqlite:///{broken} failed after 2 tries (")
    assert "\n" not in message and time.monotonic() - start >= 1  # one pause between the tries


def test_a_store_locked_for_a_moment_is_reached_on_a_later_try(tmp_path):
    db = tmp_path / "mlflow.db"
    cfg = cfg_with_store(tmp_path, f"sqlite:///{db}")
    store.reach_store(cfg)  # creates the store and the experiment
    holder = sqlite3.connect(db, timeout=0, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing: readers wait, then give up
    timer = threading.Timer(6.0, holder.rollback)
    timer.start()
    try:
        assert store.reach_store(cfg, tries=4)  # the lock is gone by the third try
    finally:
        timer.cancel()
        holder.close()


def test_evaluate_on_a_broken_store_ends_with_the_line_not_a_traceback(tmp_path, monkeypatch):
    cfg = scratch_cfg(tmp_path, "tracking.registered_model=null")
    write_prepared(cfg, ["cats", "dogs"], per_class=2)
    models = tmp_path / "work" / "models"
    models.mkdir(parents=True)
    tiny_model(2).save(models / "final.keras")
    (tmp_path / "mlflow.db").write_bytes(b"\0broken\0" * 512)  # after the experiment was made
    monkeypatch.setattr(store, "STORE_TRIES", 2)
    with pytest.raises(store.StoreError, match=r"^the MLflow store sqlite:///.*mlflow.db failed"):
        evaluate.run(cfg)
