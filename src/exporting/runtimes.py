"""Running an exported file: ONNX through onnxruntime, LiteRT through `ai-edge-litert`'s
interpreter, with the Keras-like face `src.serving.loading` uses (`input_shape`, `predict`) so
`src.predict --model model_int8.tflite` classifies images with it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

EXPORTED_SUFFIXES = (".onnx", ".tflite")


class ExportedModel:
    """An exported classifier: uint8 pixels in, every class's probability out. `threads` caps
    the runtime's threads (None: all cores)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if self.path.suffix == ".onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default, all cores
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
            shape = self._session.get_inputs()[0].shape
        elif self.path.suffix == ".tflite":
            from ai_edge_litert.interpreter import Interpreter

            self._interpreter = Interpreter(model_path=str(self.path), num_threads=threads or os.cpu_count())
            self._interpreter.allocate_tensors()
            detail = self._interpreter.get_input_details()[0]
            self._in, self._out = detail["index"], self._interpreter.get_output_details()[0]["index"]
            shape = list(detail["shape"])
        else:
            raise ValueError(f"{path}: not an exported model ({', '.join(EXPORTED_SUFFIXES)})")
        self.input_shape = (None, int(shape[1]), int(shape[2]), 3)

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for uint8 images (N, size, size, 3); LiteRT runs them one at a time."""
        images = np.asarray(images, dtype=np.uint8)
        if self.path.suffix == ".onnx":
            return np.asarray(self._session.run(None, {self._input: images})[0], dtype=np.float32)
        rows = []
        for image in images:
            self._interpreter.set_tensor(self._in, image[None])
            self._interpreter.invoke()
            rows.append(np.array(self._interpreter.get_tensor(self._out)[0], dtype=np.float32))
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    def predict(self, images: np.ndarray, verbose: int = 0, batch_size: int = 32) -> np.ndarray:
        """As Keras' `predict`: pixels 0-255 (any dtype, rounded to uint8)."""
        pixels = np.clip(np.rint(np.asarray(images, dtype=np.float32)), 0, 255).astype(np.uint8)
        parts = [self.predict_batch(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
