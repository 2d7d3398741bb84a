"""Load a trained model (a `.keras` file or an MLflow model URI) with its class names and
temperature, read images, and classify them."""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np

from src.evaluation.calibration import TEMPERATURE_FILE, apply_temperature, as_matrix
from src.evaluation.views import averaged_probabilities
from src.images.decode import IMAGE_SUFFIXES, load_rgb, natural_key
from src.images.files import walk_files

T = TypeVar("T")
USAGE_HINT = "pass --model a .keras file saved by the pipeline (models/final.keras) or an MLflow model URI"


class ModelError(Exception):
    """A `--model` argument that does not name a usable model."""


def default_model() -> Path:
    """The pipeline's final model, `<paths.models>/final.keras` of params.yaml. The configuration
    is imported here only: a served model loads without Hydra or OmegaConf."""
    from src.config.compose import load_params
    from src.config.paths import resolve_path

    return resolve_path(load_params().paths.models) / "final.keras"


def _store_uri() -> str:
    """The MLflow store params.yaml names (or $MLFLOW_TRACKING_URI, or the local store)."""
    from src.config.compose import load_params
    from src.tracking import store

    return store.tracking_uri(load_params())


def image_files(target: Path) -> list[Path]:
    """The image itself, or the images under a folder (recursively, in natural order, symlinks
    followed), leaving out hidden files and folders and files without an image suffix."""
    if target.is_file():
        return [target]
    if target.is_dir():
        files = [p for p in walk_files(target) if p.suffix.lower() in IMAGE_SUFFIXES]
        return sorted(files, key=lambda p: natural_key(str(p.relative_to(target))))
    raise FileNotFoundError(f"{target} is neither an image nor a folder")


def _first_sentence(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip()
    line = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def load_keras_file(spec: str | None) -> tuple[object, list[str]]:
    """(Keras model, class names) from a .keras file and the `classes.json` beside it (None: the
    pipeline's final model); a ModelError when either is missing or unreadable."""
    path = Path(spec) if spec else default_model()
    name = f"--model {spec}" if spec else f"the default model {path}"
    if not path.is_file():
        fix = USAGE_HINT if spec else f"run `dvc repro` first or {USAGE_HINT}"
        raise ModelError(f"{name}: no such file; {fix}")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ModelError(f"{name}: not a Keras model (a .keras file is a zip archive); {USAGE_HINT}")
    import keras

    try:
        model = keras.saving.load_model(path, compile=False)  # to predict: no optimizer state
    except Exception as err:  # Keras raises ValueError, OSError, zip errors, ... for what is not a model
        raise ModelError(f"{name}: not a Keras model ({_first_sentence(err)}); {USAGE_HINT}") from None
    classes_file = path.with_name("classes.json")  # train_head writes it beside the models
    try:
        classes = json.loads(classes_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(
            f"{name}: needs the class names in {classes_file} beside it ({_first_sentence(err)}); "
            "copy the classes.json written by train_head there"
        ) from None
    return model, classes


def _checked_temperature(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ModelError(f"{where}: the temperature must be a positive number, got {value!r}")
    return float(value)


def read_temperature_file(file: Path) -> float | None:
    """The temperature in a `temperature.json` written by the evaluate stage, None when there is
    no such file; a ModelError when it is not a temperature file."""
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text())["temperature"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelError(
            f'{file}: not a temperature file ({_first_sentence(err)}); expected {{"temperature": T}} '
            "as the evaluate stage writes it, or remove it to print uncalibrated probabilities"
        ) from None
    return _checked_temperature(value, str(file))


def _keras_file_temperature(spec: str | None) -> float | None:
    path = Path(spec) if spec else default_model()
    return read_temperature_file(path.with_name(TEMPERATURE_FILE))


def _mlflow_temperature(spec: str) -> float | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(_store_uri())
    try:
        info = mlflow.models.get_model_info(spec)
        value = (info.metadata or {}).get("temperature")
        if value is None and info.run_id:
            value = mlflow.MlflowClient().get_run(info.run_id).data.metrics.get("temperature")
    except (MlflowException, OSError) as err:
        raise ModelError(f"--model {spec}: cannot read its temperature ({_first_sentence(err)})") from None
    return None if value is None else _checked_temperature(value, f"--model {spec}")


def load_temperature(spec: str | None) -> float | None:
    """The temperature fitted for the model `spec` names (see `load_model`), or None when there is
    none: the probabilities are then printed as the model gives them."""
    if spec is None or ":/" not in spec:
        return _keras_file_temperature(spec)
    return _mlflow_temperature(spec)


def _load_mlflow_model(spec: str) -> tuple[object, list[str]]:
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = _store_uri()
    mlflow.set_tracking_uri(uri)
    try:
        info = mlflow.models.get_model_info(spec)
        # older models were saved with the tensorflow flavor only
        load = mlflow.keras.load_model if "keras" in info.flavors else mlflow.tensorflow.load_model
        # MLflow downloads a remote model to a folder it never removes: use one that goes once
        # the model is in memory
        with tempfile.TemporaryDirectory(prefix="model-") as folder:
            model = load(spec, dst_path=folder)
    except (MlflowException, OSError) as err:
        raise ModelError(
            f"--model {spec}: cannot be loaded from the MLflow store {uri} ({_first_sentence(err)}); "
            "check the URI (mlflow ui lists runs and registered models), point MLFLOW_TRACKING_URI "
            "or tracking.uri at the store that holds it, or pass a .keras file"
        ) from None
    classes = (info.metadata or {}).get("classes")
    if not classes:
        raise ModelError(f"--model {spec}: the model has no class names in its metadata; {USAGE_HINT}")
    return model, list(classes)


def load_model(spec: str | None) -> tuple[object, list[str]]:
    """(Keras model, class names) from a .keras path or an MLflow model URI; a ModelError
    (naming the argument and what to do) when it is missing or not a model."""
    if spec is None or ":/" not in spec:
        return load_keras_file(spec)
    return _load_mlflow_model(spec)


def decode_each(items: Sequence[T], decode: Callable[[T], np.ndarray]) -> list[np.ndarray | str]:
    """`decode(item)` for each item, 4 at a time (PIL releases the GIL while decoding): the
    image, or the reason (`<error type>: <message>`) it could not be decoded."""

    def one(item: T) -> np.ndarray | str:
        try:
            return decode(item)
        except Exception as err:  # any unreadable image is reported, never fatal
            return f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, items))


def load_rgb_bytes(data: bytes, size: int) -> np.ndarray:
    """An image file's bytes decoded as `load_rgb` decodes the file (same resizing, same pixel
    cap, checked before any pixel is decoded)."""
    return load_rgb(io.BytesIO(data), size)


def open_regular_file(path: str) -> BinaryIO:
    """`path` opened for reading when it is a regular file (after symlinks), an OSError
    otherwise. Opened without blocking, so a FIFO or a device never hangs the caller, and
    checked on the open descriptor, so the file cannot be swapped after the check."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_rgb_regular_file(path: str, size: int) -> np.ndarray:
    """`load_rgb` of a regular file only (see `open_regular_file`)."""
    with open_regular_file(path) as file:
        return load_rgb(file, size)


def read_images(files: list[Path], size: int) -> tuple[list[Path], np.ndarray, list[tuple[Path, str]]]:
    """Decode each file on its own: (readable paths, their size x size x 3 uint8 images,
    (path, reason) for each file that could not be read)."""
    decoded = decode_each(files, lambda path: load_rgb(path, size))
    good = [(path, array) for path, array in zip(files, decoded) if not isinstance(array, str)]
    bad = [(path, reason) for path, reason in zip(files, decoded) if isinstance(reason, str)]
    images = np.stack([a for _, a in good]) if good else np.zeros((0, size, size, 3), np.uint8)
    return [p for p, _ in good], images, bad


def class_probabilities(
    model, images: np.ndarray, temperature: float | None = None, views: int = 0
) -> np.ndarray:
    """The (N, n_classes) probabilities `model` gives uint8 `images` (N, size, size, 3),
    averaged with `views` augmented views of each (a Keras model with an augmentation block:
    src/evaluation/views.py), calibrated with `temperature` when one is given."""
    probs = as_matrix(model.predict(images.astype(np.float32), verbose=0))  # a sigmoid output: 2 columns
    if views:
        probs = averaged_probabilities(model, images, probs, views, len(images))
    return probs if temperature is None else apply_temperature(probs, temperature)


def predict(
    model,
    classes: list[str],
    files: list[Path],
    batch_size: int = 32,
    skipped: list[tuple[Path, str]] | None = None,
    temperature: float | None = None,
    views: int = 0,
) -> list[dict]:
    """Class, its probability and every class's probability (`probabilities`, in class order)
    for each readable image file, in order, averaged over the image and `views` augmented views
    of it, calibrated with `temperature` when one is given (`load_temperature`). Unreadable
    files are left out and appended to `skipped` as (path, reason)."""
    size = model.input_shape[1]
    results = []
    for start in range(0, len(files), batch_size):
        paths, batch, bad = read_images(files[start : start + batch_size], size)
        if skipped is not None:
            skipped.extend(bad)
        if not paths:
            continue
        for path, p in zip(paths, class_probabilities(model, batch, temperature, views)):
            best = int(p.argmax())
            results.append(
                {"path": str(path), "class": classes[best], "probability": float(p[best]), "probabilities": p}
            )
    return results
