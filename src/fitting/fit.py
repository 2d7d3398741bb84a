"""Fitting shared by `train_head` and `finetune`: checkpoint on the best val_loss, restore it
(or, with no validation at all, keep the last epoch), save the model atomically and write the
per-epoch history as CSV (for `dvc plots`). Where stdout is not a terminal, progress lines
within each epoch are logged (`src.outputs.progress`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from src.fitting import distribute
from src.outputs import folders, progress
from src.outputs.atomic import atomic_file

log = logging.getLogger(__name__)
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]


def save_model(model, path: Path) -> Path:
    """Save a Keras model to `path` (.keras) via a temp file and a rename."""
    with atomic_file(path) as tmp:
        model.save(tmp)
    return path


def write_history(rows: list[dict], path: Path) -> Path:
    """Write the per-epoch history (`HISTORY_COLUMNS`) as CSV, atomically."""
    with atomic_file(path) as tmp:
        pd.DataFrame(rows, columns=HISTORY_COLUMNS).to_csv(tmp, index=False)
    return path


def _epoch_timer(keras):
    """A callback recording each epoch's wall time (training and validation) in `.seconds`."""

    class EpochTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(round(time.perf_counter() - self._start, 3))

    return EpochTimer()


def validate_with(model, val_data):
    """A callback that scores `model` (which shares the trained model's layers, e.g. the top of
    a network on cached activations) on `val_data` after each epoch and puts `val_loss` and
    `val_accuracy` into the epoch's logs, for the checkpoint, the history and the progress line."""
    import keras

    class Validation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if distribute.is_multi_worker(model.distribute_strategy):
                scores = distribute.evaluate(model, val_data)
            else:
                scores = model.evaluate(val_data, verbose=0, return_dict=True)
            if logs is not None:
                logs.update({f"val_{name}": float(value) for name, value in scores.items()})

    return Validation()


def fit_best(
    model,
    train_data,
    val_data,
    epochs: int,
    model_path: Path,
    history_path: Path,
    final_model=None,
    validation=None,
    callbacks: tuple = (),
) -> dict:
    """Train, keep the weights of the epoch with the lowest val_loss, save the model (or
    `final_model`, which shares the trained layers) and the history. `validation` (from
    `validate_with`) scores each epoch instead of `val_data`; with neither (a refit on every
    labelled image) the last epoch is kept and the history's val columns stay empty.
    `callbacks` (live MLflow metrics, Optuna pruning; None entries skipped) come last, so they
    see each epoch's every metric."""
    import keras

    rows: list[dict] = []
    best: dict = {"epoch": None, "val_loss": None, "val_accuracy": None}
    if epochs > 0 and val_data is None and validation is None:
        rows = _fit_rows(model, train_data, None, epochs, (), callbacks)
        best["epoch"] = len(rows)
        log.info("kept the last epoch (%d): no validation split to choose one by", len(rows))
    elif epochs > 0:
        with folders.scratch_dir(model_path.parent, "checkpoint") as tmp:
            checkpoint = tmp / "best.weights.h5"
            callback = keras.callbacks.ModelCheckpoint(
                checkpoint, monitor="val_loss", save_best_only=True, save_weights_only=True
            )
            rows = _fit_rows(model, train_data, val_data, epochs, (validation, callback), callbacks)
            best_row = min(rows, key=lambda r: r["val_loss"])
            best = {
                "epoch": best_row["epoch"],
                "val_loss": best_row["val_loss"],
                "val_accuracy": best_row["val_accuracy"],
            }
            model.load_weights(checkpoint)  # back to the best epoch
            log.info(
                "best epoch %d: val_loss %.4f val_accuracy %.4f",
                best["epoch"],
                best["val_loss"],
                best["val_accuracy"],
            )
    save_model(final_model if final_model is not None else model, model_path)
    write_history(rows, history_path)
    return {"epochs": epochs, "best": best}


def _fit_rows(model, train_data, val_data, epochs: int, first: tuple, last: tuple) -> list[dict]:
    """Run `fit` for `epochs` with the epoch timer and progress lines between the `first`
    callbacks (validation, checkpoint) and the `last` (None entries skipped); one history row
    per epoch."""
    import keras

    timer = _epoch_timer(keras)
    batches = progress.keras_callback(validation_steps=progress.batch_count(val_data))
    chosen_callbacks = [c for c in (*first, timer, batches, *last) if c is not None]
    chosen = model.distribute_strategy
    if distribute.is_multi_worker(chosen):  # Keras 3's fit cannot run it
        history = distribute.fit_multi_worker(model, chosen, train_data, val_data, epochs, chosen_callbacks)
    else:  # batches arrive shuffled already
        history = model.fit(
            train_data, validation_data=val_data, epochs=epochs, callbacks=chosen_callbacks, shuffle=False,
            verbose=2,
        )  # fmt: skip
    metrics = {**history.history, "seconds": timer.seconds}
    return [
        {"epoch": i + 1, **{k: float(metrics[k][i]) for k in HISTORY_COLUMNS[1:] if k in metrics}}
        for i in range(len(metrics["loss"]))
    ]
