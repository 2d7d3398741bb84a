"""Stage `train_head`: the dense classifier on the cached conv features.

Sigmoid + binary cross-entropy for 2 classes, softmax + sparse categorical cross-entropy for
more; the weights of the epoch with the best val_loss are kept. With a from-scratch model
(no conv base) this stage trains the whole CNN on the prepared images instead.
Writes `<paths.models>/head.keras`, `<paths.models>/classes.json` and `<paths.reports>/head/history.csv`.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from src.config.checks import is_pretrained
from src.config.paths import resolve_path
from src.data import arrays, mixing
from src.fitting import distribute, fit, optuna_trials, precision
from src.models import networks
from src.outputs import atomic
from src.stages import stage
from src.tracking import live_metrics, store

log = logging.getLogger(__name__)


@stage.reads(
    "head", "model", "augment", "dataset.image_size", "seed",
    "train.precision", "train.jit_compile", "train.strategy", "train.logical_cpus",
    "paths.prepared", "paths.features", "paths.models", "paths.reports",
    logged=("tracking",), identity=store.run_identity,
)  # fmt: skip
def run(cfg: DictConfig) -> dict:
    """Train the head (or the from-scratch CNN) and save the best model and its history."""
    import keras

    # before anything starts TensorFlow (multi-worker)
    chosen = distribute.strategy(cfg.train.strategy, cfg.train.logical_cpus)
    keras.utils.set_random_seed(cfg.seed)
    classes = arrays.load_classes(cfg)
    h = cfg.head
    with chosen.scope():  # the model's variables, its optimizer and `fit` on the strategy's devices
        if is_pretrained(cfg):
            precision.use("float32")  # a small dense head on cached features gains nothing from less
            x_train, y_train = arrays.load_features(cfg, "train")
            x_val, y_val = arrays.load_features(cfg, "val")
            model = networks.head(h, x_train.shape[1:], len(classes))
        else:
            precision.use(cfg.train.precision)
            x_train, y_train = arrays.load_images(cfg, "train")
            x_val, y_val = arrays.load_images(cfg, "val")
            model = networks.scratch_model(
                cfg.model, h, cfg.augment, cfg.dataset.image_size, len(classes), cfg.seed
            )
        xla = precision.use_xla(cfg.train.jit_compile)
        steps = networks.decay_steps(
            h.schedule, h.epochs, len(x_train), h.batch_size * chosen.num_replicas_in_sync
        )
        soft = not is_pretrained(cfg) and mixing.enabled(cfg.augment)  # features are never mixed
        networks.compile_model(
            model,
            len(classes),
            h.optimizer,
            h.learning_rate,
            jit_compile=xla,
            decay_steps=steps,
            soft_labels=soft,
        )
        batch = distribute.worker_batch(h.batch_size, chosen)
        train_data = arrays.batches(
            x_train, y_train, batch, shuffle=True, seed=cfg.seed, shard=distribute.shard()
        )
        val_data = arrays.batches(x_val, y_val, batch)
        if soft:
            train_data, val_data = mixing.apply(train_data, val_data, cfg.augment, len(classes), cfg.seed)
        # the chief writes the outputs; other workers write to a scratch folder
        model_dir = distribute.output_dir(resolve_path(cfg.paths.models))
        model_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(model_dir / "classes.json", classes)  # the models' label names, for predict
        live = live_metrics.callback(cfg, "head") if h.epochs > 0 and distribute.is_chief() else None
        pruning = optuna_trials.pruning_callback(optuna_trials.job_trial(cfg), "head")
        result = fit.fit_best(
            model,
            train_data,
            val_data,
            h.epochs,
            model_dir / "head.keras",
            distribute.output_dir(resolve_path(cfg.paths.reports) / "head") / "history.csv",
            callbacks=(live, pruning),
        )
    return {
        **result,
        "classes": len(classes),
        "train": len(x_train),
        "val": len(x_val),
        "parameters": int(model.count_params()),
        "replicas": chosen.num_replicas_in_sync,
    }


if __name__ == "__main__":
    stage.main("train_head", run, tensorflow=True)
