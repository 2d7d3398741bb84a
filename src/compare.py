"""Print a sweep's comparison table in the terminal: swept values against val and test metrics.

    python -m src.compare                       # the latest sweep in the configured experiment
    python -m src.compare <parent run id>       # a given sweep
    python -m src.compare <experiment name>     # the latest sweep in that experiment

The store is the project's (`mlruns/mlflow.db`) unless MLFLOW_TRACKING_URI or --tracking-uri
says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from src.tracking import store, sweep

DEFAULT_EXPERIMENT = "transfer-learning"


def latest_sweep(client: MlflowClient, experiment_name: str) -> str | None:
    """The run id of the most recent sweep parent in an experiment."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.sweep = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def table(uri: str, parent_run_id: str) -> str:
    """The markdown comparison table of one sweep."""
    return sweep.to_markdown(sweep.summarize(uri, parent_run_id))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "target", nargs="?", default=DEFAULT_EXPERIMENT, help="parent run id or experiment name"
    )
    parser.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or store.default_uri()
    )
    args = parser.parse_args(argv)
    client = MlflowClient(args.tracking_uri)
    try:
        parent = client.get_run(args.target).info.run_id
    except MlflowException:
        parent = latest_sweep(client, args.target)
    if parent is None:
        print(f"error: no sweep found for {args.target!r} in {args.tracking_uri}", file=sys.stderr)
        return 1
    print(f"sweep {parent} ({args.tracking_uri})")
    print(table(args.tracking_uri, parent), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
