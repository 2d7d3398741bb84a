"""MixUp and CutMix batches (`augment.mix`) on small real arrays and a real Keras model."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from src.data import arrays, mixing


def mix_cfg(mode: str, alpha: float = 1.0):
    return OmegaConf.create({"mix": mode, "mix_alpha": alpha})


def images(n: int = 8, size: int = 12) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def epochs(dataset, count: int = 2) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    return [[(x.numpy(), y.numpy()) for x, y in dataset] for _ in range(count)]


def own_and_partner(targets: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """With one class per example: each example's own weight and its partner's index."""
    own = targets[np.arange(len(labels)), labels]
    rest = targets.copy()
    rest[np.arange(len(labels)), labels] = 0
    partner = np.where(rest.max(axis=1) > 0, rest.argmax(axis=1), np.arange(len(labels)))
    return own, partner


def test_mixup_blends_pixels_and_labels_with_the_same_weight():
    x, y = images(), np.arange(8)  # one class per example: the target names the partner
    (batch,), _ = epochs(mixing.mixed(arrays.batches(x, y, 8), mix_cfg("mixup"), 8, seed=1))
    mixed_x, targets = batch
    np.testing.assert_allclose(targets.sum(axis=1), 1, atol=1e-6)
    own, partner = own_and_partner(targets, y)
    assert own.min() > 0 and (own < 0.99).sum() >= 4  # real blends, not copies
    expected = own[:, None, None, None] * x + (1 - own[:, None, None, None]) * x[partner]
    np.testing.assert_allclose(mixed_x, expected, rtol=1e-4, atol=1e-2)


def test_cutmix_pastes_one_box_and_weights_labels_by_its_area():
    x, y = images(), np.arange(8)
    (batch,), _ = epochs(mixing.mixed(arrays.batches(x, y, 8), mix_cfg("cutmix"), 8, seed=2))
    mixed_x, targets = batch
    own, partner = own_and_partner(targets, y)
    assert (own < 0.99).sum() >= 4
    for i in range(8):
        from_own = (mixed_x[i] == x[i]).all(axis=-1)
        from_partner = (mixed_x[i] == x[partner[i]]).all(axis=-1)
        assert (from_own | from_partner).all()  # every pixel is one image's or the other's
        pasted = ~from_own
        assert own[i] == pytest.approx(1 - pasted.mean(), abs=1e-6)  # label weight = area kept
        if pasted.any():  # the pasted pixels fill their bounding box: one rectangle
            rows, cols = np.nonzero(pasted)
            assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixing_repeats_with_the_seed_and_changes_every_epoch(mode):
    x, y = images(), np.arange(8) % 3

    def run(seed):
        return epochs(mixing.mixed(arrays.batches(x, y, 4), mix_cfg(mode), 3, seed=seed))

    first, again, other = run(5), run(5), run(6)
    for a, b in zip(first, again, strict=True):
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(first[0][0][0], first[1][0][0])  # epoch 2 mixes differently
    assert not np.array_equal(first[0][0][0], other[0][0][0])


def test_two_classes_get_float_targets_and_validation_stays_unmixed():
    x, y = images(), np.array([0, 1] * 4)
    train, val = mixing.apply(arrays.batches(x, y, 8), arrays.batches(x, y, 8), mix_cfg("mixup"), 2, 0)
    (_, targets), _ = epochs(train)[0][0], None
    assert targets.shape == (8,) and targets.dtype == np.float32 and 0 <= targets.min() <= targets.max() <= 1
    (val_x, val_y), _ = epochs(val)[0][0], None
    np.testing.assert_array_equal(val_x, x)
    np.testing.assert_array_equal(val_y, y.astype(np.float32))
    off = OmegaConf.create({"mix": None, "mix_alpha": 1.0})
    plain = arrays.batches(x, y, 8)
    assert mixing.apply(plain, plain, off, 2, 0) == (plain, plain)


def test_a_softmax_model_learns_from_mixed_batches_with_one_hot_validation():
    import keras

    from src.models import networks

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 8, 8, 3)).astype(np.float32)
    x[np.arange(60), :, :, y] += 3  # class c: channel c brighter
    train, val = mixing.apply(
        arrays.batches(x, y, 10, shuffle=True), arrays.batches(x, y, 10), mix_cfg("cutmix"), 3, 0
    )
    inputs = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))
    networks.compile_model(model, 3, "adam", 5e-2, soft_labels=True)
    assert model.loss == "categorical_crossentropy"
    history = model.fit(train, validation_data=val, epochs=15, verbose=0).history
    assert history["val_accuracy"][-1] > 0.9 and history["val_loss"][-1] < history["val_loss"][0]
    # the metric on one-hot targets is the plain accuracy of the predicted classes
    predicted = model.predict(x, verbose=0).argmax(axis=1)
    assert history["val_accuracy"][-1] == pytest.approx((predicted == y).mean(), abs=1e-6)
