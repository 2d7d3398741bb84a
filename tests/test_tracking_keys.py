"""After training: class names MLflow would refuse as metric keys, and evaluate on an empty test
split or without a validation accuracy. Real Keras models, a real MLflow SQLite store under
tmp_path, prepared arrays written as `prepare` writes them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.config.compose import compose
from src.errors import StageError
from src.stages import evaluate
from src.tracking import pipeline_run, store
from tests.conftest import scratch_overrides

SIZE = 16
AWKWARD = ["cats", "dogs, big (2)", "a,b", "a(b", "a_b"]
# what the installed MLflow accepts on every platform, minus spaces and colons
MLFLOW_KEY = re.compile(r"^[/\w.\-]+$")


def tiny_model(n_classes: int):
    """A real (untrained) Keras classifier of SIZE px images."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    two = n_classes == 2
    outputs = keras.layers.Dense(1 if two else n_classes, activation="sigmoid" if two else "softmax")(x)
    return keras.Model(inputs, outputs)


def scratch_cfg(tmp_path: Path, *overrides: str):
    """The from-scratch model (no features) with every output and the MLflow store (with its
    artifacts, rather than in the working directory's mlruns/) under tmp_path."""
    cfg = compose([*scratch_overrides(tmp_path, SIZE), *overrides])
    if cfg.tracking.enabled:
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking.uri)
        location = (tmp_path / "artifacts").as_uri()
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    return cfg


def write_prepared(cfg, classes: list[str], per_class: int) -> Path:
    """The files `prepare` leaves for evaluate: test images and labels, classes, counts, info."""
    folder = Path(cfg.paths.prepared)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(classes), dtype=np.int32), per_class)
    np.save(folder / "images_test.npy", rng.integers(0, 256, (len(labels), SIZE, SIZE, 3), dtype=np.uint8))
    np.save(folder / "labels_test.npy", labels)
    (folder / "classes.json").write_text(json.dumps(classes))
    counts = pd.DataFrame({"train": 0, "val": 0, "test": per_class}, index=pd.Index(classes, name="class"))
    counts.to_csv(folder / "counts.csv")
    pd.DataFrame(columns=["split", "path", "reason"]).to_csv(folder / "skipped.csv", index=False)
    (folder / "info.json").write_text(json.dumps({"classes": classes, "fingerprint": "0123abcd"}))
    return folder


def artifact_json(client, run_id: str, name: str, dest: Path):
    return json.loads(Path(client.download_artifacts(run_id, name, str(dest))).read_text())


def test_safe_keys_are_valid_distinct_and_stable():
    keys = [f"test.f1.{c}" for c in AWKWARD] + ["head.val_loss", "x:y", "a//b", "../up", "k" * 300]
    names = store.safe_keys(keys)
    assert names["test.f1.dogs, big (2)"] == "test.f1.dogs__big__2_"
    assert names["test.f1.a_b"] == "test.f1.a_b" and names["head.val_loss"] == "head.val_loss"
    assert names["test.f1.a,b"].startswith("test.f1.a_b_") and names["test.f1.a(b"].startswith("test.f1.a_b_")
    assert len(set(names.values())) == len(keys)
    assert all(MLFLOW_KEY.match(v) and len(v) <= 250 for v in names.values())
    assert all(not v.startswith(("/", "..")) and "//" not in v for v in names.values())
    assert store.safe_keys(reversed(keys)) == names  # the same names whatever the order
    assert store.renamed(names)["test.f1.dogs__big__2_"] == "test.f1.dogs, big (2)"


def test_log_pipeline_run_with_class_names_mlflow_refuses(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("DVC_EXP_NAME", "exp-lucky-cat")
    cfg = scratch_cfg(tmp_path)
    history = tmp_path / "history.csv"
    pd.DataFrame({"epoch": [1], "loss": [0.7], "val_loss": [0.6], "val accuracy (%)": [55.0]}).to_csv(
        history, index=False
    )
    classes_file = tmp_path / "classes.json"
    classes_file.write_text(json.dumps(AWKWARD))
    metrics = {"test.accuracy": 0.5, **{f"test.f1.{c}": 0.1 * i for i, c in enumerate(AWKWARD)}}
    logged = pipeline_run.log_pipeline_run(
        cfg,
        model=tiny_model(len(AWKWARD)),
        classes=AWKWARD,
        metrics=metrics,
        histories={"head": history},
        artifacts=[classes_file],
        fingerprint="0123abcd",
        image_size=SIZE,
    )
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(logged["run_id"])
    assert run.info.status == "FINISHED"
    # named by what differs from the defaults, never by where things are; tagged by `dvc exp run`
    assert run.info.run_name.startswith("default ") and run.info.run_name.endswith(" " + run.info.run_id[:8])
    assert "dataset.image_size=16" in run.info.run_name and "model.name=small_cnn" in run.info.run_name
    assert "paths." not in run.info.run_name and "tracking." not in run.info.run_name
    assert run.data.tags["dvc.exp_name"] == "exp-lucky-cat"
    assert run.data.metrics["test.f1.dogs__big__2_"] == pytest.approx(0.1)
    assert run.data.metrics["test.f1.a_b"] == pytest.approx(0.4) and run.data.metrics["test.accuracy"] == 0.5
    assert len(run.data.metrics) == len(metrics) + 3  # plus the head's curves
    assert [m.step for m in client.get_metric_history(run.info.run_id, "head.val_accuracy____")] == [1]
    assert all(MLFLOW_KEY.match(k) for k in run.data.metrics)
    back = artifact_json(client, run.info.run_id, "metric_names.json", tmp_path)
    assert set(back.values()) == {f"test.f1.{c}" for c in AWKWARD if c not in ("cats", "a_b")}
    assert set(back) <= set(run.data.metrics) and back["test.f1.dogs__big__2_"] == "test.f1.dogs, big (2)"
    assert artifact_json(client, run.info.run_id, "classes.json", tmp_path) == AWKWARD  # the real names
    assert "param_names.json" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    model = mlflow.keras.load_model(logged["keras_model_uri"])
    assert model.input_shape == (None, SIZE, SIZE, 3)
    assert mlflow.models.get_model_info(logged["model_uri"]).metadata["classes"] == AWKWARD
    frame = mlflow.pyfunc.load_model(logged["model_uri"]).predict(np.zeros((2, SIZE, SIZE, 3), np.uint8))
    assert list(frame.columns) == ["class", "probability", *(f"p_{c}" for c in AWKWARD)]  # the real names
    assert set(frame["class"]) <= set(AWKWARD)
    assert client.search_registered_models() == []  # registered_model null: logged, not registered


def test_evaluate_refuses_an_empty_test_split_before_loading_models(tmp_path):
    cfg = scratch_cfg(tmp_path, "tracking.enabled=false")
    write_prepared(cfg, ["cats", "dogs"], per_class=0)  # and no model at all: it must not get that far
    with pytest.raises(StageError, match=r"split 'test' in .*prepared holds no images"):
        evaluate.run(cfg)
    empty = np.zeros((0, SIZE, SIZE, 3), np.uint8)
    with pytest.raises(StageError, match="holds no images"):
        evaluate.score(tiny_model(2), empty, np.zeros(0, np.int32), 2, 8)


def test_evaluate_without_a_validation_accuracy(tmp_path):
    """No epoch trained: `val` is None, everything else is written and logged."""
    from mlflow import MlflowClient

    cfg = scratch_cfg(tmp_path)
    classes = ["cats", "dogs, big (2)", "a(b"]
    write_prepared(cfg, classes, per_class=3)
    models_dir = Path(cfg.paths.models)
    models_dir.mkdir(parents=True)
    tiny_model(len(classes)).save(models_dir / "final.keras")
    reports = Path(cfg.paths.reports)
    (reports / "head").mkdir(parents=True)
    pd.DataFrame(columns=["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]).to_csv(
        reports / "head" / "history.csv", index=False
    )
    best = {"epoch": None, "val_loss": None, "val_accuracy": None}
    (reports / "train_head.json").write_text(json.dumps({"epochs": 0, "best": best, "seconds": 1.0}))
    result = evaluate.run(cfg)
    assert result["val"] is None and set(result["per_class"]) == set(classes)
    metrics = json.loads((reports / "metrics.json").read_text())
    assert "val" not in metrics and metrics["test"]["accuracy"] == pytest.approx(1 / 3)
    report = pd.read_csv(reports / "classification_report.csv", index_col=0)
    assert set(classes) <= set(report.index)  # the real names in the report
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and "val.accuracy" not in run.data.metrics
    assert {"test.f1.cats", "test.f1.dogs__big__2_", "test.f1.a_b"} <= set(run.data.metrics)
    nan = {"epochs": 1, "best": {"epoch": 1, "val_loss": None, "val_accuracy": float("nan")}}
    (reports / "finetune.json").write_text(json.dumps(nan))
    assert evaluate.val_accuracy(cfg) is None  # not a number: no value rather than NaN in metrics.json


def test_varied_settings_are_the_overrides_of_the_preset_not_the_paths():
    cfg = compose(["experiment=ci", "finetune.layers=2", "head.dropout=0.3", "paths.models=/tmp/elsewhere"])
    assert store.varied_settings(cfg) == ["head.dropout=0.3", "finetune.layers=2"]
    assert store.varied_settings(compose(["experiment=ci"])) == []
    assert store.run_name(compose(["experiment=ci"]), "0123456789abcdef") == "ci 01234567"
