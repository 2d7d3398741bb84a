"""The models a pipeline run logs: the Keras flavor with its input example, the image classifier
registered with the `champion` or `candidate` alias, and `src.predict` on `models:/...@champion`.
A real MLflow SQLite store and artifact folder under tmp_path, tiny real Keras models, real image
files."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from src import predict
from src.evaluation.calibration import apply_temperature
from src.serving import loading, pyfunc_model
from src.tracking import pipeline_run
from tests.test_tracking_keys import SIZE, scratch_cfg, tiny_model

NAME = "image-classifier"
CLASSES = ["cats", "dogs"]
TEMPERATURE = 2.0


def brightness_model():
    """A real Keras classifier of SIZE px images that calls dark images cats, bright ones dogs."""
    model = tiny_model(2)
    dense = model.layers[-1]
    dense.set_weights([np.full((3, 1), 4.0, np.float32), np.array([-6.0], np.float32)])
    return model


def registry_cfg(tmp_path: Path):
    """The from-scratch config registering as NAME, its store and artifacts under tmp_path."""
    cfg = scratch_cfg(tmp_path)
    cfg.tracking.registered_model = NAME
    return cfg


def log_run(
    cfg,
    folder: Path,
    accuracy: float,
    fingerprint: str = "0123abcd",
    model=None,
    temperature: float | None = None,
) -> dict:
    """One pipeline run logged as evaluate logs it, `classes.json` (and `temperature.json` when
    `temperature` is given) among its artifacts."""
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = [folder / "classes.json"]
    artifacts[0].write_text(json.dumps(CLASSES))
    if temperature is not None:
        artifacts.append(folder / loading.TEMPERATURE_FILE)
        artifacts[1].write_text(json.dumps({"temperature": temperature}))
    return pipeline_run.log_pipeline_run(
        cfg,
        model=model or tiny_model(2),
        classes=CLASSES,
        metrics={"test.accuracy": accuracy},
        histories={},
        artifacts=artifacts,
        fingerprint=fingerprint,
        image_size=SIZE,
    )


def flat_image(path: Path, value: int, side: int = 40) -> Path:
    """A real image file of one grey level."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (value, value, value)).save(path)
    return path


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> tuple[object, dict, Path]:
    """(config, what log_pipeline_run returned, a folder with a dark and a bright image) for one
    run of the brightness model with a temperature."""
    tmp = tmp_path_factory.mktemp("registered")
    cfg = registry_cfg(tmp)
    result = log_run(cfg, tmp / "run", accuracy=0.9, model=brightness_model(), temperature=TEMPERATURE)
    flat_image(tmp / "photos" / "dark.png", 10)
    flat_image(tmp / "photos" / "bright.jpg", 245)
    return cfg, result, tmp / "photos"


@pytest.fixture
def store(logged, monkeypatch) -> tuple[object, dict, Path]:
    """`logged`, with MLflow (and src.predict, through $MLFLOW_TRACKING_URI) pointed at its store."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged[0].tracking.uri)
    mlflow.set_tracking_uri(logged[0].tracking.uri)
    return logged


@pytest.fixture
def classifier(store):
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


def expected_probabilities(images: np.ndarray) -> np.ndarray:
    """What the brightness model gives `images`, calibrated with TEMPERATURE."""
    raw = brightness_model().predict(images.astype(np.float32), verbose=0)
    return apply_temperature(np.concatenate([1 - raw, raw], axis=1), TEMPERATURE)


def test_the_classifier_is_registered_champion_with_a_keras_flavor_and_the_keras_model_beside_it(store):
    import mlflow
    from mlflow import MlflowClient

    cfg, result, _ = store
    assert result["alias"] == "champion" and result["registered_version"] == "1"
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    assert client.get_registered_model(NAME).aliases == {"champion": 1}
    registered = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert registered.model_id == mlflow.models.get_model_info(result["model_uri"]).model_id
    assert {"python_function", "keras"} <= set(registered.flavors)
    assert registered.metadata == {"classes": CLASSES, "temperature": TEMPERATURE}
    outputs = registered.signature.outputs.input_names()
    assert outputs == ["class", "probability", "p_cats", "p_dogs"] and registered.signature.inputs is None
    # the bare network, from either model
    for uri in (f"models:/{NAME}@champion", result["keras_model_uri"]):
        assert mlflow.keras.load_model(uri).input_shape == (None, SIZE, SIZE, 3)
    keras_info = mlflow.models.get_model_info(result["keras_model_uri"])
    assert set(keras_info.flavors) == {"keras", "python_function"}
    assert keras_info.metadata["classes"] == CLASSES
    spec = keras_info.signature.inputs.inputs[0]
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, SIZE, SIZE, 3)
    assert keras_info.saved_input_example_info["type"] == "ndarray"
    example = mlflow.pyfunc.load_model(result["keras_model_uri"]).input_example
    assert example.dtype == np.uint8 and example.shape == (1, SIZE, SIZE, 3)


def test_the_classifier_predicts_class_names_from_paths_and_from_pixels(store, classifier):
    _, _, photos = store
    paths = [str(photos / "dark.png"), str(photos / "bright.jpg")]
    _, images, _ = loading.read_images([Path(p) for p in paths], SIZE)
    expected = expected_probabilities(images)
    for model_input in (paths, pd.DataFrame({"path": paths}), images, images.astype(np.int64)):
        frame = classifier.predict(model_input)
        assert list(frame.columns) == ["class", "probability", "p_cats", "p_dogs"]
        assert frame["class"].tolist() == ["cats", "dogs"]
        # float32 convolutions differ by ~1e-6 between calls (oneDNN picks kernels by batch and threads)
        np.testing.assert_allclose(frame[["p_cats", "p_dogs"]].to_numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(frame["probability"], expected.max(axis=1), atol=1e-5)
    assert 0.5 < frame["probability"].min() < 0.99  # calibrated: softer than the raw 0.9975
    assert classifier.predict([]).empty


@pytest.mark.parametrize(
    "kind", ["unreadable file", "DataFrame without path", "wrong size", "not pixels", "out of range"]
)
def test_input_the_classifier_cannot_take_is_one_clear_error(store, classifier, tmp_path, kind):
    from mlflow.exceptions import MlflowException

    _, _, photos = store
    cases = {
        "unreadable file": ([str(photos / "dark.png"), str(tmp_path / "missing.jpg")], "missing.jpg"),
        "DataFrame without path": (pd.DataFrame({"file": ["a.jpg"]}), "`path` column"),
        "wrong size": (np.zeros((1, SIZE + 1, SIZE + 1, 3), np.uint8), f"(N, {SIZE}, {SIZE}, 3)"),
        "not pixels": (np.zeros((1, SIZE, SIZE, 3), np.float32), "integers from 0 to 255"),
        "out of range": (np.full((1, SIZE, SIZE, 3), 256), "integers from 0 to 255"),
    }
    model_input, message = cases[kind]
    with pytest.raises(MlflowException, match=re.escape(message)) as err:
        classifier.predict(model_input)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"


def test_predict_command_on_the_champion(store, capsys):
    _, _, photos = store
    assert predict.main([str(photos), "--model", f"models:/{NAME}@champion"]) == 0
    out, err = capsys.readouterr()
    rows = [line.split("\t") for line in out.splitlines()]
    assert [(Path(r[0]).name, r[1]) for r in rows] == [("bright.jpg", "dogs"), ("dark.png", "cats")]
    assert f"note: probabilities calibrated with temperature {TEMPERATURE:.4g}" in err
    _, images, _ = loading.read_images([photos / "bright.jpg", photos / "dark.png"], SIZE)
    expected = expected_probabilities(images).max(axis=1)
    assert [float(r[2]) for r in rows] == pytest.approx(expected, abs=1e-4)


def test_champion_moves_only_to_a_better_test_accuracy_on_the_same_data(tmp_path, caplog):
    import mlflow
    from mlflow import MlflowClient

    cfg = registry_cfg(tmp_path)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    caplog.set_level(logging.INFO, logger="src.tracking.pipeline_run")
    first = log_run(cfg, tmp_path / "first", accuracy=0.6)
    second = log_run(cfg, tmp_path / "second", accuracy=0.5)
    assert (first["alias"], second["alias"]) == ("champion", "candidate")
    assert client.get_registered_model(NAME).aliases == {"champion": 1, "candidate": 2}
    assert "image-classifier version 2 is the candidate: test accuracy 0.5000 does not beat champion " in (
        caplog.text
    )
    source = client.get_logged_model(mlflow.models.get_model_info(first["model_uri"]).model_id)

    def register(accuracy: float, fingerprint: str) -> tuple[str, dict[str, str]]:
        """A new version (of the first run's model files) from a run with this accuracy and data."""
        tags = {pipeline_run.FINGERPRINT_TAG: fingerprint}
        with mlflow.start_run(experiment_id=first["experiment_id"], tags=tags) as run:
            mlflow.log_metric(pipeline_run.ACCURACY_KEY, accuracy)
        version = client.create_model_version(NAME, source.artifact_location, run_id=run.info.run_id).version
        alias = pipeline_run.assign_alias(NAME, version, fingerprint, accuracy)
        return alias, client.get_registered_model(NAME).aliases

    assert register(0.6, "0123abcd") == ("candidate", {"champion": 1, "candidate": 3})  # a tie
    assert register(0.7, "0123abcd") == ("champion", {"champion": 4, "candidate": 3})
    assert "version 4 is the champion: test accuracy 0.7000 beats champion version 1's 0.6000" in caplog.text
    # new data: the first version trained on it is the champion, whatever its accuracy
    assert register(0.1, "feedbeef") == ("champion", {"champion": 5, "candidate": 3})
    assert "champion version 4 was trained on other data (0123abcd)" in caplog.text
    assert register(0.05, "feedbeef") == ("candidate", {"champion": 5, "candidate": 6})
    # a champion whose run cannot be read (here: registered without one) is not compared with
    orphan = client.create_model_version(NAME, source.artifact_location).version
    client.set_registered_model_alias(NAME, "champion", orphan)
    assert register(0.01, "feedbeef") == ("champion", {"champion": 8, "candidate": 6})


def test_prediction_frame_and_input_kinds():
    probs = np.array([[0.2, 0.8], [0.7, 0.3]])
    frame = pyfunc_model.prediction_frame(["a b", "c"], probs)
    assert list(frame.columns) == ["class", "probability", "p_a b", "p_c"]
    assert frame["class"].tolist() == ["c", "a b"] and frame["probability"].tolist() == [0.8, 0.7]
    assert pyfunc_model.input_paths(np.array(["x.jpg", "y.png"])) == ["x.jpg", "y.png"]
    assert pyfunc_model.input_paths([Path("x.jpg")]) == ["x.jpg"]
    assert pyfunc_model.input_paths(np.zeros((1, 2, 2, 3), np.uint8)) is None
    pixels = [[[[0, 255, 7]] * 2] * 2]  # JSON numbers: a nested list of ints
    assert pyfunc_model.input_images(pixels, 2).dtype == np.uint8
