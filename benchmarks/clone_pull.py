"""Benchmark: what a fresh clone costs with `dvc pull` against recomputing the pipeline.

    python benchmarks/clone_pull.py [--preset dlwp_cats_vs_dogs] [--epochs 10] [--set KEY=VALUE ...]

In a temporary folder (with `../shared` beside it, as in CI): clones this repository's
committed HEAD, points the preset at the shared images and weights, runs `dvc repro` (the
recompute), commits `dvc.lock`, `dvc push --run-cache` to a local remote, then clones that
again and times `dvc pull --run-cache` and the `dvc repro` after it (which must run nothing).
Prints one table of wall times and the ratio recompute / (pull + repro).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import PRESETS, SHARED, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cwd: Path, *args: str) -> tuple[float, str]:
    """Run a command in `cwd` with this interpreter's tools first on PATH; (seconds, output)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.setdefault("GIT_AUTHOR_NAME", "benchmark")
    env.setdefault("GIT_AUTHOR_EMAIL", "benchmark@localhost")
    env.setdefault("GIT_COMMITTER_NAME", "benchmark")
    env.setdefault("GIT_COMMITTER_EMAIL", "benchmark@localhost")
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", default="dlwp_cats_vs_dogs", choices=[p for p, v in PRESETS.items() if v[1]]
    )
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides")
    args = parser.parse_args()
    _, folder, weights = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        (top / "shared").symlink_to(SHARED)
        origin, clone = top / "origin", top / "clone"
        run(top, "git", "clone", "-q", str(REPO), str(origin))
        overrides = [
            f"experiment={args.preset}",
            f"dataset.path=../shared/{folder.relative_to(SHARED)}",
            f"finetune.epochs={args.epochs}",
            *([f"model.weights=../shared/{Path(weights).relative_to(SHARED)}"] if weights else []),
            *args.set,
        ]
        run(origin, sys.executable, "-m", "src.params", *overrides)
        run(origin, "dvc", "remote", "add", "-d", "--local", "-f", "bench", str(top / "remote"))
        times = {}
        print(f"{args.preset}: dvc repro (recompute) ...", flush=True)
        times["dvc repro (recompute)"], _ = run(origin, "dvc", "repro")
        run(origin, "git", "add", "-A")
        run(origin, "git", "commit", "-qm", "benchmark run")
        times["dvc push --run-cache"], _ = run(origin, "dvc", "push", "--run-cache")
        run(top, "git", "clone", "-q", str(origin), str(clone))
        run(clone, "dvc", "remote", "add", "-d", "--local", "-f", "bench", str(top / "remote"))
        times["dvc pull --run-cache (fresh clone)"], _ = run(clone, "dvc", "pull", "--run-cache")
        times["dvc repro after the pull"], out = run(clone, "dvc", "repro")
        ran = re.findall(r"Running stage '(\w+)'", out)
    print(
        f"\n{machine()}; {args.preset}, {args.epochs} fine-tuning epochs, "
        f"{' '.join(args.set) or 'preset as is'}"
    )
    print("| step | s |\n|---|---:|")
    for step, seconds in times.items():
        print(f"| {step} | {seconds:.1f} |")
    fresh = times["dvc pull --run-cache (fresh clone)"] + times["dvc repro after the pull"]
    print(
        f"\nfresh clone: {times['dvc repro (recompute)'] / fresh:.0f}x faster with dvc pull than recomputing"
    )
    print("stages run after the pull: " + (", ".join(ran) if ran else "none"))


if __name__ == "__main__":
    main()
