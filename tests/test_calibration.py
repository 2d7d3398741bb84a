"""Calibration: the expected calibration error on hand-computed and synthetic cases, temperature
scaling of over-confident softmax and sigmoid outputs, then the evaluate stage fitting a temperature
for a real (over-confident) Keras model on prepared arrays and `src.predict` applying it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from src import predict
from src.config.compose import compose
from src.evaluation import calibration
from src.serving import loading
from src.stages import evaluate
from tests.conftest import scratch_overrides

SIZE = 16
CLASSES = ["cats", "dogs"]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def sample_labels(rng: np.random.Generator, true_probs: np.ndarray) -> np.ndarray:
    """One label per row drawn from that row's class probabilities."""
    cumulative = true_probs.cumsum(axis=1)
    return np.minimum((rng.random((len(true_probs), 1)) > cumulative).sum(axis=1), true_probs.shape[1] - 1)


def test_ece_of_a_hand_computed_case():
    # 10 samples, 5 bins of width 0.2; confidences 0.55 x2 (1 right), 0.7 x4 (2 right), 0.9 x4 (all right):
    # 0.2 * |0.5 - 0.55| + 0.4 * |0.5 - 0.7| + 0.4 * |1.0 - 0.9| = 0.01 + 0.08 + 0.04 = 0.13
    rows = [
        ([0.55, 0.45, 0.0], 0),
        ([0.30, 0.55, 0.15], 0),
        ([0.7, 0.2, 0.1], 0),
        ([0.1, 0.7, 0.2], 1),
        ([0.2, 0.1, 0.7], 0),
        ([0.7, 0.3, 0.0], 2),
        ([0.9, 0.05, 0.05], 0),
        ([0.05, 0.9, 0.05], 1),
        ([0.0, 0.1, 0.9], 2),
        ([0.9, 0.1, 0.0], 0),
    ]
    probs = np.array([p for p, _ in rows])
    y = np.array([label for _, label in rows])
    assert calibration.expected_calibration_error(probs, y, bins=5) == pytest.approx(0.13, abs=1e-12)
    table = calibration.reliability_table(probs, y, bins=5)
    assert list(table.columns) == ["lower", "upper", "count", "confidence", "accuracy"]
    assert table["count"].tolist() == [0, 0, 2, 4, 4]
    assert table["confidence"].iloc[2:].tolist() == pytest.approx([0.55, 0.7, 0.9])
    assert table["accuracy"].iloc[2:].tolist() == pytest.approx([0.5, 0.5, 1.0])
    assert table["accuracy"].iloc[:2].isna().all()
    assert table["lower"].tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    # bins are closed on the right: a confidence of exactly 0.6 belongs to (0.4, 0.6]
    edge = calibration.reliability_table(np.array([[0.6, 0.4], [0.4, 0.6]]), np.array([0, 0]), bins=5)
    assert edge["count"].tolist() == [0, 0, 2, 0, 0]
    # a confident sigmoid output (N,) is read as P(class 1): confidence 1.0 lands in the last bin
    assert calibration.expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 1]), bins=15) == 0.5
    with pytest.raises(ValueError, match="bins"):
        calibration.expected_calibration_error(probs, y, bins=0)


def test_perfectly_calibrated_data_has_an_ece_near_zero():
    rng = np.random.default_rng(0)
    n = 200_000
    true_probs = softmax(rng.normal(0, 2, (n, 4)))
    y = sample_labels(rng, true_probs)
    ece = calibration.expected_calibration_error(true_probs, y, bins=15)
    # Each bin's accuracy is a mean of ~n/15 Bernoulli draws whose expectation is the bin's mean
    # confidence: its error has a standard deviation <= sqrt(0.25 / 13000) ~ 0.004, so the ECE,
    # a weighted mean of those errors, stays around 0.003; 0.01 leaves room without hiding a bias.
    assert ece < 0.01
    # right with probability c, but claiming c + 0.1: the ECE is 0.1 up to the same sampling error
    c = rng.uniform(0.5, 0.9, n)
    y = np.where(rng.random(n) < c, 0, 1)
    over = np.column_stack([c + 0.1, 0.9 - c])
    assert calibration.expected_calibration_error(over, y, bins=15) == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("true_t", [3.0, 0.5])
def test_temperature_scaling_undoes_over_and_under_confidence(true_t):
    """Outputs softmax(true_t * z) for labels drawn from softmax(z): the fitted T is about true_t
    (> 1 for over-confidence), and scaling lowers the test NLL and ECE without changing a prediction."""
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, (40_000, 5))
    y = sample_labels(rng, softmax(z))
    model_probs = softmax(true_t * z)
    val, test = slice(0, 20_000), slice(20_000, None)
    t = calibration.fit_temperature(model_probs[val], y[val])
    assert t == pytest.approx(true_t, rel=0.05)
    scaled = calibration.apply_temperature(model_probs[test], t)
    assert np.allclose(scaled.sum(axis=1), 1) and scaled.shape == model_probs[test].shape
    assert (scaled.argmax(axis=1) == model_probs[test].argmax(axis=1)).all()
    before = calibration.negative_log_likelihood(model_probs[test], y[test])
    after = calibration.negative_log_likelihood(scaled, y[test])
    assert after < before
    assert after == pytest.approx(calibration.negative_log_likelihood(model_probs[test], y[test], t))
    ece_before = calibration.expected_calibration_error(model_probs[test], y[test])
    ece_after = calibration.expected_calibration_error(scaled, y[test])
    assert ece_after < 0.02 < ece_before
    if true_t > 1:
        assert t > 1 and scaled.max(axis=1).mean() < model_probs[test].max(axis=1).mean()


def test_sigmoid_outputs_scale_their_logit():
    """A 2-class sigmoid model's P(class 1), as (N,) or (N, 1): softmax(log([1-p, p]) / T) is
    sigmoid(logit(p) / T), and an over-confident model (logit x 2.5) gets T of about 2.5."""
    rng = np.random.default_rng(2)
    a = rng.normal(0, 2, 30_000)
    y = (rng.random(a.shape) < sigmoid(a)).astype(np.int32)
    p = sigmoid(2.5 * a)
    t = calibration.fit_temperature(p, y)
    assert t == pytest.approx(2.5, rel=0.05)
    assert calibration.fit_temperature(p[:, None], y) == pytest.approx(t)
    scaled = calibration.apply_temperature(p, t)
    assert scaled.shape == (len(p), 2)
    clipped = np.clip(p, calibration.EPS, 1 - calibration.EPS)
    assert np.allclose(scaled[:, 1], sigmoid(np.log(clipped / (1 - clipped)) / t))
    assert ((scaled[:, 1] > 0.5) == (p > 0.5)).all()
    assert calibration.expected_calibration_error(scaled, y) < calibration.expected_calibration_error(p, y)
    # saturated outputs (1.0 for a wrong class) stay finite and get softened
    saturated = calibration.apply_temperature(np.array([1.0, 0.0]), 4.0)
    assert np.isfinite(saturated).all() and saturated[0, 1] < 0.99 and saturated[1, 0] < 0.99
    with pytest.raises(ValueError, match="positive"):
        calibration.apply_temperature(p, 0.0)


# --- the evaluate stage and src.predict on a real Keras model -------------------------------------


def brightness_model():
    """A real Keras sigmoid classifier of SIZE px images: dogs when the mean pixel is above 127.5,
    with a logit of 30 x (mean / 255 - 0.5), so about 0.9997 sure of every image."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    dense = keras.layers.Dense(1, activation="sigmoid")
    outputs = dense(x)
    dense.set_weights([np.full((3, 1), 10.0, np.float32), np.array([-15.0], np.float32)])
    return keras.Model(inputs, outputs)


def images_of(rng: np.random.Generator, bright: np.ndarray) -> np.ndarray:
    """Dark (30-90) or bright (165-225) random images, one per entry of `bright`."""
    low = np.where(bright, 165, 30).astype(np.int16)[:, None, None, None]
    return (low + rng.integers(0, 61, (len(bright), SIZE, SIZE, 3))).astype(np.uint8)


def write_split(folder: Path, split: str, per_class: int, rng: np.random.Generator) -> None:
    """Images whose brightness gives the class, every 5th label flipped: the model is right on 80%
    of them while claiming 0.9997, an over-confident model."""
    bright = np.repeat([0, 1], per_class).astype(bool)
    labels = bright.astype(np.int32)
    labels[::5] = 1 - labels[::5]
    np.save(folder / f"images_{split}.npy", images_of(rng, bright))
    np.save(folder / f"labels_{split}.npy", labels)


def prepared_with_model(tmp_path: Path, save_model, *overrides: str):
    """Prepared val/test arrays of dark and bright images (every 5th label flipped) and the final
    model `save_model(path)` writes, for the evaluate stage of a small config; the config."""
    cfg = compose([*scratch_overrides(tmp_path, SIZE), *overrides])
    prepared = Path(cfg.paths.prepared)
    prepared.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_split(prepared, "val", 40, rng)
    write_split(prepared, "test", 50, rng)
    (prepared / "classes.json").write_text(json.dumps(CLASSES))
    counts = pd.DataFrame({"train": 0, "val": 40, "test": 50}, index=pd.Index(CLASSES, name="class"))
    counts.to_csv(prepared / "counts.csv")
    pd.DataFrame(columns=["split", "path", "reason"]).to_csv(prepared / "skipped.csv", index=False)
    (prepared / "info.json").write_text(json.dumps({"classes": CLASSES, "fingerprint": "0123abcd"}))
    models_dir = Path(cfg.paths.models)
    models_dir.mkdir(parents=True)
    save_model(models_dir / "final.keras")
    (models_dir / "classes.json").write_text(json.dumps(CLASSES))
    return cfg


def evaluated(tmp_path: Path, *overrides: str):
    """A real over-confident model and prepared val/test arrays; evaluate run with temperature
    scaling; (config, evaluate's result)."""
    scaled = ("evaluate.temperature_scaling=true", "evaluate.bins=10")
    cfg = prepared_with_model(tmp_path, lambda path: brightness_model().save(path), *scaled, *overrides)
    return cfg, evaluate.run(cfg)


def test_evaluate_fits_a_temperature_and_writes_the_reliability_diagram(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    cfg, result = evaluated(tmp_path)
    reports, models_dir = Path(cfg.paths.reports), Path(cfg.paths.models)
    metrics = json.loads((reports / "metrics.json").read_text())
    test = metrics["test"]
    assert test["accuracy"] == pytest.approx(0.8)  # temperature scaling changes no prediction
    assert result["misclassified"] == 20  # all of them, not the 16 the grid shows
    assert test["ece"] > 0.15 and test["ece_calibrated"] < 0.1
    assert test["nll_calibrated"] < test["loss"]
    temperature = json.loads((models_dir / "temperature.json").read_text())["temperature"]
    assert temperature > 1 and metrics["temperature"] == pytest.approx(temperature, abs=1e-6)
    reliability = pd.read_csv(reports / "plots" / "reliability.csv")
    assert list(reliability.columns) == ["lower", "upper", "count", "confidence", "accuracy"]
    assert reliability["count"].sum() == 100 and (reliability["count"] > 0).all()
    assert reliability["accuracy"].iloc[-1] == pytest.approx(0.8)  # every image in the top bin
    png = reports / "figures" / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(result["mlflow"]["run_id"])
    assert run.data.metrics["temperature"] == pytest.approx(temperature, abs=1e-6)
    assert run.data.metrics["test.ece"] == test["ece"]
    assert run.data.metrics["test.ece_calibrated"] == test["ece_calibrated"]
    assert "reliability.png" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
    assert "temperature.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.uri)
    assert loading.load_temperature(result["mlflow"]["model_uri"]) == pytest.approx(temperature, abs=1e-6)

    # scaling off: the stale temperature is removed, the uncalibrated ECE still reported
    cfg.evaluate.temperature_scaling = False
    cfg.tracking.enabled = False
    again = evaluate.run(cfg)
    assert not (models_dir / "temperature.json").exists()
    assert again["temperature"] is None and "ece_calibrated" not in again["test"]
    assert again["test"]["ece"] == test["ece"]


def test_predict_applies_the_temperature_beside_the_model(tmp_path, capsys):
    cfg, _ = evaluated(tmp_path, "tracking.enabled=false")
    model_path = Path(cfg.paths.models) / "final.keras"
    photo = tmp_path / "bright.png"
    Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).save(photo)
    model, classes = loading.load_model(str(model_path))
    temperature = loading.load_temperature(str(model_path))
    assert temperature == json.loads(model_path.with_name("temperature.json").read_text())["temperature"]
    [raw] = loading.predict(model, classes, [photo])
    [scaled] = loading.predict(model, classes, [photo], temperature=temperature)
    assert raw["class"] == scaled["class"] == "dogs"
    assert raw["probability"] > 0.999 and 0.5 < scaled["probability"] < 0.95
    assert predict.main([str(photo), "--model", str(model_path)]) == 0
    out, err = capsys.readouterr()
    _, name, probability = out.strip().split("\t")
    assert name == "dogs" and float(probability) == pytest.approx(scaled["probability"], abs=1e-4)
    assert f"note: probabilities calibrated with temperature {temperature:.4g}" in err
    model_path.with_name("temperature.json").write_text('{"temperature": -1}')
    assert predict.main([str(photo), "--model", str(model_path)]) == 2
    assert "the temperature must be a positive number" in capsys.readouterr().err
