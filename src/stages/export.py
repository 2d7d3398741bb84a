"""Stage `export`: the final model for devices, converted and measured.

Reads `<paths.models>/final.keras`, the prepared training (a sample calibrates int8) and test
images, and `<paths.reports>/evaluate.json` (the MLflow run the model was logged in). Writes
`<paths.models>/export/`: `saved_model/` (the device model: uint8 pixels at the input size in,
every class's probability out, preprocessing inside, augmentation left out), then each format of
`export.formats` (`model.onnx`, `model_float.tflite`, `model_int8.tflite`), each with a side-car
`<stem>.json` naming its classes; `export.formats=[]` turns exporting off (the folder then holds
only `classes.json`). Each conversion runs in a process of its own
(`src.exporting.convert`); one that fails is reported with its reason and the others finish.

Measured on the test split for each format: accuracy, agreement with the class the Keras model
gives in float32 (a model trained in mixed precision is rebuilt in float32 first), the
largest probability difference, file size, and batch-1 latency (median and p95 over
`export.latency_runs` runs, one thread and all threads) through onnxruntime or the LiteRT
interpreter, beside Keras' own batch-1 latency in the same run. The summary
`<paths.reports>/export.json` holds them (DVC metrics); a table goes to the log; with tracking
on, the figures are logged to the model's MLflow run as `export.<format>.*` and the files as its
`export/` artifacts, which the registered version's tag `export_artifacts` points to.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from src.config.paths import resolve_path
from src.data import arrays
from src.exporting import convert as converter
from src.exporting import device, measure
from src.exporting.runtimes import ExportedModel
from src.models import networks
from src.outputs import folders
from src.stages import stage
from src.tracking import store

log = logging.getLogger(__name__)
EXPORT_DIR = "export"


def convert(fmt: str, saved_model: Path, out: Path, classes_file: Path, representative: Path) -> str | None:
    """Run one conversion in its own process; None when it worked, else the reason."""
    command = [sys.executable, "-m", converter.__name__, fmt, str(saved_model), str(out)]
    command += ["--classes", str(classes_file)] if fmt == "onnx" else []
    command += ["--representative", str(representative)] if fmt == "tflite_int8" else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == 0 and out.is_file():
        return None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {done.returncode}"


def representative_sample(cfg: DictConfig, count: int) -> np.ndarray:
    """Up to `count` training images, drawn with the config's seed."""
    images, _ = arrays.load_images(cfg, "train")
    chosen = np.random.default_rng(cfg.seed).permutation(len(images))[:count]
    return np.asarray(images[np.sort(chosen)])


def measure_format(
    path: Path, reference: np.ndarray, images: np.ndarray, labels: np.ndarray, runs: int
) -> dict:
    """The figures of one exported file (see the module docstring)."""
    row = {"file": path.name, "size_bytes": path.stat().st_size}
    model = ExportedModel(path)
    row.update(measure.agreement(reference, model.predict_batch(images), labels))
    row["latency_all_threads"] = measure.latency(model.predict_batch, images, runs)
    row["latency_one_thread"] = measure.latency(ExportedModel(path, threads=1).predict_batch, images, runs)
    return row


FIGURE_COLUMNS = (
    "format",
    "MB",
    "accuracy",
    "agreement",
    "max prob. diff",
    "ms 1 thread p50/p95",
    "ms all p50/p95",
)


def figure_rows(keras_row: dict, rows: dict[str, dict]) -> list[tuple[str, ...]]:
    """The figures as text cells under `FIGURE_COLUMNS`, Keras first (the log's table here,
    the markdown table of benchmarks/export.py)."""
    keras_ms = f"{keras_row['latency']['median_ms']:.2f}/{keras_row['latency']['p95_ms']:.2f}"
    out = [("keras", "", f"{keras_row['accuracy']:.4f}", "1", "0", "", keras_ms)]
    for fmt, row in rows.items():
        if "error" in row:
            out.append((fmt, f"failed: {row['error']}", "", "", "", "", ""))
            continue
        one, every = row["latency_one_thread"], row["latency_all_threads"]
        out.append(
            (
                fmt,
                f"{row['size_bytes'] / 1e6:.2f}",
                f"{row['accuracy']:.4f}",
                f"{row['agreement']:.4f}",
                f"{row['max_probability_difference']:.2g}",
                f"{one['median_ms']:.2f}/{one['p95_ms']:.2f}",
                f"{every['median_ms']:.2f}/{every['p95_ms']:.2f}",
            )
        )
    return out


def table(keras_row: dict, rows: dict[str, dict]) -> str:
    """The figures as a plain-text table for the log."""
    cells = [FIGURE_COLUMNS, *figure_rows(keras_row, rows)]
    widths = [
        max(len(row[i]) for row in cells if not row[1].startswith("failed"))
        for i in range(len(FIGURE_COLUMNS))
    ]
    return "\n".join(
        f"{row[0]:<{widths[0]}} {row[1]}"
        if row[1].startswith("failed")
        else " ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    )


def log_to_mlflow(cfg: DictConfig, export_dir: Path, result: dict) -> str | None:
    """Log the figures and files to the MLflow run evaluate logged the model in; its run id."""
    summary = resolve_path(cfg.paths.reports) / "evaluate.json"
    logged = json.loads(summary.read_text()).get("mlflow") if summary.is_file() else None
    if not logged:
        return None
    import mlflow

    store.reach_store(cfg)
    client = mlflow.MlflowClient()
    run_id = logged["run_id"]
    metrics = {}
    for fmt, row in result["formats"].items():
        for key in ("accuracy", "agreement", "max_probability_difference", "size_bytes"):
            if key in row:
                metrics[f"export.{fmt}.{key}"] = float(row[key])
        for threads in ("one_thread", "all_threads"):
            if f"latency_{threads}" in row:
                metrics[f"export.{fmt}.latency_{threads}_median_ms"] = row[f"latency_{threads}"]["median_ms"]
    metrics["export.keras.latency_median_ms"] = result["keras"]["latency"]["median_ms"]
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_artifacts(run_id, str(export_dir), EXPORT_DIR)
    if logged.get("registered_version") and cfg.tracking.registered_model:
        client.set_model_version_tag(
            cfg.tracking.registered_model, logged["registered_version"], "export_artifacts",
            f"runs:/{run_id}/{EXPORT_DIR}",
        )  # fmt: skip
    return run_id


def turned_off(cfg: DictConfig, final: Path) -> dict:
    """`export.formats=[]`: no SavedModel, no conversion, nothing logged; the outputs DVC
    expects are written all the same (the folder holding only `classes.json`)."""
    built = folders.staging_dir(final)
    (built / "classes.json").write_text(json.dumps(arrays.load_classes(cfg), ensure_ascii=False) + "\n")
    folders.replace_dir(built, final)
    log.info("export.formats is empty: nothing exported (set export.formats=[onnx,tflite_float,tflite_int8])")
    return {"formats": {}}


@stage.reads(
    "export", "seed", "train.batch_size", "tracking", "paths.models", "paths.prepared", "paths.reports"
)
def run(cfg: DictConfig) -> dict:
    """Export the final model to each format, measure each on the test split."""
    model_dir = resolve_path(cfg.paths.models)
    if not cfg.export.formats:
        return turned_off(cfg, model_dir / EXPORT_DIR)
    import keras

    trained = keras.saving.load_model(model_dir / "final.keras", compile=False)
    model = device.float32_model(trained)  # what the converters read: the reference for each format
    classes = arrays.load_classes(cfg)
    size = int(model.input_shape[1])
    images, labels = arrays.load_images(cfg, "test")
    images = np.asarray(images)
    reference = networks.probabilities(
        model.predict(arrays.batches(images, None, cfg.train.batch_size), verbose=0)
    )
    keras_row = {
        "accuracy": round(float(np.mean(reference.argmax(axis=1) == labels)), 6),
        "latency": measure.latency(
            lambda x: model(x.astype(np.float32), training=False), images, cfg.export.latency_runs
        ),
    }
    final = model_dir / EXPORT_DIR
    built = folders.staging_dir(final)
    rows: dict[str, dict] = {}
    try:
        device.save_saved_model(trained, built / device.SAVED_MODEL)
        with tempfile.TemporaryDirectory() as tmp:
            classes_file = Path(tmp) / "classes.json"
            classes_file.write_text(json.dumps(classes, ensure_ascii=False))
            sample = Path(tmp) / "representative.npy"
            np.save(sample, representative_sample(cfg, cfg.export.representative_images))
            for fmt in cfg.export.formats:
                out = built / device.FILES[fmt]
                if problem := convert(fmt, built / device.SAVED_MODEL, out, classes_file, sample):
                    log.warning("%s: conversion failed: %s", fmt, problem)
                    rows[fmt] = {"error": problem}
                    continue
                device.write_sidecar(out, classes, size, fmt)
                try:
                    rows[fmt] = measure_format(out, reference, images, labels, cfg.export.latency_runs)
                except Exception as err:  # noqa: BLE001 - a file its runtime refuses is reported, not fatal
                    said = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
                    log.warning("%s: the runtime could not run it: %s", fmt, said)
                    rows[fmt] = {"error": f"{type(err).__name__}: {said[:500]}"}
        (built / "classes.json").write_text(json.dumps(classes, ensure_ascii=False) + "\n")
        folders.replace_dir(built, final)
    except BaseException:
        import shutil

        shutil.rmtree(built, ignore_errors=True)
        raise
    result = {
        "test_images": int(len(labels)),
        "cpu_count": os.cpu_count(),
        "keras": keras_row,
        "formats": rows,
    }
    log.info("exported to %s, measured on %d test images:\n%s", final, len(labels), table(keras_row, rows))
    if cfg.tracking.enabled:
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import SQLAlchemyError

        try:
            result["mlflow_run"] = log_to_mlflow(cfg, final, result)
        except (MlflowException, SQLAlchemyError) as err:
            raise store.store_error(cfg, err, "while logging the export") from None
    return result


if __name__ == "__main__":
    stage.main("export", run, tensorflow=True)
