"""The augmentation block: every option on, in a model that is saved and loaded again, on real
photos: random while training, the identity at inference, and rebuilt exactly from the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from src.models import networks
from tests.test_standardization import signs

EVERY_OPTION = {
    "flip": "horizontal", "rotation": 0.05, "translate": 0.1, "shear": 0.1, "zoom": 0.2,
    "brightness": 0.2, "contrast": 0.3,
}  # fmt: skip


def test_a_model_with_every_augmentation_reloads_and_augments_only_while_training(tmp_path: Path):
    import keras

    augment = networks.augmentation(OmegaConf.create(EVERY_OPTION), seed=0)
    assert len(augment.layers) == len(EVERY_OPTION)
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, augment(inputs))
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")  # every layer rebuilt from its config

    def configs(block) -> list:  # as the file stores them (tuples become lists)
        return json.loads(json.dumps([layer.get_config() for layer in block.layers]))

    assert configs(reloaded.layers[1]) == configs(augment)
    images = signs()
    np.testing.assert_array_equal(np.asarray(reloaded(images, training=False)), images)
    changed = np.asarray(reloaded(images, training=True))
    assert np.abs(changed - images).mean() > 1.0


def test_shear_goes_both_ways():
    import keras

    shear = networks.augmentation(OmegaConf.create({**dict.fromkeys(EVERY_OPTION, 0.0), "flip": None,
                                                    "shear": 0.3}), seed=0)  # fmt: skip
    layer = shear.layers[0]
    assert isinstance(layer, keras.layers.RandomShear)
    draws = [layer.get_random_transformation(np.zeros((1, 32, 32, 3), "float32"), training=True)
             for _ in range(40)]  # fmt: skip
    sheared = np.concatenate([np.asarray(d["shear_factor"]).ravel() for d in draws])
    assert sheared.min() < -0.05 and sheared.max() > 0.05 and np.abs(sheared).max() <= 0.3
