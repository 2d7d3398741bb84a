"""`fit.fit_best` on a tiny real Keras model: the epoch it keeps and the history it writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from src.data import arrays
from src.fitting import fit
from src.models import networks


def tiny_model(x: np.ndarray, y: np.ndarray):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape=(x.shape[1],)), keras.layers.Dense(1, activation="sigmoid")])
    networks.compile_model(model, 2, "adam", 0.05)
    return model


def data(n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, (x[:, 0] > 0).astype("int64")


def test_without_validation_the_last_epoch_is_kept_and_saved(tmp_path):
    """No validation split (a refit on every labelled image): the model after the last epoch is
    the one saved, the best epoch is the last, and the history's val columns stay empty."""
    import keras

    x, y = data()
    model = tiny_model(x, y)
    start = [w.copy() for w in model.get_weights()]
    result = fit.fit_best(model, arrays.batches(x, y, 8, shuffle=True), None, 3, tmp_path / "m.keras",
                          tmp_path / "history.csv")  # fmt: skip
    assert result["best"] == {"epoch": 3, "val_loss": None, "val_accuracy": None}
    saved = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    for kept, trained, first in zip(saved.get_weights(), model.get_weights(), start):
        np.testing.assert_array_equal(kept, trained)  # what training ended with
        assert not np.allclose(kept, first)  # and it did train
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.epoch) == [1, 2, 3]
    assert history.val_loss.isna().all() and history.val_accuracy.isna().all()
    assert history.loss.iloc[-1] < history.loss.iloc[0]


def test_with_validation_the_best_epoch_is_restored(tmp_path):
    """With a validation split, the saved model is the epoch of the lowest val_loss, not the
    last: here the validation labels contradict the training ones, so it gets worse each epoch."""
    import keras

    x, y = data()
    model = tiny_model(x, y)
    fit.fit_best(model, arrays.batches(x, y, 8, shuffle=True), arrays.batches(x, 1 - y, 8), 4,
                 tmp_path / "m.keras", tmp_path / "history.csv")  # fmt: skip
    history = pd.read_csv(tmp_path / "history.csv")
    best = history.loc[history.val_loss.idxmin()]
    assert best.epoch < len(history)  # so restoring it is what the check below sees
    saved = keras.saving.load_model(tmp_path / "m.keras")
    scores = saved.evaluate(x, 1 - y, verbose=0, return_dict=True)
    assert scores["loss"] == pytest.approx(best.val_loss, rel=1e-4)
