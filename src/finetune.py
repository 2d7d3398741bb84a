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

from omegaconf import DictConfig

from src import datasets, models, stage, training
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
    base = models.conv_base(cfg.model, cfg.dataset.image_size)
    model = models.full_model(base, head_model, cfg.model, cfg.augment, cfg.seed)
    unfrozen = models.unfreeze_top(base, ft.layers)
    epochs = ft.epochs if ft.layers > 0 else 0
    log.info("unfrozen layers (%d): %s", len(unfrozen), ", ".join(unfrozen) or "none")
    # Recompile after changing `trainable`, so the change takes effect.
    models.compile_model(model, len(classes), ft.optimizer, ft.learning_rate)
    train_data = val_data = None
    if epochs:
        x_train, y_train = datasets.load_images(cfg, "train")
        x_val, y_val = datasets.load_images(cfg, "val")
        train_data = datasets.batches(x_train, y_train, ft.batch_size, shuffle=True, seed=cfg.seed)
        val_data = datasets.batches(x_val, y_val, ft.batch_size)
    result = training.fit_best(model, train_data, val_data, epochs, model_dir / "final.keras", history_path)
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    return {**result, "unfrozen": unfrozen, "trainable_parameters": trainable}


if __name__ == "__main__":
    stage.main("finetune", run)
