"""What an exported model costs and changes, measured on the test split: accuracy, agreement with
the Keras model's class, the largest probability difference, file size, and batch-1 latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

WARMUP_RUNS = 5


def agreement(reference: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy of `probs` on `labels`, the share of images whose class matches `reference`'s,
    and the largest absolute difference of any class probability."""
    predicted = probs.argmax(axis=1)
    return {
        "accuracy": round(float(np.mean(predicted == labels)), 6),
        "agreement": round(float(np.mean(predicted == reference.argmax(axis=1))), 6),
        "max_probability_difference": float(np.max(np.abs(probs - reference))) if len(probs) else 0.0,
    }


def latency(run_one: Callable[[np.ndarray], object], images: np.ndarray, runs: int) -> dict[str, float]:
    """Median and 95th percentile milliseconds of `run_one` on one image (batch 1), over `runs`
    calls cycling through `images`, after a few warm-up calls."""
    for i in range(WARMUP_RUNS):
        run_one(images[i % len(images)][None])
    times = []
    for i in range(runs):
        start = time.perf_counter()
        run_one(images[i % len(images)][None])
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 3),
    }
