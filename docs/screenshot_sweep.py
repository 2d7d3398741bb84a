"""Capture the MLflow UI's run-comparison view of a sweep as a PNG (headless Chromium).

    python docs/screenshot_sweep.py [--parent RUN_ID] [--tracking-uri URI] [--out docs/sweep_compare.png]

Starts `mlflow server` on a free loopback port over the store (default: the project's
`mlruns/mlflow.db`), opens the comparison of the sweep's child runs (default: the latest sweep)
in Debian's `chromium --headless`, saves the screenshot and stops the server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src import compare, tracking  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer at {url}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tracking-uri", default=tracking.default_uri())
    parser.add_argument("--parent", help="the sweep's parent run id (default: the latest sweep)")
    parser.add_argument("--experiment", default=compare.DEFAULT_EXPERIMENT)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("sweep_compare.png"))
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("error: chromium not found: apt-get install chromium", file=sys.stderr)
        return 1
    client = MlflowClient(args.tracking_uri)
    parent = args.parent or compare.latest_sweep(client, args.experiment)
    if parent is None:
        print(
            f"error: no sweep in {args.tracking_uri}: run one with python -m src.train -m ...",
            file=sys.stderr,
        )
        return 1
    experiment_id = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    run_ids = [r.info.run_id for r in children if r.info.status == "FINISHED"]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.tracking_uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/health", server)
        query = urllib.parse.urlencode(
            {"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])},
            quote_via=urllib.parse.quote,
        )
        url = f"{base}/#/compare-runs?{query}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync",
             "--window-size=1600,1200", "--virtual-time-budget=30000", f"--screenshot={args.out}", url],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{args.out}: comparison of {len(run_ids)} runs of sweep {parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
