"""The registered MLflow model: the pipeline's classifier as an MLflow pyfunc that takes images.

    model = mlflow.pyfunc.load_model("models:/image-classifier@champion")
    model.predict(["cat.jpg", "dog.png"])              # paths, or a DataFrame with a `path` column
    model.predict(images)                              # uint8 pixels, (N, size, size, 3)

answers one row per image, in order: `class` (the name), `probability` (of that class) and
`p_<class>` for every class, calibrated with the run's temperature when evaluate fitted one.
`mlflow models serve` answers the same rows as JSON, e.g. for
`{"dataframe_records": [{"path": "/data/cat.jpg"}]}` or `{"inputs": [<uint8 image>, ...]}`.

The model folder holds the Keras network, `classes.json` and (when fitted) `temperature.json`,
laid out as the pipeline's `models/` folder is, and read by the same `src.predict` helpers. Its
MLmodel also names a `keras` flavor for that network: `mlflow.keras.load_model` on the
registered model gives the bare Keras model. `src.tracking` logs it through `Model.log` with
this module as the flavor (`save_model` below).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
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

ImageInput = pd.DataFrame | np.ndarray | list | tuple


def _invalid(message: str) -> MlflowException:
    """An error the scoring server answers with 400 and this message."""
    return MlflowException.invalid_parameter_value(message)


def input_paths(model_input: ImageInput) -> list[str] | None:
    """The image file paths `model_input` holds (a DataFrame's `path` column, a list of str, a
    1-D array of str), or None when it holds pixels."""
    if isinstance(model_input, pd.DataFrame):
        if "path" not in model_input.columns:
            columns = list(model_input.columns)
            raise _invalid(f"a DataFrame input needs a `path` column of image files, got columns {columns}")
        return [str(p) for p in model_input["path"]]
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind in "UO" and model_input.ndim == 1:
        model_input = model_input.tolist()
    if isinstance(model_input, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in model_input):
        return [str(p) for p in model_input]
    return None


def input_images(model_input: ImageInput, size: int) -> np.ndarray:
    """`model_input` as a uint8 (N, size, size, 3) batch: uint8 pixels, or integers 0-255 (what
    JSON numbers become)."""
    try:
        images = np.asarray(model_input)
    except ValueError as err:  # ragged nested lists
        raise _invalid(f"images must be an array (N, {size}, {size}, 3): {err}") from None
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise _invalid(
            f"images must be uint8 pixels (N, {size}, {size}, 3), got shape {images.shape}; "
            "or pass image file paths (a list of str or a DataFrame with a `path` column)"
        )
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind not in "iu":
        raise _invalid(f"pixels must be integers from 0 to 255 (uint8), got {images.dtype}")
    if images.size and not 0 <= images.min() <= images.max() <= 255:
        low, high = images.min(), images.max()
        raise _invalid(f"pixels must be integers from 0 to 255 (uint8), got values from {low} to {high}")
    return images.astype(np.uint8)


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
        """A row per image (see `prediction_frame`); an error naming each file that cannot be
        read, or saying what input is expected."""
        paths = input_paths(model_input)
        if paths is None:
            images = input_images(model_input, self.size)
            probs = np.zeros((0, len(self.classes)))
            if len(images):
                probs = loading.class_probabilities(self.model, images, self.temperature)
            return prediction_frame(self.classes, probs)
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
            python_model=ImageClassifier(),
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
