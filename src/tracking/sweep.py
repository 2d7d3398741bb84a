"""Sweeps in MLflow: one parent run per Hydra multirun, one child run per job, and a summary.

`SweepCallback` (registered in `conf/config.yaml` under `hydra.callbacks`) opens the parent run
when a multirun starts, named by what it sweeps (`sweep ci finetune.layers=4,8,12`), and writes
its id to `<sweep dir>/mlflow_parent_run.json`; every job, in this process or in a launcher's
worker process, reads that file and logs into its own child run. When the multirun ends, the
callback tabulates the children (swept values against val and test metrics, best first) as CSV
and markdown, plots the metric against each swept key, attaches both to the parent, and exits
with status 1 if any job failed.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from src.fitting.optuna_trials import TRIAL_KEY
from src.images.decode import natural_key
from src.tracking import store

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent_run.json"
METRICS = ("val.accuracy", "test.accuracy", "test.loss", "head_test.accuracy")
SORT_METRIC = "val.accuracy"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def parent_of(sweep_dir: Path) -> dict | None:
    """The parent run written by the callback for this sweep, if any."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def fixed_keys(overrides: list[str]) -> set[str]:
    """The keys a multirun's command line sets to one value (not a sweep such as `a=1,2`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.get_key_element().lstrip("+~") for o in parsed if not o.is_sweep_override()}


def _names_the_sweep(key: str) -> bool:
    """Whether a setting tells sweeps apart: not where things live (`paths.*`, `tracking.*`,
    `dataset.path`, ...), not Hydra's own settings or plugins (`hydra.*`, `hydra/launcher`), not the
    preset (named on its own)."""
    return not (store.UNNAMED_SETTINGS.match(key) or key.startswith("hydra/"))


def sweep_name(config: DictConfig) -> str:
    """What a multirun sweeps, as the name of its parent run: its preset, the values it sweeps
    (the command line's, then the search space a preset gives the sweeper, e.g. Optuna's
    `finetune.layers=choice(0, 2, 4, 8)`), then the settings it fixes, as written; where things
    live is left out. `-m experiment=ci finetune.layers=4,8,12 hydra/launcher=ray` is
    `sweep ci finetune.layers=4,8,12`; a sweep over presets names them in place of the preset."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept: dict[str, str] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        key = override.get_key_element().lstrip("+~")
        if override.is_sweep_override() and (key == "experiment" or _names_the_sweep(key)):
            swept[key] = override.input_line.strip()
        elif not override.is_sweep_override() and _names_the_sweep(key):
            fixed[key] = override.input_line.strip()
    for key, space in (config.hydra.sweeper.get("params") or {}).items():
        if str(key) not in swept and str(key) not in fixed and _names_the_sweep(str(key)):
            swept[str(key)] = f"{key}={space}"
    preset = [] if "experiment" in swept else [str(config.preset)]
    name = " ".join(["sweep", *preset, *swept.values(), *fixed.values()])
    return name if len(name) <= 250 else name[:249] + "…"  # MLflow's limit on run names


def start_child(cfg: DictConfig, parent: dict, overrides: list[str], job: int) -> str:
    """Create the child run of job `job` (status RUNNING); evaluate logs into it later."""
    client = _client(parent["tracking_uri"])
    fixed = fixed_keys(parent.get("overrides", []))
    varying = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in fixed]  # the swept values
    run = client.create_run(
        parent["experiment_id"],
        run_name=f"job{job}: {' '.join(varying or overrides)}"[:250],
        tags={
            "mlflow.parentRunId": parent["run_id"],
            "sweep.job": str(job),
            "sweep.overrides": json.dumps(overrides),
            "preset": cfg.preset,
        },
    )
    return run.info.run_id


def mark_failed(parent: dict, run_id: str, err: BaseException) -> None:
    """Record a failed job: status FAILED, the error as a tag and the traceback as an artifact."""
    client = _client(parent["tracking_uri"])
    client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:4000])
    client.log_text(run_id, "".join(traceback.format_exception(err)), "error.txt")
    client.set_terminated(run_id, "FAILED")


def fail_sweep(sweep_dir: Path, err: BaseException) -> None:
    """The sweep stopped before its jobs could run (e.g. its Optuna storage is unreachable): its
    parent run, if one was started, ends FAILED with the reason, not RUNNING for good."""
    parent = parent_of(sweep_dir)
    if parent is None:
        return
    client = _client(parent["tracking_uri"])
    client.set_tag(parent["run_id"], "error", f"{type(err).__name__}: {err}"[:4000])
    client.set_terminated(parent["run_id"], "FAILED")


def mark_pruned(parent: dict, run_id: str, reason: str) -> None:
    """Record a job its Optuna pruner stopped: status KILLED, tag `optuna.state` PRUNED."""
    client = _client(parent["tracking_uri"])
    client.set_tag(run_id, "optuna.state", "PRUNED")
    client.set_tag(run_id, "pruned", reason[:4000])
    client.set_terminated(run_id, "KILLED")


def _value(text: str) -> Any:
    """An override's value as a number when it is one (for sorting and plotting)."""
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def summarize(uri: str, parent_run_id: str) -> pd.DataFrame:
    """One row per child run: swept values, status and metrics, best val accuracy first."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    rows = []
    for run in children:
        overrides = json.loads(run.data.tags.get("sweep.overrides", "[]"))
        row: dict[str, Any] = {"job": int(run.data.tags.get("sweep.job", -1))}
        row.update({k: _value(v) for k, v in (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)})
        row["status"] = run.info.status
        row.update({m: run.data.metrics.get(m, math.nan) for m in METRICS})
        row["error"] = run.data.tags.get("error", "")
        row["run_id"] = run.info.run_id
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values([SORT_METRIC, "job"], ascending=[False, True], na_position="last").reset_index(
        drop=True
    )


def swept_keys(frame: pd.DataFrame) -> list[str]:
    """Override keys whose value differs between jobs (all override keys for a single job)."""
    fixed = {"job", "status", "error", "run_id", TRIAL_KEY, *METRICS}
    keys = [c for c in frame.columns if c not in fixed]
    varying = [k for k in keys if frame[k].astype(str).nunique() > 1]
    return varying or keys


def to_markdown(frame: pd.DataFrame) -> str:
    """The summary as a markdown table (no extra dependency)."""
    if frame.empty:
        return "(no jobs)\n"
    columns = ["job", *swept_keys(frame), "status", *METRICS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in frame[columns].to_dict("records"):
        cells = [f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else str(v) for v in row.values()]
        lines.append("| " + " | ".join("" if c == "nan" else c for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(frame: pd.DataFrame, folder: Path) -> list[Path]:
    """One PNG per swept key: val and test accuracy against the key's values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key in swept_keys(frame):
        data = frame.dropna(subset=[SORT_METRIC])
        order = sorted(data[key].astype(str).unique(), key=natural_key)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for metric in ("val.accuracy", "test.accuracy"):
            means = data.groupby(data[key].astype(str))[metric].max().reindex(order)
            ax.plot(order, means.values, marker="o", label=metric)
        ax.set_xlabel(key)
        ax.set_ylabel("accuracy")
        ax.legend()
        fig.tight_layout()
        path = folder / f"sweep_{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


class SweepCallback(Callback):
    """Hydra callback: the MLflow parent run of a multirun and its summary."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        import mlflow

        from src.config.checks import credentials_problem

        # before the overrides become tags of the parent run; Hydra turns a callback's exception
        # into a warning, so stop here
        if problem := credentials_problem("tracking.uri", config.tracking.uri):
            log.error("%s", problem)
            raise SystemExit(2)

        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        experiment_id = store.use_store(config)  # creates the store before jobs write to it
        uri = mlflow.get_tracking_uri()
        overrides = list(config.hydra.overrides.task)
        run = _client(uri).create_run(
            experiment_id,
            run_name=sweep_name(config),
            tags={"sweep": "parent", "sweep.dir": str(sweep_dir), "sweep.overrides": json.dumps(overrides)},
        )
        parent = {
            "run_id": run.info.run_id,
            "experiment_id": experiment_id,
            "tracking_uri": uri,
            "overrides": overrides,
        }
        (sweep_dir / PARENT_FILE).write_text(json.dumps(parent))
        log.info("sweep parent run %s in %s", run.info.run_id, uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        parent = parent_of(sweep_dir)
        if parent is None:
            return
        client = _client(parent["tracking_uri"])
        frame = summarize(parent["tracking_uri"], parent["run_id"])
        frame.to_csv(sweep_dir / "summary.csv", index=False)
        (sweep_dir / "summary.md").write_text(to_markdown(frame))
        for path in [sweep_dir / "summary.csv", sweep_dir / "summary.md", *plot(frame, sweep_dir)]:
            client.log_artifact(parent["run_id"], str(path))
        failed = int((frame["status"] == "FAILED").sum()) if not frame.empty else 0
        pruned = int((frame["status"] == "KILLED").sum()) if not frame.empty else 0
        total = len(frame)
        best = frame.iloc[0] if total and frame.iloc[0]["status"] == "FINISHED" else None
        if best is not None:
            client.log_metric(parent["run_id"], f"best.{SORT_METRIC}", float(best[SORT_METRIC]))
            client.set_tag(parent["run_id"], "best_run_id", best["run_id"])
        client.set_tag(parent["run_id"], "jobs", str(total))
        client.set_tag(parent["run_id"], "failed_jobs", str(failed))
        client.set_tag(parent["run_id"], "pruned_jobs", str(pruned))
        client.set_terminated(parent["run_id"], "FAILED" if total and failed == total else "FINISHED")
        print(to_markdown(frame))
        log.info(
            "sweep done: %d jobs, %d failed%s; summary in %s",
            total, failed, f", {pruned} pruned" if pruned else "", sweep_dir / "summary.md",
        )  # fmt: skip
        if failed:
            raise SystemExit(1)
