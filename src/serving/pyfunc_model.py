"""The registered MLflow model: the pipeline's classifier as an MLflow pyfunc that takes images.

    model = mlflow.pyfunc.load_model("models:/image-classifier@champion")
    model.predict(["cat.jpg", "dog.png"])              # paths, or a DataFrame with a `path` column
    model.predict(pd.DataFrame({"image": [b64, ...]})) # image files' bytes, base64-encoded
    model.predict(images)                              # uint8 pixels, (N, size, size, 3)

answers one row per image, in order: `class` (the name), `probability` (of that class) and
`p_<class>` for every class, calibrated with the run's temperature when evaluate fitted one.
`mlflow models serve` answers the same rows as JSON, e.g. for
`{"dataframe_records": [{"image": "<base64 of a JPEG>"}]}`, `{"inputs": {"image": [...]}}` or
`{"inputs": [<uint8 image>, ...]}`. Encoded images are decoded and resized as `prepare` does
(`src.images.decode.load_rgb`, same pixel cap), so a client never preprocesses.

Paths are read in the process that runs the model: `load_model(...).predict(paths)` and
`src.predict` read the paths they are given, but a served model (`mlflow models serve`, see
`served`) refuses every path unless the operator allows folders with
`IMAGE_CLASSIFIER_ALLOWED_DIRS` (`os.pathsep`-separated); then it reads only regular files whose
real path lies inside one. A refused path gets the same answer whether it exists or not.

The model folder holds the Keras network, `classes.json` and (when fitted) `temperature.json`,
laid out as the pipeline's `models/` folder is, and read by the same `src.predict` helpers. Its
MLmodel also names a `keras` flavor for that network: `mlflow.keras.load_model` on the
registered model gives the bare Keras model. `src.tracking` logs it through `Model.log` with
this module as the flavor (`save_model` below).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import posixpath
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema

from src.serving import loading

ARTIFACT = "classifier"  # the model folder's artifact: final.keras, classes.json, temperature.json
KERAS_FILE = "final.keras"
CLASSES_FILE = "classes.json"
PROBABILITY_PREFIX = "p_"  # per-class probability columns: p_cats, p_dogs, ...
BATCH_SIZE = 32  # image files decoded and classified at a time
SRC_DIR = Path(__file__).resolve().parents[1]  # logged with the model: the code it runs
MODEL_CODE = Path(__file__).with_name("model_code.py")  # builds an ImageClassifier when loaded
IMAGE_COLUMN = "image"  # base64-encoded image files (str), or their bytes (bytes, in Python)
PATH_COLUMN = "path"
ALLOWED_DIRS_ENV = "IMAGE_CLASSIFIER_ALLOWED_DIRS"  # folders a served model may read paths in
MAX_IMAGE_BYTES = 20_000_000  # an encoded image's bytes, checked before base64-decoding them
MAX_PIXEL_VALUES = 64_000_000  # uint8 values in a pixel-array input (about 425 images of 224 px)
# Set by MLflow's scoring server (`mlflow models serve`, `mlflow models predict`) in its process.
SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
SCORING_SERVER_APP = "mlflow.pyfunc.scoring_server.app"  # the module uvicorn runs to serve a model
DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]*)*;base64,", re.ASCII)

ImageInput = pd.DataFrame | np.ndarray | list | tuple


def _invalid(message: str) -> MlflowException:
    """An error the scoring server answers with 400 and this message."""
    return MlflowException.invalid_parameter_value(message)


def served() -> bool:
    """Whether this process is MLflow's scoring server: uvicorn imported its app module to load
    the model, and its `init` marked the process as serving (also `mlflow models predict`)."""
    flag = os.environ.get(SERVING_ENV, "").strip().lower() in ("true", "1")
    return flag or SCORING_SERVER_APP in sys.modules


def allowed_dirs() -> list[str]:
    """The real paths of the folders `IMAGE_CLASSIFIER_ALLOWED_DIRS` names (none: no path is read
    by a served model)."""
    folders = os.environ.get(ALLOWED_DIRS_ENV, "").split(os.pathsep)
    return [os.path.realpath(folder) for folder in folders if folder.strip()]


def path_refusal(path: str) -> str:
    """The one answer to a path a served model will not read, whether it exists or not."""
    return (
        f"path inputs are not allowed for {path}: send the image's bytes base64-encoded (an "
        f"`{IMAGE_COLUMN}` column), or have the operator allow its folder with {ALLOWED_DIRS_ENV}"
    )


def allowed_path(path: str, folders: list[str]) -> str | None:
    """The real path of `path` when a served model may read it: a regular file (symlinks
    resolved) inside one of `folders`; None otherwise. Nothing is opened."""
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, folder]) == folder for folder in folders):
        return None
    try:
        return real if stat.S_ISREG(os.stat(real).st_mode) else None
    except (OSError, ValueError):
        return None


def _column(model_input: pd.DataFrame | dict, name: str) -> list | None:
    if name not in model_input:
        return None
    values = model_input[name]
    return list(values.tolist() if isinstance(values, (np.ndarray, pd.Series)) else np.ravel(values).tolist())


def input_paths(model_input: ImageInput) -> list[str] | None:
    """The image file paths `model_input` holds (a DataFrame's `path` column, a list of str, a
    1-D array of str), or None when it holds pixels or encoded images."""
    if isinstance(model_input, (pd.DataFrame, dict)):
        if IMAGE_COLUMN in model_input:
            return None
        paths = _column(model_input, PATH_COLUMN)
        if paths is None:
            columns = list(model_input.keys())
            raise _invalid(
                f"a DataFrame input needs an `{IMAGE_COLUMN}` column of base64-encoded image files "
                f"or a `{PATH_COLUMN}` column of image files, got columns {columns}"
            )
        return [str(p) for p in paths]
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind in "UO" and model_input.ndim == 1:
        model_input = model_input.tolist()
    if isinstance(model_input, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in model_input):
        return [str(p) for p in model_input]
    return None


def input_encoded(model_input: ImageInput) -> list | None:
    """The encoded images of an `image` column (a DataFrame's, or a dict's as `{"inputs":
    {"image": [...]}}` reaches the model), None when there is none."""
    if isinstance(model_input, (pd.DataFrame, dict)):
        return _column(model_input, IMAGE_COLUMN)
    return None


def image_bytes(value: object, row: int) -> bytes:
    """The image file bytes of row `row`: base64 text (a `data:...;base64,` prefix allowed) or,
    in Python, bytes; an error naming the row when it is neither or over MAX_IMAGE_BYTES."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = DATA_URL.sub("", value.strip(), count=1)
        # 4 characters per 3 bytes: refuse before decoding anything
        if len(text) > 4 * math.ceil(MAX_IMAGE_BYTES / 3) + 4:
            raise _invalid(f"image {row}: over {MAX_IMAGE_BYTES:,} bytes once decoded; send a smaller image")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise _invalid(f"image {row}: not base64-encoded image bytes ({err})") from None
    else:
        kind = type(value).__name__
        raise _invalid(f"image {row}: expected base64-encoded image bytes (a string), got {kind}")
    if len(data) > MAX_IMAGE_BYTES:
        raise _invalid(f"image {row}: {len(data):,} bytes, over {MAX_IMAGE_BYTES:,}; send a smaller image")
    if not data:
        raise _invalid(f"image {row}: empty")
    return data


def _nested_shape(value: object) -> list[int]:
    """The shape of nested lists, read along their first elements (no conversion)."""
    shape = []
    while isinstance(value, (list, tuple)):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _check_pixel_values(count: int, shape: object, size: int) -> None:
    if count > MAX_PIXEL_VALUES:
        raise _invalid(
            f"a pixel-array input of {count:,} values (shape {shape}) is over {MAX_PIXEL_VALUES:,}; "
            f"send fewer images per request, each (N, {size}, {size}, 3), or base64-encoded files"
        )


def input_images(model_input: ImageInput, size: int) -> np.ndarray:
    """`model_input` as a uint8 (N, size, size, 3) batch: uint8 pixels, or integers 0-255 (what
    JSON numbers become). An input of more than MAX_PIXEL_VALUES values is refused before any
    conversion."""
    if isinstance(model_input, np.ndarray):
        _check_pixel_values(model_input.size, model_input.shape, size)
    else:
        shape = _nested_shape(model_input)
        _check_pixel_values(math.prod(shape), tuple(shape), size)
    try:
        images = np.asarray(model_input)
    except ValueError as err:  # ragged nested lists
        raise _invalid(f"images must be an array (N, {size}, {size}, 3): {err}") from None
    _check_pixel_values(images.size, images.shape, size)  # lists ragged past their first elements
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise _invalid(
            f"images must be uint8 pixels (N, {size}, {size}, 3), got shape {images.shape}; "
            f"or pass image files base64-encoded (a DataFrame with an `{IMAGE_COLUMN}` column) or "
            f"paths (a list of str or a DataFrame with a `{PATH_COLUMN}` column)"
        )
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind not in "iu":
        raise _invalid(f"pixels must be integers from 0 to 255 (uint8), got {images.dtype}")
    if images.size and not 0 <= images.min() <= images.max() <= 255:
        low, high = images.min(), images.max()
        raise _invalid(f"pixels must be integers from 0 to 255 (uint8), got values from {low} to {high}")
    return images.astype(np.uint8)


def _stack(decoded: list[np.ndarray | str], names: list[str], size: int) -> np.ndarray:
    """The decoded images stacked, or one error naming every one that could not be decoded."""
    bad = [f"{name}: {reason}" for name, reason in zip(names, decoded) if isinstance(reason, str)]
    if bad:
        raise _invalid("cannot read " + "; ".join(bad))
    return np.stack(decoded) if decoded else np.zeros((0, size, size, 3), np.uint8)


def prediction_frame(classes: list[str], probs: np.ndarray) -> pd.DataFrame:
    """One row per image: `class`, `probability` (of that class), `p_<class>` for each class."""
    probs = probs.reshape(-1, len(classes))
    best = probs.argmax(axis=1)
    frame = pd.DataFrame(
        {"class": [classes[i] for i in best], "probability": probs[np.arange(len(probs)), best]}
    )
    for i, name in enumerate(classes):
        frame[PROBABILITY_PREFIX + name] = probs[:, i]
    return frame


def signature(classes: list[str]) -> ModelSignature:
    """The columns `prediction_frame` answers; no input schema: `ImageClassifier.predict` takes
    paths or pixels and checks them itself."""
    columns = [ColSpec("string", "class"), ColSpec("double", "probability")]
    columns += [ColSpec("double", PROBABILITY_PREFIX + name) for name in classes]
    return ModelSignature(outputs=Schema(columns))


class ImageClassifier(PythonModel):
    """Class names and per-class probabilities for image files or uint8 pixel arrays."""

    # MLflow validates the input against predict()'s type hint and takes no unions (it warns
    # about them at class creation and on every save): `model_input` (an ImageInput) carries no
    # hint and predict() checks it itself.
    _skip_type_hint_validation = True

    def load_context(self, context: PythonModelContext) -> None:
        """The Keras model, its classes and temperature from the model folder."""
        keras_file = Path(context.artifacts[ARTIFACT]) / KERAS_FILE
        self.model, self.classes = loading.load_keras_file(str(keras_file))
        self.temperature = loading.read_temperature_file(keras_file.with_name(loading.TEMPERATURE_FILE))
        self.size = int(self.model.input_shape[1])

    def predict(
        self, context: PythonModelContext, model_input, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """A row per image (see `prediction_frame`); an error naming each image that cannot be
        read, or saying what input is expected."""
        encoded = input_encoded(model_input)
        if encoded is not None:
            return self._classify_batches(
                [image_bytes(value, row) for row, value in enumerate(encoded)],
                [f"image {row}" for row in range(len(encoded))],
                lambda data: loading.load_rgb_bytes(data, self.size),
            )
        paths = input_paths(model_input)
        if paths is None:
            images = input_images(model_input, self.size)
            probs = np.zeros((0, len(self.classes)))
            if len(images):
                probs = loading.class_probabilities(self.model, images, self.temperature)
            return prediction_frame(self.classes, probs)
        if served():
            return self._classify_served_paths(paths)
        skipped: list[tuple[Path, str]] = []
        rows = loading.predict(
            self.model,
            self.classes,
            [Path(p) for p in paths],
            batch_size=BATCH_SIZE,
            skipped=skipped,
            temperature=self.temperature,
        )
        if skipped:
            raise _invalid("cannot read " + "; ".join(f"{path}: {reason}" for path, reason in skipped))
        return prediction_frame(self.classes, np.array([row["probabilities"] for row in rows]))

    def _classify_served_paths(self, paths: list[str]) -> pd.DataFrame:
        """Paths in a served model: only regular files inside IMAGE_CLASSIFIER_ALLOWED_DIRS."""
        folders = allowed_dirs()
        real = [allowed_path(path, folders) if folders else None for path in paths]
        refused = [path_refusal(path) for path, ok in zip(paths, real) if ok is None]
        if refused:
            raise _invalid("; ".join(refused))
        return self._classify_batches(
            real, paths, lambda path: loading.load_rgb_regular_file(path, self.size)
        )

    def _classify_batches(self, items: list, names: list[str], decode) -> pd.DataFrame:
        """Decode `items` (named `names` in errors) BATCH_SIZE at a time and classify them; every
        item is checked before any is classified."""
        probs = [np.zeros((0, len(self.classes)))]
        for start in range(0, len(items), BATCH_SIZE):
            batch = slice(start, start + BATCH_SIZE)
            images = _stack(loading.decode_each(items[batch], decode), names[batch], self.size)
            probs.append(loading.class_probabilities(self.model, images, self.temperature))
        return prediction_frame(self.classes, np.concatenate(probs))


def save_model(
    path: str,
    mlflow_model: Model,
    *,
    keras_model,
    classes: list[str],
    temperature_file: Path | None = None,
    **kwargs: Any,
) -> None:
    """Save the classifier as an MLflow model at `path` (`Model.log` calls this with this module
    as the flavor): the pyfunc flavor (`ImageClassifier`, with the `src` code it runs) and a
    `keras` flavor for the same .keras file. `kwargs` go to `mlflow.pyfunc.save_model`."""
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / ARTIFACT
        folder.mkdir()
        keras_model.save(folder / KERAS_FILE)
        (folder / CLASSES_FILE).write_text(json.dumps(list(classes), ensure_ascii=False) + "\n")
        if temperature_file is not None:
            shutil.copyfile(temperature_file, folder / loading.TEMPERATURE_FILE)
        mlflow.pyfunc.save_model(
            path,
            python_model=str(MODEL_CODE),  # models from code: nothing pickled
            artifacts={ARTIFACT: str(folder)},
            code_paths=[str(SRC_DIR)],
            mlflow_model=mlflow_model,
            **kwargs,
        )
    saved = mlflow_model.flavors["python_function"]["artifacts"][ARTIFACT]["path"]
    mlflow_model.add_flavor(
        "keras",
        data=posixpath.join(saved, Path(KERAS_FILE).stem),  # the flavor's loaders add `.keras`
        keras_version=keras.__version__,
        keras_backend=keras.backend.backend(),
        save_exported_model=False,
        keras_module="keras",  # with save_format: what mlflow.tensorflow.load_model reads
        save_format="keras",
    )
    mlflow_model.save(os.path.join(path, "MLmodel"))
