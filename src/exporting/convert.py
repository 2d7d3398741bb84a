"""Convert the device SavedModel to one format, in a process of its own (TensorFlow's converter
keeps memory after every call in 2.20/2.21, and a failing conversion must not end the others):

    python -m src.exporting.convert onnx SAVED_MODEL OUT --classes classes.json
    python -m src.exporting.convert tflite_float SAVED_MODEL OUT
    python -m src.exporting.convert tflite_int8 SAVED_MODEL OUT --representative images.npy

- `onnx`: tf2onnx (opset 17) from the uint8 signature; the class names in the model's metadata
  (`classes`, JSON).
- `tflite_float`: LiteRT, float32 weights, uint8 input.
- `tflite_int8`: full-integer quantisation, built-in int8 ops only (the plain LiteRT runtime runs
  it), weights and activations calibrated on the representative images (uint8, N x size x size x
  3, a sample of the training split), uint8 input, float32 probabilities out.

The file is written under a temp name and renamed into place; exit status 1 with one line on
stderr saying why when the conversion fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from src.exporting.device import FLOAT_SIGNATURE, INPUT_NAME


def _frozen(saved_model: Path, signature: str):
    """The SavedModel's `signature` with its variables folded into constants (LiteRT cannot
    read resource variables)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    loaded = tf.saved_model.load(str(saved_model))
    return convert_variables_to_constants_v2(loaded.signatures[signature])


def to_onnx(saved_model: Path, out: Path, classes: list[str]) -> None:
    import onnx
    import tensorflow as tf
    import tf2onnx

    loaded = tf.saved_model.load(str(saved_model))
    function = loaded.signatures["serving_default"]
    spec = function.structured_input_signature[1][INPUT_NAME]
    wrapped = tf.function(lambda image: function(image=image))
    tf2onnx.convert.from_function(
        wrapped, input_signature=[tf.TensorSpec(spec.shape, spec.dtype, name=INPUT_NAME)], opset=17,
        output_path=str(out),
    )  # fmt: skip
    model = onnx.load(str(out))
    entry = model.metadata_props.add()
    entry.key, entry.value = "classes", json.dumps(classes, ensure_ascii=False)
    onnx.save(model, str(out))


def to_tflite(saved_model: Path, out: Path, representative: np.ndarray | None) -> None:
    import tensorflow as tf

    signature = "serving_default" if representative is None else FLOAT_SIGNATURE
    converter = tf.lite.TFLiteConverter.from_concrete_functions([_frozen(saved_model, signature)])
    if representative is not None:  # full-integer int8, calibrated on these images
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [representative[i : i + 1].astype(np.float32)] for i in range(len(representative))
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8  # pixels as they are; quantised with scale 1
        converter.inference_output_type = tf.float32  # probabilities, not their int8 codes
    out.write_bytes(converter.convert())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.exporting.convert", description=__doc__.splitlines()[0]
    )
    parser.add_argument("format", choices=("onnx", "tflite_float", "tflite_int8"))
    parser.add_argument("saved_model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=Path, help="a JSON list of the class names (onnx)")
    parser.add_argument("--representative", type=Path, help="uint8 images, .npy (tflite_int8)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        if args.format == "onnx":
            to_onnx(args.saved_model, tmp, json.loads(args.classes.read_text()) if args.classes else [])
        elif args.format == "tflite_float":
            to_tflite(args.saved_model, tmp, None)
        else:
            if args.representative is None:
                raise ValueError("tflite_int8 needs --representative images")
            to_tflite(args.saved_model, tmp, np.load(args.representative))
        os.replace(tmp, args.out)
    except Exception as err:  # noqa: BLE001 - reported as one line; the stage goes on with the others
        tmp.unlink(missing_ok=True)
        said = next((line for line in str(err).splitlines() if line.strip()), "")
        print(f"{type(err).__name__}: {said[:500]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
