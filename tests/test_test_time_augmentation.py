"""Test-time augmentation: probabilities averaged over each image and views drawn by the model's
own augmentation block (src/evaluation/views.py), checked against the views drawn by hand, then
the evaluate stage reporting `test_tta` and `val_tta` beside an unchanged single-view `test`, and
refusing a model trained without augmentation before it scores anything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from src import errors
from src.config.compose import compose
from src.errors import ConfigError
from src.evaluation import views
from src.models import networks
from src.stages import evaluate
from tests.test_calibration import CLASSES, SIZE, brightness_model, images_of, prepared_with_model


def augmented_brightness_model(path: Path):
    """The brightness classifier (dogs when the mean pixel is above 127.5, 0.9997 sure) behind the
    project's augmentation block with random brightness of up to half the pixel range, saved and
    loaded again as the evaluate stage loads it."""
    import keras

    augment_cfg = compose(["augment=none", "augment.brightness=0.5"]).augment
    inputs = keras.Input((SIZE, SIZE, 3))
    x = networks.augmentation(augment_cfg, seed=7)(inputs)
    outputs = brightness_model()(x)
    keras.Model(inputs, outputs, name="classifier").save(path)
    return keras.saving.load_model(path, compile=False)


def test_views_average_the_image_and_augmented_views_drawn_by_its_own_block(tmp_path):
    import keras

    rng = np.random.default_rng(0)
    # near the boundary: a mean of 28-32 levels from 127.5, so 0.97-0.98 sure of one class
    near = 127.5 + rng.choice([-1, 1], (24, 1, 1, 1)) * rng.integers(28, 33, (24, 1, 1, 1))
    mid = (near + rng.integers(-3, 4, (24, SIZE, SIZE, 3))).astype(np.uint8)
    images = np.concatenate([images_of(rng, np.repeat([False, True], 8)), mid])
    model = augmented_brightness_model(tmp_path / "m.keras")
    single = networks.probabilities(model.predict(images, verbose=0))
    averaged = views.averaged_probabilities(model, images, single, views=4, batch_size=10)

    # by hand, on a fresh copy (its random layers restart from their seeds): the same views
    fresh = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    block = fresh.get_layer("augmentation")
    total = single.copy()
    for _ in range(4):
        batches = [images[s : s + 10].astype(np.float32) for s in range(0, len(images), 10)]
        drawn = np.concatenate([keras.ops.convert_to_numpy(block(b, training=True)) for b in batches])
        assert not np.allclose(drawn, images)  # a view is another image ...
        total += networks.probabilities(fresh.predict(drawn, verbose=0))
    assert np.allclose(averaged, total / 5, atol=1e-6)
    assert np.allclose(averaged.sum(axis=1), 1)

    # clear-cut images keep their class and near certainty; the ones near the boundary, which a
    # brightness shift of a quarter of the range carries across it, are far less sure
    assert (averaged[:16].argmax(axis=1) == single[:16].argmax(axis=1)).all()
    assert single[16:].max(axis=1).min() > 0.96
    assert np.median(averaged[16:].max(axis=1)) < 0.85
    # reproducible: a third copy draws the same views
    again = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    assert np.allclose(views.averaged_probabilities(again, images, single, 4, 10), averaged, atol=1e-6)


def test_evaluate_reports_averaged_views_beside_the_single_view(tmp_path):
    from mlflow import MlflowClient

    cfg = prepared_with_model(tmp_path, augmented_brightness_model, "evaluate.tta_views=3")
    result = evaluate.run(cfg)
    metrics = json.loads((Path(cfg.paths.reports) / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] == pytest.approx(0.8)  # the single view, as served
    tta = metrics["test_tta"]
    assert tta["views"] == 3 and 0.5 < tta["accuracy"] <= 1
    assert 0 < tta["ece"] < 1 and tta["loss"] > 0
    assert metrics["val_tta"]["single_view_accuracy"] == pytest.approx(0.8)
    assert 0.5 < metrics["val_tta"]["accuracy"] <= 1
    assert result["test_tta"] == tta
    run = MlflowClient(cfg.tracking.uri).get_run(result["mlflow"]["run_id"])
    assert run.data.metrics["test_tta.accuracy"] == pytest.approx(tta["accuracy"])
    assert run.data.metrics["test_tta.views"] == 3

    # after a refit the validation images were trained on: no val_tta to choose by
    cfg.tracking.enabled = False
    (Path(cfg.paths.reports) / "finetune.json").write_text(json.dumps({"refit": True, "best": {}}))
    refit = evaluate.run(cfg)
    assert refit["val_tta"] is None and refit["test_tta"] == tta

    # off: no averaged metrics, the single view unchanged
    cfg.evaluate.tta_views = 0
    plain = evaluate.run(cfg)
    assert plain["test_tta"] is None and plain["test"] == result["test"]
    assert "test_tta" not in json.loads((Path(cfg.paths.reports) / "metrics.json").read_text())


def test_a_model_without_augmentation_is_refused_before_scoring(tmp_path):
    cfg = prepared_with_model(tmp_path, lambda path: brightness_model().save(path), "evaluate.tta_views=2")
    with pytest.raises(errors.StageError, match=r"evaluate\.tta_views=0.*augment\.rotation"):
        evaluate.run(cfg)
    assert not (Path(cfg.paths.reports) / "metrics.json").exists()


@pytest.mark.parametrize("value", [-1, 65])
def test_the_number_of_views_is_checked(value):
    with pytest.raises(ConfigError, match="evaluate.tta_views"):
        compose([f"evaluate.tta_views={value}"])


def test_predict_averages_views_of_each_photo(tmp_path, capsys):
    from PIL import Image

    from src import predict

    model_path = tmp_path / "final.keras"
    augmented_brightness_model(model_path)
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    (tmp_path / "temperature.json").write_text(json.dumps({"temperature": 2.0}))
    photos = []
    for name, level in (("clear.png", 250), ("near.png", 158)):  # 0.99999 and 0.976 sure of dogs
        photos.append(tmp_path / name)
        Image.fromarray(np.full((SIZE, SIZE, 3), level, np.uint8)).save(photos[-1])

    def probabilities(*args: str) -> tuple[list[float], str]:
        assert predict.main([*map(str, photos), "--model", str(model_path), *args]) == 0
        out, err = capsys.readouterr()
        rows = [line.split("\t") for line in out.splitlines()]
        assert [r[1] for r in rows] == ["dogs", "dogs"]
        return [float(r[2]) for r in rows], err

    (clear, near), err = probabilities()  # calibrated with the temperature beside the model
    assert "calibrated with temperature 2" in err
    assert 0.99 < clear < 0.9997 and 0.8 < near < 0.9
    (clear, near), err = probabilities("--views", "8")
    assert "temperature 2 not applied" in err and "calibrated" not in err
    assert near < 0.9 < clear  # darker views carry the near one across the boundary, not the clear one

    # a model without an augmentation block: one error line before any image is read
    plain = tmp_path / "plain"
    plain.mkdir()
    brightness_model().save(plain / "final.keras")
    (plain / "classes.json").write_text(json.dumps(CLASSES))
    assert predict.main([str(photos[0]), "--model", str(plain / "final.keras"), "--views", "2"]) == 2
    assert "error: --views needs a Keras model with an augmentation block" in capsys.readouterr().err
