"""Stage `evaluate`: score the final model (and the head alone) on the held-out test split,
write metrics and plots, and log the whole pipeline run to MLflow.

Writes to `<paths.reports>/`: `metrics.json` (test and head-only accuracy and loss, macro F1,
test expected calibration error; for `dvc metrics show`), `timings.json` (each earlier stage's
wall time),
`classification_report.csv` (per-class precision, recall, F1), `plots/confusion.csv` and
`plots/reliability.csv` (for `dvc plots show`),
`figures/{curves,confusion_matrix,misclassified,reliability}.png`.

With `evaluate.temperature_scaling`, one temperature is fitted on the validation split's
predictions of the final model and saved as `<paths.models>/temperature.json` (which
`src.predict` applies); the test ECE and NLL after scaling join the metrics. Without it, a
`temperature.json` left by an earlier run is removed.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from src import errors
from src.config.checks import is_pretrained
from src.config.paths import resolve_path
from src.data import arrays
from src.evaluation import calibration
from src.evaluation.calibration import TEMPERATURE_FILE
from src.models import networks
from src.outputs import atomic
from src.stages import stage
from src.tracking import pipeline_run, store

log = logging.getLogger(__name__)
TIMED_STAGES = ("download", "prepare", "extract", "train_head", "finetune")


def score(model, x: np.ndarray, y: np.ndarray, n_classes: int, batch_size: int) -> tuple[dict, np.ndarray]:
    """Loss and accuracy of `model` on (x, y), and its (N, n_classes) probabilities."""
    import keras

    if len(x) == 0:
        raise errors.StageError("nothing to score: the split holds no images")
    raw = model.predict(arrays.batches(x, None, batch_size), verbose=0)
    probs = networks.probabilities(raw)
    _, _, loss_name = networks.output_spec(n_classes)
    loss_fn = keras.losses.get(loss_name)
    y_true = y.astype(np.float32).reshape(-1, 1) if n_classes == 2 else y
    loss = float(np.mean(keras.ops.convert_to_numpy(loss_fn(y_true, raw))))
    accuracy = float(np.mean(probs.argmax(axis=1) == y))
    return {"accuracy": round(accuracy, 6), "loss": round(loss, 6)}, probs


def per_class_report(y: np.ndarray, predicted: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class (one row each, in label order, real names in
    the `class` column), then accuracy, macro and weighted averages. Rows are by position, so a
    class may be called `accuracy` or `macro avg` without clashing with the summary rows."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(classes)))
    p, r, f, support = precision_recall_fscore_support(y, predicted, labels=labels, zero_division=0)
    rows = [
        {"class": c, "precision": p[i], "recall": r[i], "f1-score": f[i], "support": int(support[i])}
        for i, c in enumerate(classes)
    ]
    total = int(support.sum())
    accuracy = float(np.mean(y == predicted)) if total else 0.0
    rows.append(
        {
            "class": "accuracy",
            "precision": accuracy,
            "recall": accuracy,
            "f1-score": accuracy,
            "support": total,
        }
    )
    rows.append(
        {
            "class": "macro avg",
            "precision": p.mean(),
            "recall": r.mean(),
            "f1-score": f.mean(),
            "support": total,
        }
    )
    weights = support / max(total, 1)
    rows.append(
        {
            "class": "weighted avg",
            "precision": float(p @ weights),
            "recall": float(r @ weights),
            "f1-score": float(f @ weights),
            "support": total,
        }
    )
    return pd.DataFrame(rows, columns=["class", "precision", "recall", "f1-score", "support"])


def stage_seconds(cfg: DictConfig) -> dict[str, float]:
    """Wall time of each earlier stage's last run, from its summary in reports/."""
    seconds = {}
    for name in TIMED_STAGES:
        summary = stage.summary_path(cfg, name)
        if summary.is_file():
            seconds[name] = float(json.loads(summary.read_text()).get("seconds", 0))
    return seconds


def val_accuracy(cfg: DictConfig) -> float | None:
    """Validation accuracy of the final model: fine-tune's best epoch, else the head's; None
    when neither trained an epoch (or the value is not a finite number)."""
    for name in ("finetune", "train_head"):
        summary = stage.summary_path(cfg, name)
        if summary.is_file():
            best = json.loads(summary.read_text()).get("best") or {}
            value = best.get("val_accuracy")
            if isinstance(value, (int, float)) and math.isfinite(value):
                return float(value)
    return None


def require_images(array: np.ndarray, split: str, folder: Path) -> None:
    """Refuse to evaluate on an empty split, naming it and where it was read from."""
    if len(array) == 0:
        raise errors.StageError(
            f"split {split!r} in {folder} holds no images: nothing to evaluate on; "
            "check dataset.split and dataset.limit_per_class, then rerun prepare (dvc repro)"
        )


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


def check_bins(cfg: DictConfig) -> int:
    """`evaluate.bins` as an int, refused unless it is a whole number of at least 1."""
    bins = cfg.evaluate.bins
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise errors.StageError(f"evaluate.bins={bins!r} is not allowed: it must be an integer of at least 1")
    return bins


def validation_images(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """The prepared validation images and labels that the temperature is fitted on."""
    images, y = arrays.load_images(cfg, "val")
    if len(images) == 0:
        raise errors.StageError(
            f"evaluate.temperature_scaling needs validation images, but split 'val' in "
            f"{arrays.prepared_dir(cfg)} holds none; set evaluate.temperature_scaling=false, or give "
            "the validation split images (dataset.split, dataset.limit_per_class) and rerun prepare"
        )
    return images, y


def fit_temperature(model, images: np.ndarray, y: np.ndarray, n_classes: int, batch_size: int) -> float:
    """The temperature that minimises the model's NLL on (images, y), the validation split."""
    _, val_probs = score(model, images, y, n_classes, batch_size)
    temperature = calibration.fit_temperature(val_probs, y)
    low, high = np.exp(calibration.LOG_T_BOUNDS)
    if not low * 1.01 < temperature < high / 1.01:
        log.warning(
            "temperature %.4g is at the edge of the range searched (%g to %g)", temperature, low, high
        )
    log.info("temperature %.4f fitted on %d validation images", temperature, len(y))
    return temperature


@stage.reads(
    "preset", "evaluate", "tracking", "train.batch_size", "dataset.image_size", "head.epochs", "model.name",
    "paths.prepared", "paths.features", "paths.models", "paths.reports",
    identity=store.run_identity,
)  # fmt: skip
def run(cfg: DictConfig) -> dict:
    """Evaluate on the test split, write reports, log the run to MLflow."""
    import keras
    from sklearn.metrics import confusion_matrix

    bins = check_bins(cfg)
    classes = arrays.load_classes(cfg)
    n = len(classes)
    reports = resolve_path(cfg.paths.reports)
    model_dir = resolve_path(cfg.paths.models)
    figures = reports / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    (reports / "plots").mkdir(parents=True, exist_ok=True)

    images, y = arrays.load_images(cfg, "test")
    require_images(images, "test", arrays.prepared_dir(cfg))
    if cfg.evaluate.temperature_scaling:
        val_images, y_val = validation_images(cfg)
    if is_pretrained(cfg):
        features, y_feat = arrays.load_features(cfg, "test")
        require_images(features, "test", resolve_path(cfg.paths.features))
    final_model = keras.saving.load_model(model_dir / "final.keras")
    test, probs = score(final_model, images, y, n, cfg.train.batch_size)
    metrics = {"test": test}
    if is_pretrained(cfg) and cfg.head.epochs > 0:  # an untrained head's score says nothing
        head_model = keras.saving.load_model(model_dir / "head.keras")
        metrics["head_test"], _ = score(head_model, features, y_feat, n, cfg.train.batch_size)
    predicted = probs.argmax(axis=1)
    test["ece"] = round(calibration.expected_calibration_error(probs, y, bins), 6)
    tables = {"model": calibration.reliability_table(probs, y, bins)}
    eces = {"model": test["ece"]}
    temperature_file = model_dir / TEMPERATURE_FILE
    if cfg.evaluate.temperature_scaling:
        temperature = fit_temperature(final_model, val_images, y_val, n, cfg.train.batch_size)
        scaled = calibration.apply_temperature(probs, temperature)
        test["ece_calibrated"] = round(calibration.expected_calibration_error(scaled, y, bins), 6)
        test["nll_calibrated"] = round(calibration.negative_log_likelihood(probs, y, temperature), 6)
        metrics["temperature"] = round(temperature, 6)
        tables["temperature scaled"] = calibration.reliability_table(scaled, y, bins)
        eces["temperature scaled"] = test["ece_calibrated"]
        atomic.write_json(temperature_file, {"temperature": temperature})
    elif temperature_file.is_file():
        temperature_file.unlink()  # fitted for an earlier run: src.predict must not apply it
        log.info("removed %s (evaluate.temperature_scaling is false)", temperature_file)
    report = per_class_report(y, predicted, classes)
    per_class = {
        c: {k: round(float(row[k]), 6) for k in ("precision", "recall", "f1-score")}
        for c, (_, row) in zip(classes, report.iloc[: len(classes)].iterrows())
    }
    metrics["macro_f1"] = round(float(report.iloc[len(classes) + 1]["f1-score"]), 6)
    if (val := val_accuracy(cfg)) is not None:
        metrics["val"] = {"accuracy": round(val, 6)}
    atomic.write_json(reports / "metrics.json", metrics)
    timings = stage_seconds(cfg)  # its own file: wall times are no metric to compare runs by
    atomic.write_json(reports / "timings.json", timings)
    report.to_csv(reports / "classification_report.csv", index=False)
    pd.DataFrame({"actual": [classes[i] for i in y], "predicted": [classes[i] for i in predicted]}).to_csv(
        reports / "plots" / "confusion.csv", index=False
    )
    reliability = tables["model"]
    reliability[reliability["count"] > 0].to_csv(reports / "plots" / "reliability.csv", index=False)

    histories = {"head": reports / "head" / "history.csv", "finetune": reports / "finetune" / "history.csv"}
    matrix = confusion_matrix(y, predicted, labels=list(range(n)))
    plot_curves(histories, figures / "curves.png")
    plot_confusion(matrix, classes, figures / "confusion_matrix.png")
    n_wrong = plot_misclassified(images, y, probs, classes, figures / "misclassified.png")
    plot_reliability(tables, eces, figures / "reliability.png")
    log.info(
        "test accuracy %.4f (head alone: %s), %d of %d misclassified, ECE %.4f%s",
        test["accuracy"],
        metrics.get("head_test", {}).get("accuracy", "n/a"),
        n_wrong,
        len(y),
        test["ece"],
        f" ({test['ece_calibrated']:.4f} after temperature scaling)" if "ece_calibrated" in test else "",
    )

    result = {
        "val": metrics.get("val"),
        "test": test,
        "head_test": metrics.get("head_test"),
        "per_class": per_class,
        "misclassified": n_wrong,
        "temperature": metrics.get("temperature"),
    }
    if cfg.tracking.enabled:
        flat = {f"test.{k}": v for k, v in test.items()}
        flat.update({f"head_test.{k}": v for k, v in metrics.get("head_test", {}).items()})
        flat["test.macro_f1"] = metrics["macro_f1"]
        if "val" in metrics:
            flat["val.accuracy"] = metrics["val"]["accuracy"]
        if "temperature" in metrics:
            flat["temperature"] = metrics["temperature"]
        flat.update({f"test.f1.{c}": v["f1-score"] for c, v in per_class.items()})
        flat.update({f"time.{name}_seconds": seconds for name, seconds in timings.items()})
        prepared = arrays.prepared_dir(cfg)
        info = json.loads((prepared / "info.json").read_text())
        result["mlflow"] = pipeline_run.log_pipeline_run(
            cfg,
            model=final_model,
            classes=classes,
            metrics=flat,
            histories=histories,
            artifacts=[
                figures,
                reports / "metrics.json",
                reports / "timings.json",
                reports / "classification_report.csv",
                prepared / "classes.json",
                prepared / "counts.csv",
                prepared / "skipped.csv",
                prepared / "report.json",
                prepared / "leakage.csv",
                temperature_file,
            ],
            fingerprint=info["fingerprint"],
            image_size=cfg.dataset.image_size,
        )
    return result


if __name__ == "__main__":
    stage.main("evaluate", run)
