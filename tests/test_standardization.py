"""`model.standardize`: per-image contrast normalisation before a backbone's own preprocessing,
on real traffic-sign photos: what it computes, that light and contrast changes vanish, and that
a model holding it saves, reloads and exports with stock layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from src.config.checks import validate
from src.config.compose import compose
from src.models import networks
from src.stages import reuse
from tests.conftest import GTSRB, require_shared


def signs(count: int = 4) -> np.ndarray:
    """Real GTSRB training photos (32 px RGB, 0-255) as float32."""
    from PIL import Image

    require_shared()
    files = sorted((GTSRB / "train").glob("*/*.png"))[::97][:count]
    return np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files])


def model_cfg(name: str, standardize: bool):
    return OmegaConf.create({"name": name, "weights": None, "image_size": 32, "standardize": standardize})


@pytest.mark.parametrize("name", ["xception", "vgg16", "small_cnn"])
def test_each_image_is_standardised_then_given_the_backbones_own_preprocessing(name):
    images = signs()
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    std = np.sqrt(images.var(axis=(1, 2, 3), keepdims=True) + 0.01)
    expected = networks.preprocessing(model_cfg(name, False))((images - mean) / std * 64 + 127.5)
    got = networks.preprocessing(model_cfg(name, True))(images)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-3)


def test_a_dark_or_washed_out_photo_comes_out_as_the_well_lit_one():
    images = signs()
    dark, washed = images * 0.3, images * 0.5 + 120  # a backlit sign, a hazy one
    plain, standard = model_cfg("xception", False), model_cfg("xception", True)

    def seen(cfg, x: np.ndarray) -> np.ndarray:  # what the backbone gets, on Xception's [-1, 1] scale
        return np.asarray(networks.preprocessing(cfg)(x))

    np.testing.assert_allclose(seen(standard, dark), seen(standard, images), atol=0.02)
    np.testing.assert_allclose(seen(standard, washed), seen(standard, images), atol=0.02)
    gap = np.abs(seen(plain, dark) - seen(plain, images))
    assert gap.mean() > 0.3  # without it the network sees two different images


def test_it_computes_in_float32_under_a_bfloat16_policy():
    import keras

    from src.fitting import precision

    images = signs()

    def standardized(layer) -> np.ndarray:  # the two standardization layers alone, 0-255 scale
        return np.asarray(keras.Sequential(layer.layers[:2])(images), dtype=np.float32)

    reference = standardized(networks.preprocessing(model_cfg("xception", True)))
    precision.use("mixed_bfloat16")
    try:
        layer = networks.preprocessing(model_cfg("xception", True))
        assert [sub.compute_dtype for sub in layer.layers] == ["float32", "float32", "bfloat16"]
        np.testing.assert_allclose(standardized(layer), reference, rtol=1e-5, atol=1e-3)
    finally:
        precision.use("float32")


def test_a_model_with_it_reloads_without_custom_objects_and_exports_alike(tmp_path: Path):
    import keras

    from src.exporting import convert, device, runtimes

    keras.utils.set_random_seed(0)
    cfg = compose(["model=vgg16", "model.weights=null", "model.standardize=true", "augment=none",
                   "head.units=[8]", "head.dropout=0"])  # fmt: skip
    base = networks.conv_base(cfg.model, 32)
    head = networks.head(cfg.head, base.output_shape[1:], 3)
    model = networks.full_model(base, head, cfg.model, cfg.augment, seed=0)
    images = signs()
    expected = model.predict(images, verbose=0)
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")  # safe mode: stock layers only
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-6)
    assert reloaded.get_layer("preprocess").get_layer("standardize") is not None

    saved = device.save_saved_model(model, tmp_path / "saved_model")
    convert.to_onnx(saved, tmp_path / "model.onnx", ["a", "b", "c"])
    convert.to_tflite(saved, tmp_path / "model.tflite", None)
    for exported in ("model.onnx", "model.tflite"):  # uint8 pixels in, as a device sends them
        probs = runtimes.ExportedModel(tmp_path / exported).predict(images.astype(np.uint8))
        np.testing.assert_allclose(probs, expected, atol=1e-5, err_msg=exported)


def test_it_is_part_of_what_the_cached_features_are_keyed_by():
    require_shared()
    plain = validate(compose(["experiment=ci"]))
    standard = validate(compose(["experiment=ci", "model.standardize=true"]))
    assert reuse.stage_key(plain, "extract") != reuse.stage_key(standard, "extract")
