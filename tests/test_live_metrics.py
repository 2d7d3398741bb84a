"""Epoch metrics reach MLflow while training runs, and the stages (separate processes under
`dvc repro`, found again by the run's `pipeline_key`) share one run without logging an epoch twice."""

from __future__ import annotations

import pytest

from src.data import arrays
from src.models import networks
from src.stages import stage
from src.tracking import live_metrics, store
from src.train import STAGES
from tests.conftest import make_cfg, require_shared


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """The ci preset's prepared data and VGG16 features."""
    require_shared()
    tmp = tmp_path_factory.mktemp("live")
    cfg = make_cfg(tmp, "head.epochs=2", "finetune.epochs=2", "train.precision=float32")
    for name, run in STAGES[:3]:
        stage.timed_run(name, run, cfg)
    return cfg


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_each_epoch_is_in_the_store_when_it_ends(features):
    import keras
    from mlflow import MlflowClient

    cfg = features
    x, y = arrays.load_features(cfg, "train")
    x_val, y_val = arrays.load_features(cfg, "val")
    model = networks.head(cfg.head, x.shape[1:], 2)
    networks.compile_model(model, 2, "adam", 1e-3)
    live = live_metrics.callback(cfg, "head")
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    seen: list[list[int]] = []

    class Probe(keras.callbacks.Callback):  # reads the store as the UI would, mid-training
        def on_epoch_end(self, epoch, logs=None):
            run = live_metrics.running_run(cfg)
            seen.append([step for step, _ in history(client, run.info.run_id, "head.val_loss")])

    fitted = model.fit(x, y, validation_data=(x_val, y_val), epochs=3, callbacks=[live, Probe()], verbose=0)
    assert seen == [[1], [1, 2], [1, 2, 3]]
    run = live_metrics.running_run(cfg)
    assert run.data.tags[live_metrics.KEY_TAG] == live_metrics.pipeline_key(cfg)
    assert run.data.tags["mlflow.runName"].startswith("ci ")
    logged = [value for _, value in history(client, run.info.run_id, "head.val_accuracy")]
    assert logged == pytest.approx(fitted.history["val_accuracy"])
    client.set_terminated(run.info.run_id, "KILLED")  # leave no open run to the next test


def test_the_stages_share_one_run_and_log_each_epoch_once(features):
    from mlflow import MlflowClient

    cfg = features
    results = {name: stage.timed_run(name, run, cfg) for name, run in STAGES[3:]}
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run_id = results["evaluate"]["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["live.head"] == run.data.tags["live.finetune"] == "true"
    assert [s for s, _ in history(client, run_id, "head.loss")] == [1, 2]  # not twice
    assert [s for s, _ in history(client, run_id, "finetune.val_loss")] == [3, 4]  # on after the head's
    assert "test.accuracy" in run.data.metrics
    assert live_metrics.running_run(cfg) is None

    # a stage that runs again for the same config opens a new run; the one it left stays whole
    again = stage.timed_run("finetune", STAGES[4][1], cfg)
    assert again["epochs"] == 2
    reopened = live_metrics.running_run(cfg)
    assert reopened is not None and reopened.info.run_id != run_id
    assert [s for s, _ in history(client, reopened.info.run_id, "finetune.loss")] == [1, 2]
    assert [s for s, _ in history(client, run_id, "finetune.loss")] == [3, 4]


def test_no_tracking_no_callback(features, tmp_path):
    cfg = make_cfg(tmp_path, "tracking.enabled=false")
    assert live_metrics.callback(cfg, "head") is None
    assert store.tracking_uri(cfg).startswith("sqlite:///")
