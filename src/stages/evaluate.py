"""Stage `evaluate`: score the final model (and the head alone) on the held-out test split,
write metrics and plots, and log the whole pipeline run to MLflow.

Reads the prepared test (and validation) images, the test features, `<paths.models>/final.keras`
and `head.keras`, and the earlier stages' summaries. Writes to `<paths.reports>/`: `metrics.json`
(test and head-only accuracy and loss, macro F1, test expected calibration error; for `dvc
metrics show`), `timings.json` (each earlier stage's wall time), `classification_report.csv`
(per-class precision, recall, F1), `plots/confusion.csv` and `plots/reliability.csv` (for `dvc
plots show`), `figures/{curves,confusion_matrix,misclassified,reliability}.png`.

With `evaluate.temperature_scaling`, one temperature is fitted on the validation split's
predictions of the final model and saved as `<paths.models>/temperature.json` (which
`src.predict` applies); the test ECE and NLL after scaling join the metrics. Without it, a
`temperature.json` left by an earlier run is removed.

With `evaluate.tta_views` = k > 0, the test (and validation) images are also scored with
test-time augmentation: each image's probabilities averaged with those of k views drawn by the
model's own augmentation block (`src/evaluation/views.py`). They join the metrics as `test_tta`
and `val_tta`; `test` and every plot stay the single-view predictions that `src.predict`, the
served and the exported models give.
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
from src.evaluation import calibration, classification, plots, views
from src.evaluation.calibration import TEMPERATURE_FILE
from src.models import networks
from src.outputs import atomic
from src.stages import stage
from src.tracking import pipeline_run, store

log = logging.getLogger(__name__)
TIMED_STAGES = ("download", "prepare", "extract", "train_head", "finetune")


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    """The fraction of rows of `probs` whose most probable class is the label in `y`."""
    return float(np.mean(probs.argmax(axis=1) == y))


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
    return {"accuracy": round(accuracy(probs, y), 6), "loss": round(loss, 6)}, probs


def stage_seconds(cfg: DictConfig) -> dict[str, float]:
    """Wall time of each earlier stage's last run, from its summary in reports/."""
    seconds = {}
    for name in TIMED_STAGES:
        summary = stage.read_summary(cfg, name)
        if summary:
            seconds[name] = float(summary.get("seconds", 0))
    return seconds


def val_accuracy(cfg: DictConfig) -> float | None:
    """Validation accuracy of the final model, from the last stage that trained an epoch
    (fine-tune, else the head): its kept epoch's; None when neither trained, or when that stage
    recorded none (a refit, which trained on the validation images) or no finite number."""
    for name in ("finetune", "train_head"):
        best = stage.read_summary(cfg, name).get("best") or {}
        if best.get("epoch") is not None:
            value = best.get("val_accuracy")
            return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    return None


def refitted(cfg: DictConfig) -> bool:
    """Whether fine-tuning trained on the validation images too (`finetune.refit`), by its summary."""
    return bool(stage.read_summary(cfg, "finetune").get("refit"))


def require_images(array: np.ndarray, split: str, folder: Path) -> None:
    """Refuse to evaluate on an empty split, naming it and where it was read from."""
    if len(array) == 0:
        raise errors.StageError(
            f"split {split!r} in {folder} holds no images: nothing to evaluate on; "
            "check dataset.split and dataset.limit_per_class, then rerun prepare (dvc repro)"
        )


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


def averaged_view_metrics(
    cfg: DictConfig, model, images: np.ndarray, y: np.ndarray, probs: np.ndarray, n_classes: int
) -> dict:
    """`test_tta` (accuracy, NLL, ECE of the test probabilities averaged over the image and
    `evaluate.tta_views` augmented views) and, when the validation split holds images that
    training only selected by (not after a refit), `val_tta` (its accuracy: the number of views
    is chosen on it, not on the test images)."""
    k, batch_size = cfg.evaluate.tta_views, cfg.train.batch_size
    averaged = views.averaged_probabilities(model, images, probs, k, batch_size)
    metrics = {
        "test_tta": {
            "accuracy": round(accuracy(averaged, y), 6),
            "loss": round(calibration.negative_log_likelihood(averaged, y), 6),
            "ece": round(calibration.expected_calibration_error(averaged, y, cfg.evaluate.bins), 6),
            "views": k,
        }
    }
    val_images, y_val = arrays.load_images(cfg, "val")
    if len(val_images) and not refitted(cfg):
        _, val_probs = score(model, val_images, y_val, n_classes, batch_size)
        val_averaged = views.averaged_probabilities(model, val_images, val_probs, k, batch_size)
        metrics["val_tta"] = {
            "accuracy": round(accuracy(val_averaged, y_val), 6),
            "single_view_accuracy": round(accuracy(val_probs, y_val), 6),
        }
    log.info(
        "test accuracy with %d augmented views averaged: %.4f (validation: %s)",
        k,
        metrics["test_tta"]["accuracy"],
        metrics.get("val_tta", {}).get("accuracy", "n/a"),
    )
    return metrics


@stage.reads(
    "preset", "evaluate", "tracking", "train.batch_size", "dataset.image_size", "head.epochs", "model.name",
    "paths.prepared", "paths.features", "paths.models", "paths.reports",
    identity=store.run_identity,
)  # fmt: skip
def run(cfg: DictConfig) -> dict:
    """Evaluate on the test split, write reports, log the run to MLflow."""
    import keras
    from sklearn.metrics import confusion_matrix

    bins = cfg.evaluate.bins  # an integer >= 1: the schema checks it
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
    final_model = keras.saving.load_model(model_dir / "final.keras", compile=False)
    tta_views = cfg.evaluate.tta_views
    if tta_views and views.augmentation_block(final_model) is None:  # refused before any scoring
        raise errors.StageError(
            f"evaluate.tta_views needs a model with an augmentation block, but {model_dir / 'final.keras'} "
            "has none (it was trained with every augment.* option off); set evaluate.tta_views=0, or "
            "train with augmentation (augment.rotation, augment.zoom, ...)"
        )
    test, probs = score(final_model, images, y, n, cfg.train.batch_size)
    metrics = {"test": test}
    if tta_views:
        metrics.update(averaged_view_metrics(cfg, final_model, images, y, probs, n))
    if is_pretrained(cfg) and cfg.head.epochs > 0:  # an untrained head's score says nothing
        head_model = keras.saving.load_model(model_dir / "head.keras", compile=False)
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
    report = classification.per_class_report(y, predicted, classes)
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
    plots.plot_curves(histories, figures / "curves.png")
    plots.plot_confusion(matrix, classes, figures / "confusion_matrix.png")
    n_wrong = plots.plot_misclassified(images, y, probs, classes, figures / "misclassified.png")
    plots.plot_reliability(tables, eces, figures / "reliability.png")
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
        "test_tta": metrics.get("test_tta"),
        "val_tta": metrics.get("val_tta"),
    }
    if cfg.tracking.enabled:
        flat = {f"test.{k}": v for k, v in test.items()}
        flat.update({f"head_test.{k}": v for k, v in metrics.get("head_test", {}).items()})
        for section in ("test_tta", "val_tta"):
            flat.update({f"{section}.{k}": v for k, v in metrics.get(section, {}).items()})
        flat["test.macro_f1"] = metrics["macro_f1"]
        if "val" in metrics:
            flat["val.accuracy"] = metrics["val"]["accuracy"]
        if "temperature" in metrics:
            flat["temperature"] = metrics["temperature"]
        flat.update({f"test.f1.{c}": v["f1-score"] for c, v in per_class.items()})
        flat.update({f"time.{name}_seconds": seconds for name, seconds in timings.items()})
        prepared = arrays.prepared_dir(cfg)
        info = json.loads((prepared / "info.json").read_text())
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import SQLAlchemyError

        try:
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
        except (MlflowException, SQLAlchemyError) as err:  # one line naming the store, no traceback
            raise store.store_error(cfg, err, "while logging the run") from None
    return result


if __name__ == "__main__":
    stage.main("evaluate", run, tensorflow=True)
