"""Progress lines for logs: when stdout is not a terminal (`dvc repro > log`), Keras shows no
progress bar, so long loops log a line at most every `INTERVAL_SECONDS` (count done/total,
rate, ETA) through `logging`. On a terminal they log nothing and Keras' own output stays.

Set TL_PROGRESS_SECONDS to change the interval (0 logs every step).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 30.0
INTERVAL_ENV = "TL_PROGRESS_SECONDS"


def interval() -> float:
    """Seconds between two progress lines: TL_PROGRESS_SECONDS if set, else `INTERVAL_SECONDS`."""
    value = os.environ.get(INTERVAL_ENV)
    if value is None:
        return INTERVAL_SECONDS
    try:
        return max(0.0, float(value))
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %s", INTERVAL_ENV, value, INTERVAL_SECONDS)
        return INTERVAL_SECONDS


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default: the current sys.stdout) is a terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Counts the steps of a loop of `total` (None: unknown) `unit` and logs
    "<label>: done/total unit (pct%), rate unit/s, ETA h:mm:ss" at most every `interval()`
    seconds, only while `stream` (default: sys.stdout) is not a terminal."""

    def __init__(self, label: str, total: int | None, unit: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.active = not is_terminal(stream)
        self.every = interval()
        self.start = self.last = time.monotonic()

    def update(self, count: int = 1) -> None:
        """Add `count` finished steps; log a line if the interval has passed."""
        self.done += count
        if not self.active:
            return
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line as of `now` (default: the current time)."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        speed = f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}"
        if not self.total:
            return f"{self.label}: {self.done} {self.unit}, {speed} {self.unit}/s"
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "unknown"
        percent = 100 * self.done / self.total
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), "
            f"{speed} {self.unit}/s, ETA {eta}"
        )


def keras_callback(validation_steps: int | None = None, stream: TextIO | None = None):
    """A Keras callback logging `Progress` lines of the training batches of each epoch and of
    its validation batches (`validation_steps` of them, if known), and each epoch's metrics when
    it ends; None on a terminal."""
    if is_terminal(stream):
        return None
    import keras

    class BatchProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = f"epoch {epoch + 1}/{self.params.get('epochs')}"
            self._progress = Progress(self._epoch, self.params.get("steps"), "batches", stream)

        def on_train_batch_end(self, batch, logs=None):
            self._progress.update()

        def on_test_begin(self, logs=None):
            label = f"{getattr(self, '_epoch', 'evaluate')} validation"
            self._progress = Progress(label, validation_steps, "batches", stream)

        def on_test_batch_end(self, batch, logs=None):
            self._progress.update()

        def on_epoch_end(self, epoch, logs=None):  # Keras prints no epoch line off a terminal
            values = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            log.info("%s: %s", self._epoch, ", ".join(f"{k} {v:.4f}" for k, v in values.items()))

    return BatchProgress()


def batch_count(data) -> int | None:
    """The number of batches of a finite `tf.data.Dataset` of known size, else None."""
    try:
        return len(data)
    except TypeError:  # unknown or infinite cardinality, or not a dataset
        return None
