"""Benchmark: the whole `dlwp_cats_vs_dogs` run (10 fine-tuning epochs), validating through
the whole network every epoch (as before) against validating on activations cached at the
freeze boundary (now), with the predictions of both compared.

    python benchmarks/repro_speed.py [--train 400] [--val 100] [--test 100] [--pairs 1]
    python benchmarks/repro_speed.py --train 0     # all of the shared images (about 35 min)

Each side runs `python -m src.train experiment=dlwp_cats_vs_dogs` end to end in its own process
and folders (via `benchmarks/reproduce.py`), `finetune.cached_activations=false` against `true`;
pairs alternate which side goes first. The default subset keeps the shared data's 4:1:1
train/val/test proportions at a fifth of its size, so each stage's share of the time is the
full run's. Prints the median wall time per stage and in all, the ratio, and whether the
two runs' final models predict the same class for every test image (and the largest
difference between their test probabilities).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import PRESETS, STAGES, machine, run_preset  # noqa: E402

PRESET = "dlwp_cats_vs_dogs"
SIDES = {"whole network": "false", "cached boundary": "true"}


def test_probabilities(work: Path) -> np.ndarray:
    """The final model's probabilities for the run's prepared test images."""
    import keras

    from src.data import arrays
    from src.models import networks

    prepared = next(p for p in (work / "cache" / "prepare").iterdir() if p.is_dir())  # beside lock files
    images, _ = arrays.load_split(prepared, "images", "test")
    model = keras.saving.load_model(work / "hydra" / "models" / "final.keras")  # src.train's own folder
    raw = model.predict(arrays.batches(images, None, 32), verbose=0)
    return networks.probabilities(raw)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=400, help="training images (0: all)")
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--pairs", type=int, default=1)
    args = parser.parse_args()
    _, folder, weights = PRESETS[PRESET]
    extra = [f"finetune.epochs={args.epochs}"]
    if args.train:
        extra += [
            f"dataset.limit_per_class.train={args.train // 2}",
            f"dataset.limit_per_class.val={args.val // 2}",
            f"dataset.limit_per_class.test={args.test // 2}",
        ]
    times: dict[str, list[dict]] = {side: [] for side in SIDES}
    agree = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            order = list(SIDES) if pair % 2 == 0 else list(SIDES)[::-1]
            probs = {}
            for side in order:
                work = Path(tmp) / f"{pair}-{SIDES[side]}"
                work.mkdir()
                print(f"pair {pair + 1}: {side} ...", flush=True)
                result = run_preset(
                    PRESET, folder, weights, work, [*extra, f"finetune.cached_activations={SIDES[side]}"]
                )
                if "error" in result:
                    sys.exit(f"{side} failed: {result['error']}")
                times[side].append({**result["seconds"], "total": result["wall"]})
                probs[side] = test_probabilities(work)
                print(f"  {result['wall']:.0f} s, test accuracy {result['test']:.4f}", flush=True)
            a, b = probs.values()
            agree.append((float(np.mean(a.argmax(1) == b.argmax(1))), float(np.abs(a - b).max()), len(a)))

    columns = [*STAGES, "total"]
    print(f"\n{machine()}; {PRESET}, {args.epochs} fine-tuning epochs, median of {args.pairs} pair(s)")
    print("| validation | " + " | ".join(f"{c} s" for c in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    medians = {}
    for side, runs in times.items():
        medians[side] = {c: statistics.median(r.get(c) or 0.0 for r in runs) for c in columns}
        print(f"| {side} | " + " | ".join(f"{medians[side][c]:.0f}" for c in columns) + " |")
    before, after = medians.values()
    tuned = before["finetune"] + before["evaluate"], after["finetune"] + after["evaluate"]
    print(
        f"\nwhole run {before['total'] / after['total']:.2f}x faster "
        f"({100 * (1 - after['total'] / before['total']):.0f}% less time); fine-tune + evaluate "
        f"{tuned[0] / max(before['extract'], 1e-9):.1f}x -> {tuned[1] / max(after['extract'], 1e-9):.1f}x "
        "the extract stage's time in the same run"
    )
    for i, (same, diff, n) in enumerate(agree, 1):
        print(
            f"pair {i}: same predicted class for {100 * same:.1f}% of {n} test images, "
            f"largest probability difference {diff:.2e}"
        )


if __name__ == "__main__":
    main()
