"""Progress lines for logs: feature extraction and training epochs log count, rate and ETA
when stdout is not a terminal, and nothing more on a terminal."""

from __future__ import annotations

import logging
import os
import re
import sys

import numpy as np
import pytest

from src.data import arrays
from src.fitting import fit
from src.models import networks
from src.outputs import progress

LINE = re.compile(
    r"^(?P<label>.+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \(\d+%\), [\d.]+ \w+/s, ETA \S+$"
)


EPOCH_LINE = re.compile(r"^epoch \d+/\d+: (\w+ -?[\d.]+(e[+-]\d+)?(, |$))+")  # each epoch's metrics


def progress_lines(caplog) -> list[re.Match]:
    lines = [r.getMessage() for r in caplog.records if r.name == progress.log.name]
    matches = [LINE.match(line) for line in lines if not EPOCH_LINE.match(line)]
    assert all(matches), lines
    return matches


@pytest.fixture
def every_step(monkeypatch, caplog):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    caplog.set_level(logging.INFO, logger=progress.log.name)


@pytest.fixture
def tty():
    """A real terminal: the other end of a pseudo-terminal."""
    main, secondary = os.openpty()
    with open(secondary, "w") as stream:
        yield stream
    os.close(main)


def tiny_base():
    import keras

    inputs = keras.Input(shape=(16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def images(n: int = 10) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


def test_interval_defaults_and_follows_the_environment(monkeypatch):
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)
    assert progress.interval() == progress.INTERVAL_SECONDS == 30
    monkeypatch.setenv(progress.INTERVAL_ENV, "2.5")
    assert progress.interval() == 2.5
    monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
    assert progress.interval() == progress.INTERVAL_SECONDS


def test_predict_to_file_logs_images_done_rate_and_eta(tmp_path, every_step, caplog, capsys):
    import keras

    shape = networks.predict_to_file(
        tiny_base(), keras.layers.Rescaling(1 / 255), images(), 4, tmp_path / "features_train.npy"
    )
    assert shape == (10, 4)
    lines = progress_lines(caplog)
    assert [(m["label"], m["done"], m["total"], m["unit"]) for m in lines] == [
        ("features_train.npy", done, "10", "images") for done in ("4", "8", "10")
    ]
    assert "images/s, ETA 0:00:00" in lines[-1].group(0)
    assert capsys.readouterr().out == ""  # through logging, not printed


def test_a_quiet_interval_logs_nothing(tmp_path, caplog, monkeypatch):
    import keras

    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)
    caplog.set_level(logging.INFO, logger=progress.log.name)
    networks.predict_to_file(tiny_base(), keras.layers.Rescaling(1 / 255), images(), 4, tmp_path / "f.npy")
    assert progress_lines(caplog) == []


def test_fit_best_logs_batches_of_each_epoch_and_its_validation(tmp_path, every_step, caplog):
    import keras

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 8)).astype("float32"), rng.integers(0, 2, size=10)
    model = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(1, activation="sigmoid")])
    networks.compile_model(model, 2, "adam", 1e-3)
    fit.fit_best(
        model,
        arrays.batches(x, y, 4, shuffle=True),
        arrays.batches(x[:6], y[:6], 4),
        2,
        tmp_path / "m.keras",
        tmp_path / "history.csv",
    )
    seen = [(m["label"], m["done"], m["total"]) for m in progress_lines(caplog)]
    assert seen == [
        *(("epoch 1/2", str(done), "3") for done in (1, 2, 3)),
        *(("epoch 1/2 validation", str(done), "2") for done in (1, 2)),
        *(("epoch 2/2", str(done), "3") for done in (1, 2, 3)),
        *(("epoch 2/2 validation", str(done), "2") for done in (1, 2)),
    ]
    ends = [r.getMessage() for r in caplog.records if EPOCH_LINE.match(r.getMessage())]
    assert [line.split(":")[0] for line in ends] == ["epoch 1/2", "epoch 2/2"]
    assert all("loss" in line and "val_accuracy" in line for line in ends), ends


def test_on_a_terminal_nothing_is_logged(tmp_path, every_step, caplog, tty, monkeypatch):
    import keras

    monkeypatch.setattr(sys, "stdout", tty)  # here: pytest sets its own before the test runs
    assert progress.is_terminal() and progress.keras_callback() is None
    counter = progress.Progress("loop", 3, "steps")
    for _ in range(3):
        counter.update()
    networks.predict_to_file(tiny_base(), keras.layers.Rescaling(1 / 255), images(), 4, tmp_path / "f.npy")
    assert progress_lines(caplog) == []
    with open(os.devnull, "w") as not_a_terminal:
        assert not progress.is_terminal(not_a_terminal)
