"""Test-time augmentation: a model's class probabilities averaged over each image and augmented
views of it, drawn by the model's own augmentation block (the random layers it was trained with,
so only changes its training taught it to ignore: no flips for a model trained without them).

A view is the image passed through that block in training mode, then through the whole model in
inference mode (where the block is the identity). The views of a run are reproducible: the
block's random layers restart from their saved seeds, advanced the same way for the same images
and batch size.
"""

from __future__ import annotations

import numpy as np

from src.evaluation.calibration import as_matrix

AUGMENTATION_LAYER = "augmentation"  # src.models.networks.augmentation names the block so


def augmentation_block(model):
    """The Keras model's augmentation block; None for a model trained with every augment.* off,
    or one that is no Keras model (an exported ONNX or LiteRT file)."""
    try:
        return model.get_layer(AUGMENTATION_LAYER)
    except (ValueError, AttributeError):
        return None


def averaged_probabilities(
    model, images: np.ndarray, probs: np.ndarray, views: int, batch_size: int
) -> np.ndarray:
    """(N, n_classes) probabilities of `model` averaged over each image itself (`probs`, its
    probabilities of `images` as they are) and `views` augmented views of it."""
    import keras

    augment = augmentation_block(model)
    if augment is None:
        raise ValueError(f"model {model.name!r} has no {AUGMENTATION_LAYER!r} block to draw views with")
    total = np.array(probs, dtype=np.float64)
    for _ in range(views):
        for start in range(0, len(images), batch_size):
            x = np.asarray(images[start : start + batch_size], dtype=np.float32)
            view = augment(x, training=True)  # the random layers draw; the model's own call skips them
            raw = keras.ops.convert_to_numpy(model.predict_on_batch(view))
            total[start : start + len(x)] += as_matrix(raw)
    return total / (views + 1)
