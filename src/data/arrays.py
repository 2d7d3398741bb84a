"""Read what `prepare` and `extract` wrote: the class list, each split's images or features and
labels as memory-mapped arrays, and `tf.data` pipelines that stream their batches without
loading a whole split into memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from src.config.paths import resolve_path
from src.errors import StageError


def prepared_dir(cfg: DictConfig) -> Path:
    return resolve_path(cfg.paths.prepared)


def load_classes(cfg: DictConfig) -> list[str]:
    """The class list `prepare` saved; label i is classes[i]."""
    path = prepared_dir(cfg) / "classes.json"
    if not path.is_file():
        raise StageError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return json.loads(path.read_text())


def load_split(folder: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(`<name>_<split>.npy` memory-mapped read-only, labels) from a stage's output folder."""
    array_path = folder / f"{name}_{split}.npy"
    labels_path = folder / f"labels_{split}.npy"
    for path in (array_path, labels_path):
        if not path.is_file():
            raise StageError(f"{path} not found: rerun the stage that writes it (dvc repro)")
    return np.load(array_path, mmap_mode="r"), np.load(labels_path)


def load_images(cfg: DictConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Prepared uint8 images (N, S, S, 3), memory-mapped, and their int labels."""
    return load_split(prepared_dir(cfg), "images", split)


def load_training_images(cfg: DictConfig, with_val: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The training split's images and labels; `with_val` appends the validation split's (a refit
    on every labelled image), read into memory."""
    images, labels = load_images(cfg, "train")
    if not with_val:
        return images, labels
    val_images, val_labels = load_images(cfg, "val")
    return np.concatenate([images, val_images]), np.concatenate([labels, val_labels])


def load_features(cfg: DictConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Cached conv-base features of a split, memory-mapped, and their labels."""
    return load_split(resolve_path(cfg.paths.features), "features", split)


def read_batches(array: np.ndarray, batch_size: int):
    """Consecutive batches of `array`, in order. For a memory-mapped .npy the rows are read from
    the file with plain reads (served from the page cache, not kept mapped in the process)."""
    row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
    whole_file = (
        isinstance(array, np.memmap)
        and array.filename is not None
        and array.flags.c_contiguous
        and os.path.getsize(array.filename) - array.offset == len(array) * row_bytes
    )  # a slice of a memory map keeps the file name but not its own offset: read those in memory
    if whole_file:
        with open(array.filename, "rb") as f:
            for start in range(0, len(array), batch_size):
                n = min(batch_size, len(array) - start)
                f.seek(array.offset + start * row_bytes)
                yield np.frombuffer(f.read(n * row_bytes), array.dtype).reshape(n, *array.shape[1:])
    else:
        for start in range(0, len(array), batch_size):
            yield np.asarray(array[start : start + batch_size])


def batches(
    array: np.ndarray,
    labels: np.ndarray | None,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
):
    """A `tf.data.Dataset` of (x, y) float32 batches (x only when labels is None) read from
    a possibly memory-mapped array; reshuffled every epoch when `shuffle`. With `shard` = (i, k),
    k > 1, only batches i, i + k, i + 2k, ... of each epoch, as many for every i (one worker's
    share in multi-worker training; `src.fitting.distribute`)."""
    import tensorflow as tf

    n = len(array)
    epoch = [0]
    index, count = shard
    starts = range(0, n, batch_size)
    starts = starts[index : len(starts) // count * count : count] if count > 1 else starts

    def generate():
        order = np.arange(n)
        if shuffle:
            np.random.default_rng(seed + epoch[0]).shuffle(order)
            epoch[0] += 1
        for start in starts:
            index = np.sort(order[start : start + batch_size])  # sorted reads are cheaper on a memory map
            x = np.asarray(array[index], dtype=np.float32)
            yield x if labels is None else (x, labels[index])

    x_spec = tf.TensorSpec((None, *array.shape[1:]), tf.float32)
    spec = x_spec if labels is None else (x_spec, tf.TensorSpec((None,), tf.as_dtype(labels.dtype)))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=spec)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(starts)))  # Keras knows the steps
    options = tf.data.Options()  # sharded here, if at all: tf.distribute must not shard again
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
