"""Capture the MLflow UI's run-comparison view of a sweep as a PNG (headless Chromium).

    python docs/screenshot_sweep.py [--parent RUN_ID] [--tracking-uri URI] [--out docs/sweep_compare.png]
        [--metrics val.accuracy,test.accuracy]

Starts `mlflow server` on a free loopback port over the store (default: the project's
`mlruns/mlflow.db`), opens the comparison of the sweep's finished child runs (default: the
latest sweep) in Chromium driven by Playwright (`pip install playwright`; the system's
`chromium`, no browser download), sets the parallel-coordinates plot to the swept keys against
the metrics, saves the screenshot and stops the server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src import compare
from src.tracking import store, sweep

# No background connections: the machine may have no network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def capture(browser: str, url: str, params: list[str], metrics: list[str], out: Path) -> None:
    """Open the comparison page, keep only `params` and `metrics` in its parallel-coordinates
    plot, close the assistant panel and save a screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=browser, args=CHROMIUM_ARGS)
        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_text("Parallel Coordinates Plot").wait_for(timeout=60_000)
        page.get_by_label("Close").first.click()  # the assistant panel
        for label, wanted in (("Parameters", params), ("Metrics", metrics)):
            box = page.locator(f"div:text-is('{label}:') + div")  # the plot's multi-select
            chips = box.locator(".du-bois-light-select-selection-item")
            for name in chips.all_inner_texts():
                if name not in wanted:
                    chips.filter(has_text=name).locator(".du-bois-light-select-selection-item-remove").click()
            for name in wanted:
                if name not in chips.all_inner_texts():
                    box.click()
                    page.keyboard.type(name)
                    page.keyboard.press("Enter")
                    page.keyboard.press("Escape")
        page.wait_for_timeout(1000)  # the plot redraws
        page.screenshot(path=str(out))
        chromium.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tracking-uri", default=store.default_uri())
    parser.add_argument("--parent", help="the sweep's parent run id (default: the latest sweep)")
    parser.add_argument("--experiment", default=compare.DEFAULT_EXPERIMENT)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("sweep_compare.png"))
    parser.add_argument("--metrics", default="val.accuracy,test.accuracy", help="comma-separated")
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
    swept = sweep.swept_keys(sweep.summarize(args.tracking_uri, parent))
    metrics = args.metrics.split(",")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.tracking_uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        server.wait_until_up(base, server, timeout=90)
        query = urllib.parse.urlencode(
            {"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])},
            quote_via=urllib.parse.quote,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        capture(browser, f"{base}/#/compare-runs?{query}", swept, metrics, args.out)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{args.out}: comparison of {len(run_ids)} runs of sweep {parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
