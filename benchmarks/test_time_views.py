"""Test-time augmentation on a finished run: its evaluate stage again with `evaluate.tta_views` = k
for each k asked, printing validation and test accuracy of the averaged views against the single
view of the same model (pick k on validation; the test column is for the record).

    python benchmarks/test_time_views.py /tmp/bench/xception_gtsrb --views 2 4 8
    python benchmarks/test_time_views.py outputs/2026-11-30/10-00-00          # a src.train run

The run folder is one `src.train` wrote (or a `reproduce.py --work` preset folder, which holds it
as `hydra/`): its `.hydra/config.yaml`, `models/final.keras`, `reports/` and the prepared arrays
and features its prepare and extract summaries name. Nothing in it changes: each evaluation
writes to a copy of its reports and beside links to its models, tracking off.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.outputs import console  # noqa: E402
from src.stages import evaluate  # noqa: E402


def run_folder(path: Path) -> Path:
    """The folder holding `.hydra/config.yaml`: `path` itself or its `hydra/` child."""
    for folder in (path, path / "hydra"):
        if (folder / ".hydra" / "config.yaml").is_file():
            return folder
    raise SystemExit(f"{path}: no .hydra/config.yaml here or under hydra/; pass a src.train run folder")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("run", type=Path, help="a finished src.train run folder")
    parser.add_argument("--views", type=int, nargs="+", default=[2, 4, 8], help="evaluate.tta_views values")
    args = parser.parse_args()
    folder = run_folder(args.run)
    cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
    console.start_tensorflow()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reports = Path(tmp) / "reports"
        shutil.copytree(folder / "reports", reports)
        for stage, key in (("prepare", "prepared"), ("extract", "features")):  # where the run read them
            summary = json.loads((folder / "reports" / f"{stage}.json").read_text())
            (Path(tmp) / key).symlink_to(summary.get("folder") or cfg.paths[key])  # outside paths.cache
            cfg.paths[key] = str(Path(tmp) / key)
        cfg.paths.cache = str(Path(tmp) / "cache")  # the run's cache is read through the links only
        models = Path(tmp) / "models"  # links to the run's models: a temperature is fitted beside them
        models.mkdir()
        for model_file in (folder / "models").iterdir():
            (models / model_file.name).symlink_to(model_file)
        cfg.paths.models = str(models)
        cfg.paths.reports = str(reports)
        cfg.tracking.enabled = False
        for k in args.views:
            cfg.evaluate.tta_views = k
            start = time.perf_counter()
            result = evaluate.run(cfg)
            seconds = time.perf_counter() - start
            val = result.get("val_tta") or {}
            rows.append((k, val.get("single_view_accuracy"), val.get("accuracy"), result["test"]["accuracy"],
                         result["test_tta"]["accuracy"], seconds))  # fmt: skip
            print(f"views {k}: test {result['test_tta']['accuracy']:.4f}, {seconds:.0f} s", flush=True)

    def pct(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.2f}%"

    print(f"\n{cfg.get('preset', 'run')} ({folder})\n")
    print("| views | val, single | val, averaged | test, single | test, averaged | evaluate s |")
    print("|---|---|---|---|---|---|")
    for k, val_one, val_avg, test_one, test_avg, seconds in rows:
        cells = [str(k), pct(val_one), pct(val_avg), pct(test_one), pct(test_avg), f"{seconds:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
