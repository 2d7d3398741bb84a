"""Stage `finetune`: rebuild conv base + trained head, unfreeze the top of the base, and train
end to end on images with augmentation at a low learning rate.

`finetune.layers` counts Keras layers of the base after its input, pooling included: for
VGG16, 4 = block 5 (three convs and the pool), 8 = blocks 4 and 5. With 0 (or a model
trained from scratch) nothing is trained: the assembled model is passed on unchanged.
BatchNorm layers of the base stay in inference mode with their ImageNet statistics, unless
`finetune.batchnorm=adapt` lets those of the unfrozen top train on the new images.
The epoch with the best validation loss is kept; with `finetune.refit` (once the recipe is
chosen) training runs on the train and val splits together for `finetune.epochs` and keeps the
last epoch, as nothing held out is left to choose one by.
Writes `<paths.models>/final.keras` (image in, probabilities out) and
`<paths.reports>/finetune/history.csv`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from src.config.checks import is_pretrained
from src.config.paths import resolve_path
from src.data import arrays, mixing
from src.fitting import distribute, fit, optuna_trials, precision
from src.models import networks
from src.outputs import folders
from src.stages import stage
from src.tracking import live_metrics, store

log = logging.getLogger(__name__)


@stage.reads(
    "finetune", "model", "augment", "dataset.image_size", "seed", "train.batch_size",
    "train.precision", "train.jit_compile", "train.strategy", "train.logical_cpus",
    "paths.prepared", "paths.models", "paths.reports",
    logged=("tracking",), identity=store.run_identity,
)  # fmt: skip
def run(cfg: DictConfig) -> dict:
    """Fine-tune the top `finetune.layers` layers and save the final model."""
    import keras

    # before anything starts TensorFlow (multi-worker)
    chosen = distribute.strategy(cfg.train.strategy, cfg.train.logical_cpus)
    keras.utils.set_random_seed(cfg.seed)
    model_dir = resolve_path(cfg.paths.models)
    history_path = resolve_path(cfg.paths.reports) / "finetune" / "history.csv"
    (model_dir / "temperature.json").unlink(missing_ok=True)  # fitted for an earlier final model
    if not is_pretrained(cfg):
        log.info("%s was trained from scratch in train_head: passing it on", cfg.model.name)
        head_model = keras.saving.load_model(model_dir / "head.keras", compile=False)
        result = fit.fit_best(head_model, None, None, 0, model_dir / "final.keras", history_path)
        return {**result, "unfrozen": []}

    classes = arrays.load_classes(cfg)
    with chosen.scope():  # the model's variables, its optimizer and `fit` on the strategy's devices
        head_model = keras.saving.load_model(model_dir / "head.keras", compile=False)  # float32, as saved
        policy = precision.use(cfg.train.precision)  # the base computes in it; the head keeps float32
        xla = precision.use_xla(cfg.train.jit_compile)
        return _fine_tune(cfg, chosen, head_model, model_dir, history_path, len(classes), policy, xla)


def _fine_tune(cfg, chosen, head_model, model_dir: Path, history_path: Path, n_classes: int, policy: str,
               xla: bool) -> dict:  # fmt: skip
    ft = cfg.finetune
    base = networks.conv_base(cfg.model, cfg.dataset.image_size)
    model = networks.full_model(base, head_model, cfg.model, cfg.augment, cfg.seed)
    unfrozen = networks.unfreeze_top(base, ft.layers, ft.batchnorm)
    epochs = ft.epochs if ft.layers > 0 else 0
    refit = bool(ft.refit) and epochs > 0  # train + val, the last epoch kept
    log.info("unfrozen layers (%d): %s", len(unfrozen), ", ".join(unfrozen) or "none")
    x_train, y_train = arrays.load_training_images(cfg, with_val=refit)
    steps = networks.decay_steps(
        ft.schedule, epochs, len(y_train), ft.batch_size * chosen.num_replicas_in_sync
    )
    # Recompile after changing `trainable`, so the change takes effect.
    soft = mixing.enabled(cfg.augment)  # mixed batches: soft targets
    networks.compile_model(
        model, n_classes, ft.optimizer, ft.learning_rate, jit_compile=xla, decay_steps=steps, soft_labels=soft
    )
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    summary = {
        "unfrozen": unfrozen,
        "trainable_parameters": trainable,
        "cached_activations": False,
        "precision": policy,
        "jit_compile": xla,
        "replicas": chosen.num_replicas_in_sync,
        "refit": refit,
        "trained_on": len(y_train),
    }
    model_path = distribute.output_dir(model_dir) / "final.keras"  # the chief's, or a worker's scratch
    history_path = distribute.output_dir(history_path.parent) / history_path.name
    if not epochs:
        result = fit.fit_best(model, None, None, 0, model_path, history_path)
        return {**result, **summary}
    live = live_metrics.callback(cfg, "finetune") if distribute.is_chief() else None
    callbacks = (live, optuna_trials.pruning_callback(optuna_trials.job_trial(cfg), "finetune"))
    batch = distribute.worker_batch(ft.batch_size, chosen)
    # mixed batches are augmented images too: training runs on images, not cached activations
    augmented = networks.augmentation(cfg.augment, cfg.seed) is not None or soft
    # None for bases with branches (ResNet50): then every epoch runs the whole network; so does
    # an augmented refit, which has no validation to cache
    cacheable = ft.cached_activations and not (refit and augmented)
    split = networks.split_at(base, ft.layers) if cacheable else None
    if split is None:
        train_data = arrays.batches(
            x_train, y_train, batch, shuffle=True, seed=cfg.seed, shard=distribute.shard()
        )
        val_data = None if refit else arrays.batches(*arrays.load_images(cfg, "val"), batch)
        train_data, val_data = mixing.apply(train_data, val_data, cfg.augment, n_classes, cfg.seed)
        result = fit.fit_best(
            model, train_data, val_data, epochs, model_path, history_path, callbacks=callbacks
        )
        return {**result, **summary}
    result = _fit_from_boundary(
        cfg,
        split,
        (x_train, y_train),
        head_model,
        model,
        model_path,
        history_path,
        n_classes,
        xla,
        augmented,
        steps,
        batch,
        callbacks,
    )
    cached = {"cached_activations": not augmented, "cached_validation": not refit}
    return {**result, **summary, **cached}


def _fit_from_boundary(
    cfg,
    split,
    training: tuple[np.ndarray, np.ndarray],
    head_model,
    model,
    model_path: Path,
    history_path: Path,
    n_classes: int,
    xla: bool,
    augmented: bool,
    decay_steps: int,
    batch: int,
    callbacks: tuple,
) -> dict:
    """The frozen bottom gives the same activations every epoch for images that are not
    augmented: compute them once and run only the unfrozen top and the head on them. Without
    augmentation that is all of training and validation; with it, training runs the whole
    network on augmented images (`training`) and only validation uses the cached activations.
    A refit (no augmentation here) caches the activations of `training`, train and val together,
    and validates on nothing. The top's layers are the base's own, so `model` (image in) holds
    the trained weights and is saved."""
    import keras

    ft = cfg.finetune
    bottom, top = split
    preprocess = networks.preprocessing(cfg.model)
    refit = ft.refit  # epochs > 0 here
    with folders.scratch_dir(model_path.parent, "activations") as tmp:
        data = {}
        for name in (() if augmented else ("train",)) + (() if refit else ("val",)):
            images, labels = training if name == "train" else arrays.load_images(cfg, name)
            shape = networks.predict_to_file(
                bottom, preprocess, images, cfg.train.batch_size, tmp / f"{name}.npy"
            )
            data[name] = (np.load(tmp / f"{name}.npy", mmap_mode="r"), labels)
        log.info("cached activations at the freeze boundary %s (%s)", shape[1:], ", ".join(data))
        inputs = keras.Input(shape=shape[1:], name="boundary_activations")
        top_and_head = keras.Model(inputs, head_model(top(inputs, training=False)), name="top_and_head")
        networks.compile_model(
            top_and_head,
            n_classes,
            ft.optimizer,
            ft.learning_rate,
            jit_compile=xla,
            decay_steps=decay_steps,
            soft_labels=mixing.enabled(cfg.augment),
        )
        val_data = None if refit else arrays.batches(*data["val"], batch)
        if augmented:  # `model` trains on images; `top_and_head` shares its weights and validates
            train_data = arrays.batches(
                *training, batch, shuffle=True, seed=cfg.seed, shard=distribute.shard()
            )
            train_data, val_data = mixing.apply(train_data, val_data, cfg.augment, n_classes, cfg.seed)
            validation = fit.validate_with(top_and_head, val_data)
            return fit.fit_best(
                model,
                train_data,
                None,
                ft.epochs,
                model_path,
                history_path,
                validation=validation,
                callbacks=callbacks,
            )
        x_train, y_train = data["train"]
        train_data = arrays.batches(
            x_train, y_train, batch, shuffle=True, seed=cfg.seed, shard=distribute.shard()
        )
        return fit.fit_best(
            top_and_head,
            train_data,
            val_data,
            ft.epochs,
            model_path,
            history_path,
            final_model=model,
            callbacks=callbacks,
        )


if __name__ == "__main__":
    stage.main("finetune", run, tensorflow=True)
