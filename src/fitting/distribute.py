"""Training on several devices with a `tf.distribute` strategy (`train.strategy`), used by the
two training stages (`train_head`, `finetune`) around model building, compiling and `fit`.

- `auto`: `mirrored` when more than one GPU is visible, else TensorFlow's default strategy (one
  device, as without `tf.distribute`).
- `one_device`: the first GPU, else the CPU.
- `mirrored`: one process, a replica per GPU (or per logical CPU device: `train.logical_cpus`
  splits the CPU into that many, to try it without GPUs); gradients are summed across replicas.
- `multi_worker`: several processes, each started with the same command and its own `TF_CONFIG`
  (cluster addresses, this task's type and index). Each worker trains on its share of the
  training batches (batches whose number modulo the worker count is its index; the last few
  batches that do not divide evenly are left out of that epoch); every worker validates on the
  whole validation split. Only the chief (task `chief`, else `worker` 0) writes the model, the
  history and the stage summary; the others write to a temp folder they remove.

`head.batch_size` and `finetune.batch_size` are per replica: one step takes batch_size × replicas
images (× workers), so the learning rate that suits one device suits the same per-replica batch.
Strategies other than `one_device` must be created before TensorFlow runs anything in the
process: run the training stages as their own processes (`dvc repro`, `python -m src.stages.train_head`),
as `python -m src.train` runs extract first.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

from src.config.schema import STRATEGIES
from src.errors import ConfigError

log = logging.getLogger(__name__)


_multi_worker: list[bool] = [False]  # set once this process has joined a multi-worker strategy


def cluster_position() -> tuple[int, int]:
    """(this worker's number, worker count) from TF_CONFIG: the chief is 0, then the workers in
    order; (0, 1) for a process on its own."""
    spec = json.loads(os.environ.get("TF_CONFIG") or "{}")
    nodes, task = spec.get("cluster", {}), spec.get("task", {})
    chiefs, count = len(nodes.get("chief", [])), len(nodes.get("chief", [])) + len(nodes.get("worker", []))
    if count <= 1:
        return 0, 1
    number = int(task.get("index", 0)) + (chiefs if task.get("type") == "worker" else 0)
    return number, count


def shard() -> tuple[int, int]:
    """This process's share of the training batches: `cluster_position()` in a multi-worker run,
    else (0, 1), whatever TF_CONFIG says."""
    return cluster_position() if _multi_worker[0] else (0, 1)


def is_chief() -> bool:
    """Whether this process writes the outputs: always, but on the workers of a multi-worker run."""
    return shard()[0] == 0


def _split_cpu(count: int) -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as err:
        raise ConfigError(
            f"train.logical_cpus={count}: TensorFlow already started in this process; run the "
            "training stage as its own process (dvc repro or python -m src.stages.train_head)"
        ) from err


@cache
def _create(name: str, logical_cpus: int):
    import tensorflow as tf

    if logical_cpus > 1:
        _split_cpu(logical_cpus)
    if name == "multi_worker":  # first: listing devices would start TensorFlow's runtime
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError("train.strategy=multi_worker needs TF_CONFIG (the cluster and this task) set")
        try:
            chosen = tf.distribute.MultiWorkerMirroredStrategy()
            _multi_worker[0] = True
            return chosen
        except (RuntimeError, ValueError) as err:
            raise ConfigError(f"train.strategy=multi_worker could not start: {err}") from err
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        if len(gpus) <= 1:
            return tf.distribute.get_strategy()  # TensorFlow's default: one device, no wrapping
        name = "mirrored"
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def strategy(name: str, logical_cpus: int = 0):
    """The `tf.distribute.Strategy` for `train.strategy` and `train.logical_cpus` (one per process)."""
    if name not in STRATEGIES:
        raise ConfigError(f"train.strategy={name!r}: choose one of {', '.join(STRATEGIES)}")
    chosen = _create(name, int(logical_cpus or 0))
    replicas, workers = chosen.num_replicas_in_sync, shard()[1]
    log.info("strategy %s: %d replica(s) on %d worker(s)", type(chosen).__name__, replicas, workers)
    return chosen


def worker_batch(batch_size: int, chosen) -> int:
    """The batch one worker feeds per step: `batch_size` per replica times its local replicas."""
    return batch_size * chosen.num_replicas_in_sync // shard()[1]


def output_dir(path: Path) -> Path:
    """`path` on the chief; a temp folder (removed at exit) on the other workers."""
    if is_chief():
        return path
    scratch = Path(tempfile.mkdtemp(prefix=f"worker{shard()[0]}-"))
    atexit.register(shutil.rmtree, scratch, True)
    return scratch / path.name


def is_multi_worker(chosen) -> bool:
    import tensorflow as tf

    return isinstance(chosen, tf.distribute.MultiWorkerMirroredStrategy)


def _loss_and_correct(model, y, probabilities):
    """Per-example loss and correctness of `model`'s compiled loss (binary or sparse CE)."""
    import keras
    import tensorflow as tf

    probabilities = tf.cast(probabilities, tf.float32)
    if probabilities.shape[-1] == 1:  # sigmoid
        y = tf.cast(tf.reshape(y, (-1, 1)), tf.float32)
        correct = tf.equal(tf.cast(probabilities > 0.5, tf.float32), y)[:, 0]
    else:
        correct = tf.equal(tf.argmax(probabilities, axis=-1), tf.cast(y, tf.int64))
    return keras.losses.get(model.loss)(y, probabilities), tf.cast(correct, tf.float32)


def evaluate(model, data) -> dict[str, float]:
    """Mean loss and accuracy of `model` on all of `data`, computed on this worker (Keras 3's
    `evaluate` cannot run under MultiWorkerMirroredStrategy)."""
    import tensorflow as tf

    @tf.function
    def sums(x, y):
        loss, correct = _loss_and_correct(model, y, model(x, training=False))
        return tf.reduce_sum(loss), tf.reduce_sum(correct), tf.cast(tf.size(correct), tf.float32)

    totals = [0.0, 0.0, 0.0]
    for x, y in data:
        totals = [t + float(v) for t, v in zip(totals, sums(x, y))]
    return {"loss": totals[0] / max(totals[2], 1), "accuracy": totals[1] / max(totals[2], 1)}


def fit_multi_worker(model, chosen, train_data, val_data, epochs: int, callbacks: list):
    """`model.fit` for MultiWorkerMirroredStrategy, which Keras 3's `fit` does not run: each
    replica's gradients of its batch, summed across all replicas of all workers by the
    strategy (losses scaled by the global batch), then one optimizer step everywhere. Each
    epoch ends with validation on `val_data` (or a callback putting `val_*` into the logs).
    Returns an object with `.history` as `fit` does."""
    import keras
    import tensorflow as tf

    optimizer = model.optimizer
    distributed = chosen.experimental_distribute_dataset(train_data)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss, correct = _loss_and_correct(model, y, model(x, training=True))
            scaled = tf.nn.compute_average_loss(loss)  # / global batch: summed gradients are the mean
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return tf.reduce_sum(loss), tf.reduce_sum(correct), tf.cast(tf.size(correct), tf.float32)

    @tf.function
    def step(x, y):
        per_replica = chosen.run(replica_step, args=(x, y))
        return [chosen.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in per_replica]

    callback_list = keras.callbacks.CallbackList(
        callbacks, model=model, epochs=epochs, steps=len(train_data), verbose=0
    )
    history: dict[str, list[float]] = {}
    callback_list.on_train_begin()
    for epoch in range(epochs):
        callback_list.on_epoch_begin(epoch)
        totals = [0.0, 0.0, 0.0]
        for batch, (x, y) in enumerate(distributed):
            callback_list.on_train_batch_begin(batch)
            totals = [t + float(v) for t, v in zip(totals, step(x, y))]
            callback_list.on_train_batch_end(batch, {"loss": totals[0] / totals[2]})
        logs = {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}
        if val_data is not None:
            logs.update({f"val_{k}": v for k, v in evaluate(model, val_data).items()})
        callback_list.on_epoch_end(epoch, logs)
        for key, value in logs.items():
            history.setdefault(key, []).append(float(value))
        if model.stop_training:
            break
    callback_list.on_train_end()
    return type("History", (), {"history": history})()
