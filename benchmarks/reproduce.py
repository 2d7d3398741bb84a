"""Rerun the reference results: each preset end to end on real images, one table.

    python benchmarks/reproduce.py                                  # every preset with data here
    python benchmarks/reproduce.py --presets gtsrb_finetune
    python benchmarks/reproduce.py --data flowers_resnet50=/data/flower_photos --weights resnet50=imagenet
    python benchmarks/reproduce.py --presets gtsrb_finetune --set dataset.image_size=96   # try a variant

Each preset runs as `python -m src.train experiment=<preset> dataset.path=<folder> ...` in its
own process, with every output and a private MLflow store under a temporary folder (or `--work`).
Prints and writes (`--out`, default `benchmarks/results/`) a markdown and a CSV table: preset,
reference, test accuracy of the final model and of the head alone, validation accuracy, wall
time per stage, precision, machine. Default folders are the shared datasets beside the
repository (`TL_SHARED_DIR`); a preset without a folder is skipped and says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TL_SHARED_DIR", REPO.parent / "shared")).resolve()
STAGES = ("prepare", "extract", "train_head", "finetune", "evaluate")
# Built once with ../shared/weights/xception_imagenet_notop.sh (see README, Offline use)
XCEPTION_WEIGHTS = Path(
    os.environ.get("TL_XCEPTION_WEIGHTS", REPO / "data" / "weights" / "xception_imagenet_notop.weights.h5")
)

# preset -> (reference result, default data folder, default weights)
PRESETS: dict[str, tuple[str, Path | None, str | None]] = {
    "dlwp_cats_vs_dogs": (
        "head ≈ 97%, fine-tuned 98.5% test",
        SHARED / "data" / "cats_vs_dogs",
        str(SHARED / "weights" / "vgg16_imagenet_notop.weights.h5"),
    ),
    "gtsrb_finetune": (
        "91.7% test",
        SHARED / "data" / "gtsrb_40",
        str(SHARED / "weights" / "vgg16_imagenet_notop.weights.h5"),
    ),
    "xception_cats_vs_dogs": (
        "head ≥ 99.3%, fine-tuned ≥ 99.5% test; at most half dlwp_cats_vs_dogs' time",
        SHARED / "data" / "cats_vs_dogs",
        str(XCEPTION_WEIGHTS),
    ),
    "xception_gtsrb": ("≥ 95% test (VGG16: 91.9%)", SHARED / "data" / "gtsrb_40", str(XCEPTION_WEIGHTS)),
    "cifar10_baseline": ("≥ 72% test (full 50k train)", SHARED / "data" / "cifar10_small", None),
    "flowers_resnet50": ("≥ 90% test", None, "imagenet"),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, cores, and the accelerator when one is visible."""
    gpus = ""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        gpus = ", ".join(sorted(set(out.stdout.split("\n")) - {""}))
    except OSError:
        pass
    return f"{cpu_name()}, {os.cpu_count()} cores" + (f", {gpus}" if gpus else ", no GPU")


def run_preset(preset: str, folder: Path, weights: str | None, work: Path, extra: list[str]) -> dict:
    """Run one preset end to end; return its figures (or the error)."""
    overrides = [
        f"experiment={preset}",
        f"dataset.path={folder}",
        *([f"model.weights={weights}"] if weights else []),
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"hydra.run.dir={work / 'hydra'}",
        *[f"paths.{key}={work / key}" for key in ("downloads", "prepared", "features", "cache")],
        *extra,
    ]
    start = time.perf_counter()
    log = work / "log.txt"  # the run's own output, written as it goes
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "src.train", *overrides], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        return {"error": " | ".join(tail), "wall": wall}
    reports = work / "hydra" / "reports"  # src.train writes models and reports to its Hydra folder
    metrics = json.loads((reports / "metrics.json").read_text())
    seconds = {s: json.loads((reports / f"{s}.json").read_text()).get("seconds") for s in STAGES}
    extract = json.loads((reports / "extract.json").read_text())
    finetune = json.loads((reports / "finetune.json").read_text())
    counts = json.loads((reports / "prepare.json").read_text()).get("counts", {})
    return {
        "test": metrics["test"]["accuracy"],
        "head_test": (metrics.get("head_test") or {}).get("accuracy"),
        "val": (metrics.get("val") or {}).get("accuracy"),
        "test_tta": (metrics.get("test_tta") or {}).get("accuracy"),  # evaluate.tta_views > 0
        "tta_views": (metrics.get("test_tta") or {}).get("views"),
        "ece": metrics.get("test", {}).get("ece", metrics.get("ece")),
        "seconds": seconds,
        "wall": wall,
        "precision": finetune.get("precision") or extract.get("precision") or "float32",
        "counts": counts,
    }


def pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def table(rows: list[dict]) -> str:
    head = ["preset", "reference", "test", "test, views averaged", "head only", "val"]
    head += ["images (train/val/test)"]
    head += [f"{s} s" for s in STAGES] + ["total s", "precision", "settings"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['preset']} | {r['reference']} | failed: {r['error']} |" + " |" * (len(head) - 3)
            )
            continue
        counts = "/".join(str(r["counts"].get(s, "")) for s in ("train", "val", "test"))
        averaged = f"{pct(r['test_tta'])} ({r['tta_views']} views)" if r.get("test_tta") is not None else ""
        cells = [r["preset"], r["reference"], pct(r["test"]), averaged, pct(r["head_test"]), pct(r["val"])]
        cells.append(counts)
        cells += [f"{r['seconds'].get(s) or 0:.0f}" for s in STAGES]
        cells += [f"{r['wall']:.0f}", r["precision"], r["settings"] or "preset as is"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=[p for p, (_, d, _) in PRESETS.items() if d])
    parser.add_argument(
        "--data", nargs="*", default=[], metavar="PRESET=PATH", help="a preset's image folder"
    )
    parser.add_argument("--weights", nargs="*", default=[], metavar="PRESET=PATH", help="a preset's weights")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every preset"
    )
    parser.add_argument("--work", type=Path, help="keep outputs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    data = {k: Path(v) for k, v in (item.split("=", 1) for item in args.data)}
    weights = dict(item.split("=", 1) for item in args.weights)
    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        top = args.work or Path(tmp)
        for preset in args.presets:
            reference, default_folder, default_weights = PRESETS[preset]
            folder = data.get(preset, default_folder)
            if folder is None or not folder.is_dir():
                print(f"{preset}: skipped, no image folder (pass --data {preset}=PATH)", flush=True)
                continue
            work = top / preset
            work.mkdir(parents=True, exist_ok=True)
            print(f"{preset}: running on {folder} ...", flush=True)
            result = run_preset(
                preset, folder.resolve(), weights.get(preset, default_weights), work, args.set
            )
            row = {"preset": preset, "reference": reference, "settings": " ".join(args.set), **result}
            rows.append(row)
            print(
                f"{preset}: test {pct(row.get('test'))}, head only {pct(row.get('head_test'))}, "
                f"{row['wall']:.0f} s" + (f", failed: {row['error']}" if "error" in row else ""),
                flush=True,
            )
    if not rows:
        return
    text = f"Measured {date.today()} on {machine()}.\n\n{table(rows)}\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "reproduce" + ("-" + "-".join(args.presets) if args.presets != list(PRESETS)[:3] else "")
    (args.out / f"{stem}.md").write_text(text)
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["preset", "reference", "test", "test_tta", "tta_views", "head_test", "val"]
            + [*STAGES, "total", "precision", "settings"]
        )
        for r in rows:
            writer.writerow(
                [r["preset"], r["reference"], r.get("test"), r.get("test_tta"), r.get("tta_views")]
                + [r.get("head_test"), r.get("val")]
                + [(r.get("seconds") or {}).get(s) for s in STAGES]
                + [round(r["wall"], 1), r.get("precision"), r["settings"]]
            )
    print(f"wrote {args.out / (stem + '.md')} and .csv")


if __name__ == "__main__":
    main()
