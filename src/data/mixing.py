"""MixUp and CutMix: training batches whose examples blend two images and their labels.

`augment.mix=mixup` blends each image with another of its batch, pixel by pixel, with a weight
drawn from Beta(`augment.mix_alpha`, `augment.mix_alpha`); `augment.mix=cutmix` pastes a box of
the other image instead, the label weights following the box's area. Either way the labels
become soft targets (one-hot vectors, or a float for a sigmoid output), so a model trained on
mixed batches is compiled for them (`networks.compile_model(..., soft_labels=True)`) and its
validation batches carry the same kind of targets (`as_targets`). Mixing applies where training
sees images (the from-scratch model in `train_head`, `finetune`), like the other augmentation.
"""

from __future__ import annotations

from omegaconf import DictConfig


def enabled(augment_cfg: DictConfig) -> bool:
    """Whether training batches are mixed (and labels therefore soft)."""
    return bool(augment_cfg.get("mix"))


def as_targets(dataset, n_classes: int):
    """(x, integer label) batches as (x, float target): one-hot for softmax outputs, the label
    itself as a float for the single sigmoid of 2 classes."""
    import tensorflow as tf

    def convert(x, y):
        if n_classes == 2:
            return x, tf.cast(y, tf.float32)
        return x, tf.one_hot(tf.cast(y, tf.int32), n_classes, dtype=tf.float32)

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def mixed(dataset, augment_cfg: DictConfig, n_classes: int, seed: int):
    """Training batches (x, integer label) mixed as `augment.mix` says, with soft targets.
    Each example draws its own weight and its partner in the batch (a random permutation); the
    draws differ every epoch and repeat from run to run with the same `seed`."""
    import tensorflow as tf

    mode, alpha = augment_cfg.mix, float(augment_cfg.mix_alpha)
    generator = tf.random.Generator.from_seed(seed)

    def beta(n):
        # Beta(a, a) as g1 / (g1 + g2) of two Gamma(a) draws
        seeds = generator.make_seeds(2)
        g1 = tf.random.stateless_gamma([n], seed=seeds[:, 0], alpha=alpha)
        g2 = tf.random.stateless_gamma([n], seed=seeds[:, 1], alpha=alpha)
        return g1 / (g1 + g2)

    def mix(x, y):
        n = tf.shape(x)[0]
        partner = tf.argsort(generator.uniform([n]))  # a random permutation of the batch
        keep = beta(n)  # the weight of each example's own image and label
        if mode == "mixup":
            w = keep[:, None, None, None]
            x = w * x + (1.0 - w) * tf.gather(x, partner)
        else:  # cutmix: a box of side sqrt(1 - keep) of the image's, centred anywhere, clipped
            height, width = tf.shape(x)[1], tf.shape(x)[2]
            side = tf.sqrt(1.0 - keep)
            cy = generator.uniform([n], 0.0, 1.0) * tf.cast(height, tf.float32)
            cx = generator.uniform([n], 0.0, 1.0) * tf.cast(width, tf.float32)
            half_h = side * tf.cast(height, tf.float32) / 2
            half_w = side * tf.cast(width, tf.float32) / 2
            rows = tf.cast(tf.range(height), tf.float32)[None, :, None]
            cols = tf.cast(tf.range(width), tf.float32)[None, None, :]
            inside = (
                (rows >= (cy - half_h)[:, None, None])
                & (rows < (cy + half_h)[:, None, None])
                & (cols >= (cx - half_w)[:, None, None])
                & (cols < (cx + half_w)[:, None, None])
            )
            x = tf.where(inside[..., None], tf.gather(x, partner), x)
            # the label weights follow the pixels actually pasted (the box may be clipped)
            keep = 1.0 - tf.reduce_mean(tf.cast(inside, tf.float32), axis=[1, 2])
        w = keep[:, None] if n_classes > 2 else keep
        return x, w * y + (1.0 - w) * tf.gather(y, partner)

    # mixing runs in order on one thread: the generator's draws, and so the batches, repeat
    return as_targets(dataset, n_classes).map(mix).prefetch(tf.data.AUTOTUNE)


def apply(train_data, val_data, augment_cfg: DictConfig, n_classes: int, seed: int):
    """(train, val) batches as training on them needs: unchanged without mixing; with it,
    mixed training batches and validation batches (if any) with the same kind of targets."""
    if not enabled(augment_cfg):
        return train_data, val_data
    val_data = None if val_data is None else as_targets(val_data, n_classes)
    return mixed(train_data, augment_cfg, n_classes, seed), val_data
