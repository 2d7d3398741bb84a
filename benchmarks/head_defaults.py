"""Benchmark: which dense-head settings do well on folders nobody tuned for.

    python benchmarks/head_defaults.py [--size 180] [--work DIR] [--variants current,gap_adam]
    python benchmarks/head_defaults.py --models vgg16,xception --variants default   # which backbone

`dataset=folder` with its defaults is what a user with a folder of photos runs. This script
prepares and extracts each shared dataset once as such a folder (ImageNet features of each of
`--models` at `--size` px, by default each model's own size, and the default `dataset.split`),
plus small random subsets of them, then trains each head variant on the cached features and
scores it on the held-out test split (head only, as the train_head stage keeps its best
val_loss epoch). Prints one table of test accuracies, the best epoch of each run, and each
backbone and variant's mean and worst accuracy across the datasets, with the seconds each
backbone's extraction took.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("TL_SHARED_DIR", REPO.parent / "shared")).resolve()
WEIGHTS = {
    "vgg16": SHARED / "weights" / "vgg16_imagenet_notop.weights.h5",
    # built once with ../shared/weights/xception_imagenet_notop.sh (see README, Offline use)
    "xception": Path(
        os.environ.get(
            "TL_XCEPTION_WEIGHTS", REPO / "data" / "weights" / "xception_imagenet_notop.weights.h5"
        )
    ),
}

# name -> (folder, extra dataset overrides)
DATASETS = {
    "cats_vs_dogs": (SHARED / "data" / "cats_vs_dogs", []),
    "cats_vs_dogs_100": (SHARED / "data" / "cats_vs_dogs", ["dataset.limit_per_class.train=100"]),
    "gtsrb_40": (SHARED / "data" / "gtsrb_40", ["dataset.test_labels_csv=Test.csv"]),
    "cifar10_small": (SHARED / "data" / "cifar10_small", []),
    "cifar10_50": (SHARED / "data" / "cifar10_small", ["dataset.limit_per_class.train=50"]),
}


def head(pooling: str, units: str, dropout: float, optimizer: str, lr: float, epochs: int) -> list[str]:
    return [
        f"head.pooling={pooling}",
        f"head.units={units}",
        f"head.dropout={dropout}",
        f"head.optimizer={optimizer}",
        f"head.learning_rate={lr}",
        f"head.epochs={epochs}",
    ]


# name -> head overrides; `default` is conf/head/dense.yaml as it stands, `current` as it stood
# before this benchmark
VARIANTS = {
    "default": [],
    "current": head("flatten", "[256]", 0.5, "rmsprop", 1e-3, 20),
    "flatten_lr1e-4": head("flatten", "[256]", 0.5, "rmsprop", 1e-4, 30),
    "gap_rmsprop": head("avg", "[256]", 0.5, "rmsprop", 1e-3, 30),
    "gap_adam": head("avg", "[256]", 0.5, "adam", 1e-3, 30),
    "gap_linear": head("avg", "[]", 0.0, "adam", 1e-3, 40),
}


def features_for(name: str, work: Path, size: int | None, model: str = "vgg16"):
    """The config of dataset `name` prepared and extracted with `model` at `size` px (None: the
    model's own, as `dataset=folder` defaults to) under `work/<model>/<name>/<size>px`, once."""
    from src.config.checks import validate
    from src.config.compose import compose
    from src.stages import download, extract, prepare, stage

    folder, extra = DATASETS[name]
    overrides = ["dataset=folder", f"dataset.path={folder}", f"model={model}"]
    overrides.append(f"model.weights={WEIGHTS[model]}")
    if size is not None:
        overrides.append(f"dataset.image_size={size}")
    size = compose(overrides).dataset.image_size
    out = work / model / name / f"{size}px"
    cfg = validate(
        compose(
            [
                *overrides,
                "tracking.enabled=false",
                *[
                    f"paths.{k}={out / k}"
                    for k in ("raw", "downloads", "prepared", "features", "models", "reports")
                ],
                f"paths.cache={work / 'cache'}",
                *extra,
            ]
        )
    )
    if not (out / "features" / "info.json").is_file():
        for step in (download.run, prepare.run, extract.run):
            stage.timed_run(step.__module__.rsplit(".", 1)[1], step, cfg)
    return cfg


def score_head(cfg, variant: list[str]) -> tuple[float, int]:
    """Train the head with `variant` on the cached features; (test accuracy, best epoch)."""
    import keras
    from omegaconf import OmegaConf

    from src.config.checks import validate
    from src.data import arrays
    from src.stages import evaluate, stage, train_head

    run_cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(variant))
    validate(run_cfg)
    result = stage.timed_run("train_head", train_head.run, run_cfg)  # marks models/ as the pipeline's
    model = keras.saving.load_model(Path(run_cfg.paths.models) / "head.keras")
    x, y = arrays.load_features(run_cfg, "test")
    scores, _ = evaluate.score(model, x, y, len(arrays.load_classes(run_cfg)), 64)
    return scores["accuracy"], result["best"]["epoch"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, help="image size (default: each model's own, as dataset=folder)")
    parser.add_argument("--work", type=Path, help="keep prepared data and features here, for reruns")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--models", default="vgg16", help=f"backbones, of {','.join(WEIGHTS)}")
    args = parser.parse_args()
    names, variants, models = args.datasets.split(","), args.variants.split(","), args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        results: dict[tuple[str, str, str], tuple[float, int]] = {}
        seconds = dict.fromkeys(models, 0.0)
        sizes: dict[str, int] = {}
        for model in models:
            for name in names:
                start = time.perf_counter()
                cfg = features_for(name, work, args.size, model)
                sizes[model] = cfg.dataset.image_size
                seconds[model] += time.perf_counter() - start
                print(f"{model} {name}: features ready in {time.perf_counter() - start:.0f} s", flush=True)
                for variant in variants:
                    results[(model, name, variant)] = score_head(cfg, VARIANTS[variant])
                    acc, epoch = results[(model, name, variant)]
                    print(f"  {variant}: test {100 * acc:.2f}% (best epoch {epoch})", flush=True)
    at = f"{args.size} px" if args.size else "each model's own size"
    print(f"\nhead-only test accuracy, ImageNet features at {at}, dataset=folder defaults\n")
    print("| backbone | px | variant | " + " | ".join(names) + " | mean | worst | features s |")
    print("|---|---:|---|" + "---:|" * (len(names) + 3))
    for model in models:
        for variant in variants:
            accs = [results[(model, n, variant)][0] for n in names]
            cells = [f"{100 * a:.1f}% (ep {results[(model, n, variant)][1]})" for n, a in zip(names, accs)]
            print(
                f"| {model} | {sizes[model]} | {variant} | "
                + " | ".join(cells)
                + f" | {100 * np.mean(accs):.1f}% | {100 * min(accs):.1f}% | {seconds[model]:.0f} |"
            )


if __name__ == "__main__":
    main()
