"""Benchmark: a fine-tuning epoch with augmentation, validating through the whole network
against validating on activations cached at the freeze boundary.

    python benchmarks/finetune_validation.py [--train 200] [--val 200] [--size 180] [--pairs 2]

The `dlwp_cats_vs_dogs` recipe (VGG16, block 5 unfrozen, flip/rotation/zoom augmentation) on
the shared cats-vs-dogs images: validation images are never augmented, so the frozen bottom's
activations for them are the same every epoch. Both sides run `src.stages.finetune.run` for two
epochs from the same trained head, alternating in pairs; the table gives the median time of
an epoch after the first (training + validation), the one-time caching pass, and the largest
difference between the two validation-loss curves (they must agree).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("TL_SHARED_DIR", REPO.parent / "shared")).resolve()


def setup(work: Path, n_train: int, n_val: int, size: int):
    """The recipe's config with prepared images, features and a trained head under `work`."""
    from src.config.checks import validate
    from src.config.compose import compose
    from src.stages import download, extract, prepare, train_head

    cfg = validate(
        compose(
            [
                "experiment=dlwp_cats_vs_dogs",
                f"dataset.path={SHARED / 'data' / 'cats_vs_dogs'}",
                f"model.weights={SHARED / 'weights' / 'vgg16_imagenet_notop.weights.h5'}",
                f"dataset.image_size={size}",
                f"dataset.limit_per_class.train={n_train // 2}",
                f"dataset.limit_per_class.val={n_val // 2}",
                "dataset.limit_per_class.test=8",
                "head.epochs=3",
                "finetune.epochs=2",
                "tracking.enabled=false",
                *[
                    f"paths.{k}={work / k}"
                    for k in ("raw", "downloads", "prepared", "features", "models", "reports")
                ],
                f"paths.cache={work / 'cache'}",
            ]
        )
    )
    for step in (download.run, prepare.run, extract.run, train_head.run):
        step(cfg)
    return cfg


def one_run(cfg, work: Path, cached: bool, tag: str) -> tuple[float, float, np.ndarray]:
    """(epoch-2 seconds, time outside the epochs, validation losses) of one fine-tune."""
    import pandas as pd
    from omegaconf import OmegaConf

    from src.stages import finetune

    run_cfg = OmegaConf.merge(
        cfg,
        {
            "finetune": {"cached_activations": cached},
            "paths": {"models": str(work / f"models_{tag}"), "reports": str(work / f"reports_{tag}")},
        },
    )
    Path(run_cfg.paths.models).mkdir(parents=True)
    shutil.copy(Path(cfg.paths.models) / "head.keras", run_cfg.paths.models)
    start = time.perf_counter()
    finetune.run(run_cfg)
    total = time.perf_counter() - start
    history = pd.read_csv(Path(run_cfg.paths.reports) / "finetune" / "history.csv")
    return float(history.seconds.iloc[-1]), total - float(history.seconds.sum()), history.val_loss.to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--size", type=int, default=180)
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    runs: dict[bool, list] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = setup(work, args.train, args.val, args.size)
        for i in range(args.pairs):
            for cached in (False, True) if i % 2 == 0 else (True, False):
                runs[cached].append(one_run(cfg, work, cached, f"{cached}_{i}"))
    full = statistics.median(r[0] for r in runs[False])
    fast = statistics.median(r[0] for r in runs[True])
    setup_cost = statistics.median(r[1] for r in runs[True]) - statistics.median(r[1] for r in runs[False])
    gap = max(float(np.max(np.abs(a[2] - b[2]) / np.abs(b[2]))) for a, b in zip(runs[True], runs[False]))
    sizes = f"{args.size} px, {args.train} train / {args.val} val images"
    print(f"\nfine-tune epoch with augmentation, VGG16 block 5, {sizes}")
    print(f"{os.cpu_count()} CPUs, medians of {args.pairs} runs each\n")
    print("| validation | epoch s | ratio |")
    print("|---|---:|---:|")
    print(f"| whole network, every epoch | {full:.1f} | 1.00x |")
    print(f"| cached boundary activations | {fast:.1f} | {full / fast:.2f}x faster |")
    print(f"\none-time caching pass: {setup_cost:+.1f} s; largest relative val_loss difference: {gap:.1e}")


if __name__ == "__main__":
    main()
