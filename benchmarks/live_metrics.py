"""What logging each epoch to MLflow as it ends costs a training run on the default store.

    python benchmarks/live_metrics.py [--epochs 40] [--rounds 3]

Trains the `ci` preset's dense head on random features shaped like VGG16's at 224 px
(2000 x 7 x 7 x 512) with and without the live-metrics callback (`src.tracking.live_metrics`, local SQLite
store in a temp folder), alternating the two in each round, and prints the median seconds per
epoch of each and their ratio, plus the median time of the callback's own work per epoch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from src.config.compose import compose
from src.models import networks
from src.tracking import live_metrics


def epoch_seconds(cfg, x, y, epochs: int, live: bool) -> tuple[float, float]:
    """(median seconds per epoch, median seconds the callback took per epoch)."""
    import keras

    keras.utils.set_random_seed(0)
    model = networks.head(cfg.head, x.shape[1:], 2)
    networks.compile_model(model, 2, "adam", 1e-3)
    callback = live_metrics.callback(cfg, "head") if live else None
    spent: list[float] = []
    if callback is not None:  # time the callback's own work inside each epoch
        inner = callback.on_epoch_end

        def timed(epoch, logs=None):
            start = time.perf_counter()
            inner(epoch, logs)
            spent.append(time.perf_counter() - start)

        callback.on_epoch_end = timed
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    callbacks = [c for c in (callback, Timer()) if c is not None]  # the timer sees the callback's cost
    model.fit(x, y, validation_split=0.2, epochs=epochs, batch_size=32, callbacks=callbacks, verbose=0)
    if live:
        import mlflow

        mlflow.MlflowClient().set_terminated(live_metrics.running_run(cfg).info.run_id, "KILLED")
    return statistics.median(times[1:]), statistics.median(spent) if spent else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((2000, 7, 7, 512), dtype=np.float32)
    y = rng.integers(0, 2, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(["experiment=ci", f"tracking.uri=sqlite:///{Path(tmp) / 'mlflow.db'}"])
        plain, live, spent = [], [], []
        for _ in range(args.rounds):  # paired: each round measures both
            plain.append(epoch_seconds(cfg, x, y, args.epochs, live=False)[0])
            seconds, callback = epoch_seconds(cfg, x, y, args.epochs, live=True)
            live.append(seconds)
            spent.append(callback)
    p, q, c = statistics.median(plain), statistics.median(live), statistics.median(spent)
    print(f"head epoch, no live metrics: {p * 1000:.1f} ms (median of {args.rounds} rounds)")
    print(f"head epoch, live metrics:    {q * 1000:.1f} ms  ratio {q / p:.3f}")
    print(f"the callback's own work:     {c * 1000:.1f} ms per epoch ({c / p:.1%} of an epoch)")


if __name__ == "__main__":
    main()
