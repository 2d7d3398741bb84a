"""Benchmark: a 3-job `finetune.layers` sweep that reuses prepared data and features, against
the same three jobs each preparing and extracting from scratch.

    python benchmarks/sweep_reuse.py [--layers 0,2,4] [--train 100] [--size 96]

Both sides are the same Hydra multirun of `python -m src.train` on the `ci` preset with the
shared cats-vs-dogs images and VGG16 weights; the baseline gives every job its own empty cache
(`paths.cache=.../${hydra:job.num}`), so each one recomputes. Prints both wall times and the ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TL_SHARED_DIR", REPO.parent / "shared")).resolve()


def sweep(work: Path, layers: str, train: int, size: int, per_job_cache: bool) -> float:
    job = "/${hydra:job.num}" if per_job_cache else ""
    args = [
        sys.executable, "-m", "src.train", "-m", "experiment=ci",
        f"finetune.layers={layers}",
        f"dataset.path={SHARED / 'data' / 'cats_vs_dogs'}",
        f"model.weights={SHARED / 'weights' / 'vgg16_imagenet_notop.weights.h5'}",
        f"dataset.image_size={size}",
        f"dataset.limit_per_class.train={train}",
        f"dataset.limit_per_class.val={max(train // 4, 8)}",
        f"dataset.limit_per_class.test={max(train // 4, 8)}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"hydra.sweep.dir={work / 'multirun'}",
        *[f"paths.{k}={work / k}" for k in ("raw", "downloads", "models", "reports")],
        *[f"paths.{k}={work / k}{job}" for k in ("prepared", "features", "cache")],
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(args, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", default="0,2,4", help="finetune.layers values, one job each")
    parser.add_argument("--train", type=int, default=100, help="training images per class")
    parser.add_argument("--size", type=int, default=96, help="image size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reused = sweep(Path(tmp) / "reuse", args.layers, args.train, args.size, per_job_cache=False)
        scratch = sweep(Path(tmp) / "scratch", args.layers, args.train, args.size, per_job_cache=True)
    jobs = len(args.layers.split(","))
    print(
        f"{jobs}-job sweep finetune.layers={args.layers}, {args.train} train images/class at {args.size} px"
    )
    print(f"| jobs recompute features | {scratch:7.1f} s |")
    print(f"| sweep reusing features  | {reused:7.1f} s |")
    print(f"| ratio                   | {scratch / reused:7.2f}x |")


if __name__ == "__main__":
    main()
