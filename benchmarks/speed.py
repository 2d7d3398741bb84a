"""Benchmark: feature extraction against the reference approach, the raw `predict` ceiling per
precision, fine-tuning per precision with and without cached boundary activations, and the
extract stage's peak memory as the dataset grows.

    python benchmarks/speed.py [--images 320] [--size 180] [--rss 1000,4000]

Uses the shared cats-vs-dogs images and ImageNet VGG16 weights (`../shared`, or TL_SHARED_DIR).
Prints one table:

(a) reference: a Python loop calling `conv_base.predict` per batch of
    `keras.utils.image_dataset_from_directory`, float32 (decoding and resizing included);
(b) the extract stage (`src.stages.extract.run`, `train.precision=auto`) on the same images, already
    prepared (decoded and resized once by the prepare stage, as in the pipeline);
(c) the raw ceiling: `conv_base.predict` on a preprocessed in-memory array, per precision;
(d) fine-tuning VGG16's block 5 without augmentation, per precision, through the whole network
    and from activations cached at the freeze boundary: training images per second of an
    epoch after the first (the one-time caching pass is reported separately);
(e) peak RSS of the extract stage, each size in a fresh process.

All rates are images per second measured in this run; ratios are against (a) and against the
ceiling at the precision `auto` picks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("TL_SHARED_DIR", REPO.parent / "shared")).resolve()
IMAGES = SHARED / "data" / "cats_vs_dogs" / "train"
WEIGHTS = SHARED / "weights" / "vgg16_imagenet_notop.weights.h5"
BATCH = 32


def pick_images(n: int, folder: Path) -> Path:
    """n images, half per class, linked into `folder/<class>/` for image_dataset_from_directory."""
    for cls in ("cats", "dogs"):
        (folder / cls).mkdir(parents=True)
        for path in sorted((IMAGES / cls).iterdir())[: n // 2]:
            (folder / cls / path.name).symlink_to(path)
    return folder


def base_model(size: int, policy: str):
    import keras

    keras.mixed_precision.set_global_policy(policy)
    return keras.applications.VGG16(weights=str(WEIGHTS), include_top=False, input_shape=(size, size, 3))


def reference_loop(folder: Path, size: int) -> float:
    """(a) img/s of the textbook loop, float32."""
    import keras

    start = time.perf_counter()
    base = base_model(size, "float32")
    data = keras.utils.image_dataset_from_directory(
        folder, image_size=(size, size), batch_size=BATCH, shuffle=False, verbose=False
    )
    n = 0
    for images, _ in data:
        base.predict(keras.applications.vgg16.preprocess_input(images), verbose=0)
        n += len(images)
    return n / (time.perf_counter() - start)


def prepared_cfg(work: Path, folder: Path, size: int):
    from src.config.compose import compose

    return compose(
        [
            "experiment=ci",
            "dataset=folder",
            f"dataset.path={folder}",
            f"dataset.image_size={size}",
            f"model.weights={WEIGHTS}",
            "train.precision=auto",
            *[
                f"paths.{k}={work / k}"
                for k in ("raw", "downloads", "prepared", "features", "models", "reports", "cache")
            ],
        ]
    )


def extract_stage(work: Path, folder: Path, size: int) -> tuple[float, str]:
    """(b) img/s of the extract stage on the prepared images, and the policy it chose."""
    from src.stages import download, extract, prepare

    cfg = prepared_cfg(work, folder, size)
    download.run(cfg)
    n = sum(prepare.run(cfg)["counts"].values())
    start = time.perf_counter()
    info = extract.run(cfg)
    return n / (time.perf_counter() - start), info["precision"]


def ceiling(images: np.ndarray, size: int, policy: str) -> float:
    """(c) img/s of `predict` on preprocessed in-memory images at `policy` (after a warm-up)."""
    import keras

    base = base_model(size, policy)
    x = keras.applications.vgg16.preprocess_input(images.astype("float32"))
    base.predict(x[:BATCH], batch_size=BATCH, verbose=0)
    start = time.perf_counter()
    base.predict(x, batch_size=BATCH, verbose=0)
    return len(x) / (time.perf_counter() - start)


def finetune_rates(work: Path, folder: Path, size: int) -> dict[tuple[str, bool], dict]:
    """(d) img/s of a fine-tune epoch per (precision, cached activations), and the caching cost."""
    import shutil

    import pandas as pd
    from omegaconf import OmegaConf

    from src.stages import finetune, train_head

    cfg = prepared_cfg(work, folder, size)
    train_head.run(cfg)
    rates = {}
    for policy in ("float32", "mixed_bfloat16"):
        for cached in (False, True):
            name = f"{policy}_{cached}"
            run_cfg = OmegaConf.merge(
                cfg,
                {
                    "augment": {"flip": None, "rotation": 0.0, "zoom": 0.0, "translate": 0.0, "shear": 0.0},
                    "train": {"precision": policy},
                    "finetune": {"layers": 4, "epochs": 2, "cached_activations": cached},
                    "paths": {
                        "models": str(work / f"models_{name}"),
                        "reports": str(work / f"reports_{name}"),
                    },
                },
            )
            Path(run_cfg.paths.models).mkdir()
            shutil.copy(Path(cfg.paths.models) / "head.keras", run_cfg.paths.models)
            start = time.perf_counter()
            finetune.run(run_cfg)
            total = time.perf_counter() - start
            history = pd.read_csv(Path(run_cfg.paths.reports) / "finetune" / "history.csv")
            n_train = len(np.load(Path(cfg.paths.prepared) / "labels_train.npy"))
            rates[(policy, cached)] = {
                "rate": n_train / float(history.seconds.iloc[-1]),
                "overhead": total - float(history.seconds.sum()),
            }
    return rates


def own_peak_rss_mib() -> float:
    """Peak resident memory of this process's own address space, in MiB.

    `VmHWM` from /proc/self/status, not `getrusage().ru_maxrss`: on Linux the latter keeps the
    high-water mark of the address space a process had before `exec`, and a child spawned
    with vfork (as `subprocess` does) starts out in its parent's, so it would report the
    benchmark process's own memory rather than the extract stage's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: the best there is


def rss_child(prepared: str, size: int) -> None:
    """Run the extract stage on a prepared folder in this fresh process; print peak RSS (MiB)."""
    from omegaconf import open_dict

    from src.stages import extract

    work = Path(prepared).parent
    cfg = prepared_cfg(work, work, size)
    with open_dict(cfg):
        cfg.paths.prepared = prepared
    extract.run(cfg)
    print(json.dumps({"peak_rss_mib": own_peak_rss_mib()}))


def peak_rss(work: Path, source: np.ndarray, n: int, size: int) -> float:
    """(e) peak RSS of the extract stage over n training images (real images, repeated)."""
    prepared = work / f"prepared_{n}"
    prepared.mkdir()
    images = np.lib.format.open_memmap(prepared / "images_train.npy", "w+", np.uint8, (n, size, size, 3))
    for start in range(0, n, len(source)):
        images[start : start + len(source)] = source[: n - start]
    images.flush()
    del images
    np.save(prepared / "labels_train.npy", (np.arange(n) % 2).astype(np.int32))
    for split in ("val", "test"):
        np.save(prepared / f"images_{split}.npy", source[:BATCH])
        np.save(prepared / f"labels_{split}.npy", (np.arange(BATCH) % 2).astype(np.int32))
    (prepared / "classes.json").write_text('["cats", "dogs"]')
    (prepared / "info.json").write_text("{}")
    done = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(prepared), "--size", str(size)],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=320, help="images for (a), (b), (c)")
    parser.add_argument("--size", type=int, default=180)
    parser.add_argument("--rss", default="1000,4000", help="dataset sizes for (e)")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.rss_child:
        rss_child(args.rss_child, args.size)
        return

    from src.fitting import precision

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = pick_images(args.images, work / "images")
        ref = reference_loop(folder, args.size)
        stage_rate, policy = extract_stage(work / "stage", folder, args.size)
        prepared = np.concatenate(
            [np.load(work / "stage" / "prepared" / f"images_{s}.npy") for s in ("train", "val", "test")]
        )
        ceilings = {p: ceiling(prepared, args.size, p) for p in ("float32", "mixed_bfloat16")}
        tuning = finetune_rates(work / "stage", folder, args.size)
        rss = {n: peak_rss(work, prepared, n, args.size) for n in map(int, args.rss.split(","))}

    flags = sorted(precision.cpu_flags() & precision.BF16_CPU_FLAGS) or "none"
    print(f"\nVGG16 conv base, {args.size} px, {args.images} cats-vs-dogs images, batch {BATCH}")
    print(f"{os.cpu_count()} CPUs, bf16 flags: {flags}; train.precision=auto -> {policy}\n")
    print("| measurement | img/s | ratio |")
    print("|---|---:|---:|")
    print(f"| (a) reference loop, float32 | {ref:.1f} | 1.00x |")
    print(f"| (b) extract stage, auto ({policy}) | {stage_rate:.1f} | {stage_rate / ref:.2f}x vs (a) |")
    for p, rate in ceilings.items():
        print(f"| (c) raw predict ceiling, {p} | {rate:.1f} | {rate / ref:.2f}x vs (a) |")
    if policy in ceilings:
        print(f"| (b) / (c) at {policy} | | {stage_rate / ceilings[policy]:.0%} of the ceiling |")
    for p in ("float32", "mixed_bfloat16"):
        full, cached = tuning[(p, False)], tuning[(p, True)]
        print(f"| (d) fine-tune epoch, {p}, whole network | {full['rate']:.1f} | 1.00x |")
        print(
            f"| (d) fine-tune epoch, {p}, cached boundary activations | {cached['rate']:.1f} "
            f"| {cached['rate'] / full['rate']:.2f}x (setup and caching {cached['overhead']:.0f} s, once) |"
        )
    sizes = sorted(rss)
    for n in sizes:
        print(f"| (e) extract peak RSS, {n} images | {rss[n]:.0f} MiB | |")
    if len(sizes) > 1:
        growth = rss[sizes[-1]] / rss[sizes[0]] - 1
        print(f"| (e) RSS growth {sizes[0]} -> {sizes[-1]} images | | {growth:+.1%} |")


if __name__ == "__main__":
    main()
