"""Stage `finetune`: rebuild conv base + trained head, unfreeze the top of the base, and train
end to end on images with augmentation at a low learning rate.

`finetune.layers` counts Keras layers of the base after its input, pooling included: for
VGG16, 4 = block 5 (three convs and the pool), 8 = blocks 4 and 5. With 0 (or a model
trained from scratch) nothing is trained: the assembled model is passed on unchanged.
BatchNorm layers of the base stay in inference mode (the base is called with training=False).
Writes `<paths.models>/final.keras` (image in, probabilities out) and
`<paths.reports>/finetune/history.csv`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from src import datasets, models, precision, stage, training
from src.config import is_pretrained, resolve_path

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Fine-tune the top `finetune.layers` layers and save the final model."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    model_dir = resolve_path(cfg.paths.models)
    history_path = resolve_path(cfg.paths.reports) / "finetune" / "history.csv"
    head_model = keras.saving.load_model(model_dir / "head.keras")
    ft = cfg.finetune
    if not is_pretrained(cfg):
        log.info("%s was trained from scratch in train_head: passing it on", cfg.model.name)
        result = training.fit_best(head_model, None, None, 0, model_dir / "final.keras", history_path)
        return {**result, "unfrozen": []}

    classes = datasets.load_classes(cfg)
    policy = precision.use(cfg.train.precision)  # the base computes in it; the head keeps float32 layers
    xla = precision.use_xla(cfg.train.jit_compile)
    base = models.conv_base(cfg.model, cfg.dataset.image_size)
    model = models.full_model(base, head_model, cfg.model, cfg.augment, cfg.seed)
    unfrozen = models.unfreeze_top(base, ft.layers)
    epochs = ft.epochs if ft.layers > 0 else 0
    log.info("unfrozen layers (%d): %s", len(unfrozen), ", ".join(unfrozen) or "none")
    # Recompile after changing `trainable`, so the change takes effect.
    models.compile_model(model, len(classes), ft.optimizer, ft.learning_rate, jit_compile=xla)
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    summary = {
        "unfrozen": unfrozen,
        "trainable_parameters": trainable,
        "cached_activations": False,
        "precision": policy,
        "jit_compile": xla,
    }
    if not epochs:
        result = training.fit_best(model, None, None, 0, model_dir / "final.keras", history_path)
        return {**result, **summary}
    split = None
    if ft.cached_activations and models.augmentation(cfg.augment, cfg.seed) is None:
        split = models.split_at(base, ft.layers)  # None for bases with branches
    if split is None:
        x_train, y_train = datasets.load_images(cfg, "train")
        x_val, y_val = datasets.load_images(cfg, "val")
        train_data = datasets.batches(x_train, y_train, ft.batch_size, shuffle=True, seed=cfg.seed)
        val_data = datasets.batches(x_val, y_val, ft.batch_size)
        result = training.fit_best(
            model, train_data, val_data, epochs, model_dir / "final.keras", history_path
        )
        return {**result, **summary}
    result = _fit_from_boundary(cfg, split, head_model, model, model_dir, history_path, len(classes), xla)
    return {**result, **summary, "cached_activations": True}


def _fit_from_boundary(
    cfg, split, head_model, model, model_dir: Path, history_path: Path, n_classes: int, xla: bool
) -> dict:
    """Without augmentation the frozen bottom gives the same activations every epoch: compute
    them once, then train only the unfrozen top and the head on them. The top's layers are the
    base's own, so `model` (image in) holds the trained weights and is what gets saved."""
    import keras

    ft = cfg.finetune
    bottom, top = split
    preprocess = models.preprocessing(cfg.model)
    with stage.scratch_dir(model_dir, "activations") as tmp:
        data = {}
        for name in ("train", "val"):
            images, labels = datasets.load_images(cfg, name)
            shape = models.predict_to_file(
                bottom, preprocess, images, cfg.train.batch_size, tmp / f"{name}.npy"
            )
            data[name] = (np.load(tmp / f"{name}.npy", mmap_mode="r"), labels)
        log.info("cached activations at the freeze boundary %s: training the top only", shape[1:])
        inputs = keras.Input(shape=shape[1:], name="boundary_activations")
        trainer = keras.Model(inputs, head_model(top(inputs, training=False)), name="top_and_head")
        models.compile_model(trainer, n_classes, ft.optimizer, ft.learning_rate, jit_compile=xla)
        x_train, y_train = data["train"]
        x_val, y_val = data["val"]
        train_data = datasets.batches(x_train, y_train, ft.batch_size, shuffle=True, seed=cfg.seed)
        val_data = datasets.batches(x_val, y_val, ft.batch_size)
        return training.fit_best(
            trainer,
            train_data,
            val_data,
            ft.epochs,
            model_dir / "final.keras",
            history_path,
            final_model=model,
        )


if __name__ == "__main__":
    stage.main("finetune", run)
