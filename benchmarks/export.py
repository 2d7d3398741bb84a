"""What exporting costs and changes, for a preset: train it end to end (as
`benchmarks/reproduce.py` does), run the export stage on its final model, print the table.

    python benchmarks/export.py --preset dlwp_cats_vs_dogs
    python benchmarks/export.py --preset ci --work /tmp/export-ci      # keep (and reuse) the run
    python benchmarks/export.py --preset gtsrb_finetune --set export.latency_runs=200

Prints, per format (Keras as the baseline, measured in the same process): file size, test
accuracy, agreement with Keras' class, the largest probability difference, and batch-1 latency
(median and p95, one thread and all threads); then the ratios the targets are stated in (int8
size against float, int8 latency against Keras', accuracy change). Writes the table to
`benchmarks/results/export-<preset>.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import reproduce  # noqa: E402 - beside this script


def export_config(preset: str, folder: Path, weights: str | None, work: Path, extra: list[str]):
    """The preset's config pointed at what `reproduce.run_preset` left in `work`."""
    from src.config.compose import compose

    prepared = [
        p for p in (work / "cache" / "prepare").iterdir() if p.is_dir() and not p.name.startswith(".")
    ]
    if len(prepared) != 1:
        raise SystemExit(
            f"expected one prepared dataset under {work / 'cache' / 'prepare'}, found {len(prepared)}"
        )
    return compose(
        [
            f"experiment={preset}",
            f"dataset.path={folder}",
            *([f"model.weights={weights}"] if weights else []),
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            f"paths.models={work / 'hydra' / 'models'}",
            f"paths.reports={work / 'hydra' / 'reports'}",
            f"paths.prepared={prepared[0]}",
            *extra,
        ]
    )


def lines(result: dict) -> list[str]:
    """The markdown table and the ratios."""
    from src.stages.export import FIGURE_COLUMNS, figure_rows

    keras_row, rows = result["keras"], result["formats"]
    out = [
        "| " + " | ".join(FIGURE_COLUMNS) + " |",
        "|---" + "|---:" * (len(FIGURE_COLUMNS) - 1) + "|",
        *("| " + " | ".join(row) + " |" for row in figure_rows(keras_row, rows)),
    ]
    floating, int8 = rows.get("tflite_float", {}), rows.get("tflite_int8", {})
    if "size_bytes" in floating and "size_bytes" in int8:
        out += [
            "",
            f"int8 / float size: {int8['size_bytes'] / floating['size_bytes']:.3f}; "
            f"int8 latency (all threads) / Keras': "
            f"{int8['latency_all_threads']['median_ms'] / keras_row['latency']['median_ms']:.3f}; "
            f"int8 accuracy - Keras': {100 * (int8['accuracy'] - keras_row['accuracy']):+.2f} points; "
            f"{result['test_images']} test images",
        ]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", required=True, choices=sorted(reproduce.PRESETS) + ["ci"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the preset")
    parser.add_argument("--work", type=Path, help="keep the run here; a finished run there is reused")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    _, folder, weights = reproduce.PRESETS.get(
        args.preset,
        (
            "",
            reproduce.SHARED / "data" / "cats_vs_dogs",
            str(reproduce.SHARED / "weights" / "vgg16_imagenet_notop.weights.h5"),
        ),
    )
    work = args.work or Path(tempfile.mkdtemp(prefix=f"export-{args.preset}-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "hydra" / "models" / "final.keras").is_file():
        trained = reproduce.run_preset(args.preset, folder, weights, work, args.set)
        if "error" in trained:
            print(f"{args.preset}: training failed: {trained['error']}", file=sys.stderr)
            return 1
    from src.outputs import console
    from src.stages import export, stage

    console.setup_logging()
    console.start_tensorflow()
    result = stage.timed_run(
        "export", export.run, export_config(args.preset, folder, weights, work, args.set)
    )
    text = [f"export of `{args.preset}` ({reproduce.machine()}, {date.today()})", "", *lines(result)]
    print("\n".join(text))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"export-{args.preset}.md").write_text("\n".join(text) + "\n")
    (args.out / f"export-{args.preset}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
