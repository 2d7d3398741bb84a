"""Calibration of predicted probabilities: expected calibration error (ECE), the reliability table
behind a reliability diagram, and temperature scaling (Guo et al., 2017).

Probabilities are (N, K) matrices; a sigmoid output, (N,) or (N, 1), is read as P(class 1) and
turned into the two columns [1 - p, p]. Temperature scaling divides the logits by one T > 0:
for a softmax output the logits are log(p) up to a constant per row, for a sigmoid output
softmax(log([1 - p, p]) / T) equals sigmoid(logit(p) / T). The argmax never changes.

Confidence bins are equal-width and closed on the right, (lower, upper], the first one [0, upper].
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TEMPERATURE_FILE = "temperature.json"  # the fitted temperature, written beside final.keras by evaluate
EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before taking logs
LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))  # the range searched for the temperature


def as_matrix(probs: np.ndarray) -> np.ndarray:
    """Probabilities as an (N, K) float64 matrix; a sigmoid output (N,) or (N, 1) becomes [1 - p, p]."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        probs = probs[:, None]
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be (N, K) or (N,), got shape {probs.shape}")
    if probs.shape[1] == 1:
        probs = np.concatenate([1.0 - probs, probs], axis=1)
    return probs


def _labels(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} rows of probabilities")
    return y


def _bin_stats(probs: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, ...]:
    """(edges, count, summed confidence, summed correctness) per equal-width confidence bin."""
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    bins = int(bins)
    probs = as_matrix(probs)
    y = _labels(y, len(probs))
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.searchsorted(edges[1:-1], confidence, side="left")  # (lower, upper]
    count = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    return edges, count, conf_sum, correct_sum


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: sum over bins of |accuracy - mean confidence| x the fraction of samples in it."""
    _, count, conf_sum, correct_sum = _bin_stats(probs, y, bins)
    total = count.sum()
    if total == 0:
        raise ValueError("no samples: the ECE is undefined")
    filled = count > 0
    gaps = np.abs(correct_sum[filled] - conf_sum[filled])  # = count x |accuracy - confidence|
    return float(gaps.sum() / total)


def reliability_table(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """One row per confidence bin: lower, upper, count, mean confidence and accuracy (NaN when empty)."""
    edges, count, conf_sum, correct_sum = _bin_stats(probs, y, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(count > 0, conf_sum / count, np.nan)
        accuracy = np.where(count > 0, correct_sum / count, np.nan)
    return pd.DataFrame(
        {
            "lower": edges[:-1],
            "upper": edges[1:],
            "count": count.astype(np.int64),
            "confidence": confidence,
            "accuracy": accuracy,
        }
    )


def logits(probs: np.ndarray) -> np.ndarray:
    """log of the clipped probabilities: logits up to a constant per row, which softmax ignores."""
    return np.log(np.clip(as_matrix(probs), EPS, 1.0 - EPS))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def negative_log_likelihood(probs: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log softmax(log(p) / T)[y], with p clipped to [EPS, 1 - EPS]."""
    z = logits(probs)
    y = _labels(y, len(z))
    return float(-_log_softmax(z / temperature)[np.arange(len(z)), y].mean())


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 that minimises the negative log-likelihood of softmax(log(p) / T) on
    (probs, y), searched over log T in [log 0.01, log 100]: T > 1 softens over-confident outputs."""
    from scipy.optimize import minimize_scalar

    z = logits(probs)
    y = _labels(y, len(z))
    if len(z) == 0:
        raise ValueError("no samples to fit a temperature on")
    rows = np.arange(len(z))

    def nll(log_t: float) -> float:
        return float(-_log_softmax(z / np.exp(log_t))[rows, y].mean())

    found = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) as an (N, K) matrix: the same argmax, confidences softened (T > 1) or
    sharpened (T < 1)."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return np.exp(_log_softmax(logits(probs) / temperature))
