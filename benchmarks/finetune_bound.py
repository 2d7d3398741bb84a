"""Benchmark: what each part of a `dlwp_cats_vs_dogs` run costs per image, and how much faster
the run can get while its predictions stay exactly the same.

    python benchmarks/finetune_bound.py [--rounds 3] [--epochs 10] [--splits 2000/500/500 2000/1000/2000]

Builds the preset's model (VGG16 at its image size and precision, block 5 unfrozen, the
flip/rotation/zoom augmentation, the dense head) on 32 real cats-vs-dogs images and times one
batch of each, interleaved over `--rounds` (medians):

- the whole conv base's forward pass (extract; evaluate without cached activations),
- validation of the whole network (`evaluate` of the fitted model) and of the unfrozen top +
  head on activations cached at the freeze boundary, plus the one-time bottom pass that caches,
- a training step of the whole network on augmented images.

Training images are augmented afresh every epoch, so their trip through the frozen bottom can
be neither cached nor skipped without changing the model; validation and test images can. From
the per-image costs it prints, for each train/val/test split, the modelled time of extract +
fine-tuning + evaluate: validating through the whole network, validating on cached
activations (the default), and the exact floor where validation and evaluation cost nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from reproduce import SHARED, machine  # noqa: E402

BATCH = 32


def real_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """32 shared cats-vs-dogs training images (half cats, half dogs) resized to `size`, labels."""
    from PIL import Image

    root = SHARED / "data" / "cats_vs_dogs" / "train"
    files = [sorted((root / c).iterdir())[: BATCH // 2] for c in ("cats", "dogs")]
    images = [np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in files[0] + files[1]]
    labels = np.repeat([0.0, 1.0], BATCH // 2).astype("float32")[:, None]
    return np.stack(images).astype("uint8"), labels


def costs(rounds: int) -> tuple[dict[str, float], str, int]:
    """Median seconds per image of each part, the precision policy and the image size."""
    import keras
    import tensorflow as tf

    from src.config.compose import compose
    from src.fitting import precision
    from src.models import networks

    cfg = compose(
        [
            "experiment=dlwp_cats_vs_dogs",
            f"dataset.path={SHARED / 'data' / 'cats_vs_dogs'}",
            f"model.weights={SHARED / 'weights' / 'vgg16_imagenet_notop.weights.h5'}",
        ]
    )
    policy = precision.use(cfg.train.precision)
    size = cfg.dataset.image_size
    images, labels = real_images(size)
    base = networks.conv_base(cfg.model, size)
    head = networks.head(cfg.head, base.output_shape[1:], 2)
    networks.unfreeze_top(base, cfg.finetune.layers)
    model = networks.full_model(base, head, cfg.model, cfg.augment, cfg.seed)
    networks.compile_model(model, 2, cfg.finetune.optimizer, cfg.finetune.learning_rate)
    bottom, top = networks.split_at(base, cfg.finetune.layers)
    inputs = keras.Input(top.input_shape[1:])
    top_and_head = keras.Model(inputs, head(top(inputs)))  # shares the fine-tuned layers
    networks.compile_model(top_and_head, 2, cfg.finetune.optimizer, cfg.finetune.learning_rate)
    preprocess = networks.preprocessing(cfg.model)

    @tf.function
    def forward(x):  # what extract and predict run
        return base(preprocess(tf.cast(x, tf.float32)), training=False)

    @tf.function
    def forward_bottom(x):  # the caching pass
        return bottom(preprocess(tf.cast(x, tf.float32)), training=False)

    boundary = forward_bottom(images).numpy()
    floats = images.astype("float32")
    parts = {
        "forward, whole base": lambda: forward(images).numpy(),
        "forward, frozen bottom (caching pass)": lambda: forward_bottom(images).numpy(),
        "validation, whole network": lambda: model.evaluate(floats, labels, batch_size=BATCH, verbose=0),
        "validation, top + head on cached activations": lambda: top_and_head.evaluate(
            boundary, labels, batch_size=BATCH, verbose=0
        ),
        "training step, whole network, augmented": lambda: model.train_on_batch(floats, labels),
    }
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for part in parts.values():  # trace and warm up
        part()
    for _ in range(rounds):
        for name, part in parts.items():
            start = time.perf_counter()
            part()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) / BATCH for name, s in seconds.items()}, policy, size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument(
        "--splits", nargs="+", default=["2000/500/500", "2000/1000/2000"], metavar="TRAIN/VAL/TEST"
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    per_image, policy, size = costs(args.rounds)
    print(f"\n{machine()}; dlwp_cats_vs_dogs at {size} px, {policy}, batch {BATCH}, median of {args.rounds}")
    print("| part | ms per image |\n|---|---:|")
    for name, value in per_image.items():
        print(f"| {name} | {value * 1000:.0f} |")
    fwd = per_image["forward, whole base"]
    train = per_image["training step, whole network, augmented"]
    whole_val = per_image["validation, whole network"]
    cached_val = per_image["validation, top + head on cached activations"]
    caching = per_image["forward, frozen bottom (caching pass)"]
    e = args.epochs
    print(
        f"\nextract + {e} fine-tuning epochs + evaluate, modelled from the costs above (s):\n"
        "| train/val/test | whole-network validation | cached validation (default) | exact floor "
        "| training share | default vs whole | floor vs whole |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for split in args.splits:
        n_train, n_val, n_test = (int(n) for n in split.split("/"))
        extract = (n_train + n_val + n_test) * fwd
        training = e * n_train * train
        whole = extract + training + e * n_val * whole_val + n_test * fwd
        default = extract + training + n_val * caching + e * n_val * cached_val + n_test * fwd
        floor = extract + training
        print(
            f"| {split} | {whole:.0f} | {default:.0f} | {floor:.0f} | {training / whole:.0%} "
            f"| {whole / default:.2f}x | {whole / floor:.2f}x |"
        )


if __name__ == "__main__":
    main()
