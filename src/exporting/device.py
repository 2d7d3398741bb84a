"""The model a device runs: uint8 pixels at the model's input size in, the probability of every
class out; the backbone's preprocessing inside the graph, the augmentation layers left out.

Saved as a TensorFlow SavedModel, the common source of every exported format, with two
signatures: `serving_default` (uint8 pixels) and `float_pixels` (the same values as float32,
which the int8 converter calibrates on). Each exported file gets a side-car `<file stem>.json`
with the class names and what the model takes and gives.
"""

from __future__ import annotations

import json
from pathlib import Path

SAVED_MODEL = "saved_model"
FILES = {"onnx": "model.onnx", "tflite_float": "model_float.tflite", "tflite_int8": "model_int8.tflite"}
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
FLOAT_SIGNATURE = "float_pixels"


def _float32_config(node: object) -> object:
    """A model config with every mixed-precision dtype policy made float32."""
    if isinstance(node, dict):
        policy = node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy")
        if policy and str(node.get("config", {}).get("name", "")).startswith("mixed_"):
            return {**node, "config": {**node["config"], "name": "float32"}}
        return {key: _float32_config(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_float32_config(value) for value in node]
    return node


def float32_model(model):
    """`model` computing in float32: a model trained in mixed precision (bfloat16 or float16
    compute, float32 variables) rebuilt from its config with float32 policies and the same
    weights. Converters and device runtimes get plain float32 graphs."""
    config = model.get_config()
    plain = _float32_config(config)
    if plain == config:
        return model
    rebuilt = type(model).from_config(plain)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def inference_model(model):
    """`model` in float32 without its augmentation layers (identity at inference, but random
    ops that device runtimes lack): the graph from the augmentation block's output on."""
    import keras

    model = float32_model(model)
    try:
        augmentation = model.get_layer("augmentation")
    except ValueError:
        return model
    return keras.Model(augmentation.output, model.output, name=f"{model.name}_inference")


def device_module(model):
    """A `tf.Module` whose functions take uint8 (or float32) pixels and return all class
    probabilities (a sigmoid output becomes two columns)."""
    import tensorflow as tf

    inner = inference_model(model)
    size = int(model.input_shape[1])
    shape = [None, size, size, 3]

    def probabilities(pixels):
        raw = tf.cast(inner(pixels, training=False), tf.float32)
        if raw.shape[-1] == 1:  # binary: the probability of the second class
            raw = tf.concat([1.0 - raw, raw], axis=-1)
        return {OUTPUT_NAME: raw}

    class Device(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec(shape, tf.uint8, name=INPUT_NAME)])
        def pixels(self, image):
            return probabilities(tf.cast(image, tf.float32))

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)])
        def float_pixels(self, image):
            return probabilities(image)

    module = Device()
    module.model = inner  # tracked: its variables are saved
    return module


def save_saved_model(model, folder: Path) -> Path:
    """Write the device model as a SavedModel to `folder`; returns it."""
    import tensorflow as tf

    module = device_module(model)
    signatures = {"serving_default": module.pixels, FLOAT_SIGNATURE: module.float_pixels}
    tf.saved_model.save(module, str(folder), signatures=signatures)
    return folder


def write_sidecar(path: Path, classes: list[str], size: int, fmt: str) -> Path:
    """`<stem>.json` beside an exported file: its classes and its input and output."""
    sidecar = path.with_suffix(".json")
    sidecar.write_text(
        json.dumps(
            {
                "classes": list(classes),
                "format": fmt,
                "input": {
                    "name": INPUT_NAME,
                    "dtype": "uint8",
                    "shape": [None, size, size, 3],
                    "range": "0-255 RGB",
                },
                "output": {"name": OUTPUT_NAME, "dtype": "float32", "meaning": "probability of each class"},
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    return sidecar


def read_classes(path: Path) -> list[str]:
    """The class names of an exported file, from its side-car JSON (or `classes.json` beside it)."""
    for candidate in (path.with_suffix(".json"), path.with_name("classes.json")):
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            return list(data["classes"] if isinstance(data, dict) else data)
    raise FileNotFoundError(f"{path}: no {path.with_suffix('.json').name} beside it naming its classes")
