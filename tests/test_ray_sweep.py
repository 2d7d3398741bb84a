"""`hydra/launcher=ray`: a sweep's jobs as Ray tasks on a real local Ray cluster (`ray start
--head` on loopback, 2 CPUs), each job still a child run of the sweep's MLflow parent run, the
features extracted once for all of them.

The launcher pins cloudpickle<3, which the main environment's joblib refuses, so it has an
environment of its own, where `.ci/run` runs this file:

    python3 -m venv .venv-ray && .venv-ray/bin/pip install -c constraints-ray.txt -e ".[ray]" pytest
    .venv-ray/bin/pytest -m slow tests/test_ray_sweep.py

Elsewhere (the main environment, `.[dev]`) these tests are skipped."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_sweep import children, job_logs, run_sweep

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
        reason="the Ray launcher is not installed here; it has its own environment: "
        "pip install -c constraints-ray.txt -e '.[ray]' pytest (see .ci/run)",
    ),
]
RAY = Path(sys.executable).with_name("ray")


@pytest.fixture
def ray_head():
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run(
        [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_sweep_runs_as_ray_tasks_with_one_parent_three_children_and_one_extraction(tmp_path, ray_head):
    done, client, parent = run_sweep(
        tmp_path, "finetune.layers=0,2,4", "hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_head}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "_run_job pid=" in output  # the jobs ran in Ray's worker processes
    runs = children(client, parent)
    assert sorted(r.data.params["finetune.layers"] for r in runs) == ["0", "2", "4"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all("test.accuracy" in r.data.metrics for r in runs)
    assert {a.path for a in client.list_artifacts(parent["run_id"])} >= {"summary.csv", "summary.md"}
    logs = job_logs(tmp_path)
    assert logs.count("extract: building") == 1 and logs.count("extract: reusing") == 2
