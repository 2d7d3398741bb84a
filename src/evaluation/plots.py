"""The evaluate stage's figures, drawn with matplotlib from arrays and tables (no model, no
config): training curves, the confusion matrix, misclassified test images, reliability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def plot_curves(histories: dict[str, Path], path: Path) -> None:
    """Loss and accuracy per epoch, head then fine-tune, train and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for phase, csv_path in histories.items():
        frame = pd.read_csv(csv_path) if csv_path.is_file() else pd.DataFrame()
        if frame.empty:
            continue
        epochs = frame["epoch"] + offset
        for ax, metric in zip(axes, ("loss", "accuracy")):
            ax.plot(epochs, frame[metric], "-o", ms=3, label=f"{phase} train")
            ax.plot(epochs, frame[f"val_{metric}"], "-s", ms=3, label=f"{phase} val")
        offset = int(epochs.max())
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no curves when no epoch was trained
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=90 if len(classes) > 10 else 0)
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if len(classes) <= 15:
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                color="white" if value > matrix.max() / 2 else "black",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_misclassified(
    images: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path, limit: int = 16
) -> int:
    """A grid of (the first `limit`) misclassified test images with true and predicted class;
    returns how many images are misclassified in all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_wrong = np.flatnonzero(probs.argmax(axis=1) != y)
    wrong = all_wrong[:limit]
    cols = 4
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        pred = int(probs[i].argmax())
        ax.imshow(images[i])
        ax.set_title(f"true {classes[y[i]]}\npred {classes[pred]} ({probs[i, pred]:.2f})", fontsize=9)
    if not len(wrong):
        axes.flat[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    elif len(all_wrong) > len(wrong):
        fig.suptitle(f"{len(wrong)} of {len(all_wrong)} misclassified test images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return len(all_wrong)


def plot_reliability(tables: dict[str, pd.DataFrame], eces: dict[str, float], path: Path) -> None:
    """Reliability diagram: accuracy against mean confidence per bin (one line per table, e.g.
    before and after temperature scaling), the diagonal of perfect calibration, and the number
    of test images in each bin below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    for i, (name, table) in enumerate(tables.items()):
        filled = table[table["count"] > 0]
        top.plot(filled["confidence"], filled["accuracy"], "-o", ms=4, label=f"{name} (ECE {eces[name]:.3f})")
        width = float((table["upper"] - table["lower"]).iloc[0])
        shift = (i - (len(tables) - 1) / 2) * width / len(tables)
        centers = (table["lower"] + table["upper"]) / 2 + shift
        bars = bottom.bar(centers, table["count"], width=width / len(tables), alpha=0.7, label=name)
        if len(table) <= 20:
            bottom.bar_label(bars, labels=[str(c) if c else "" for c in table["count"]], fontsize=7)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    top.set_title("reliability on the test split")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("test images")
    bottom.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
