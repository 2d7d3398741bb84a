"""Benchmark: does XLA (`jit_compile`) speed up fine-tuning on this machine, per precision?

    python benchmarks/xla.py [--images 96] [--size 180]

Fine-tunes VGG16's block 5 plus a small head on random images, one epoch after a warm-up
epoch, with and without `jit_compile`, in float32 and mixed_bfloat16, and prints training
images per second and the ratio. `train.jit_compile: auto` follows these figures (see
`src/fitting/precision.py`).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def epoch_rate(policy: str, jit: bool, images: int, size: int) -> float:
    import keras
    import numpy as np

    keras.mixed_precision.set_global_policy(policy)
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
    for layer in base.layers[:-4]:
        layer.trainable = False  # block 5 trains, as in the cats-vs-dogs recipe
    inputs = keras.Input((size, size, 3))
    features = keras.layers.Flatten()(base(inputs, training=False))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", dtype="float32")(features))
    model.compile("rmsprop", "binary_crossentropy", jit_compile=jit)
    x = np.random.default_rng(0).integers(0, 255, (images, size, size, 3)).astype("float32")
    y = (np.arange(images) % 2).astype("int32")
    model.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0)  # warm-up: tracing and compiling
    start = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=180)
    args = parser.parse_args()
    print(f"fine-tune epoch of VGG16 block 5, {args.images} images at {args.size} px\n")
    print("| precision | without XLA img/s | with XLA img/s | ratio |")
    print("|---|---:|---:|---:|")
    for policy in ("float32", "mixed_bfloat16"):
        plain = epoch_rate(policy, False, args.images, args.size)
        xla = epoch_rate(policy, True, args.images, args.size)
        print(f"| {policy} | {plain:.1f} | {xla:.1f} | {xla / plain:.2f}x |")


if __name__ == "__main__":
    main()
