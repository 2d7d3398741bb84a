"""Sweeps: cache keys and reuse, the MLflow summary of a sweep, and real Hydra multiruns (basic,
joblib and Optuna) logging a parent run with one child per job."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from src import compare
from src.config.paths import REPO_ROOT, project_root
from src.stages import prepare, reuse
from src.tracking import server as tracking_server
from src.tracking import store, sweep
from tests.conftest import SHARED, free_port, make_cfg, path_overrides, require_shared

# --- cache keys ----------------------------------------------------------------------------


@pytest.fixture
def prepared_cfg(tmp_path, shared):
    cfg = make_cfg(tmp_path, "dataset.limit_per_class.train=4", "dataset.limit_per_class.val=2")
    raw = Path(cfg.paths.raw)
    raw.mkdir(parents=True)
    (raw / "source.json").write_text(
        json.dumps({"root": str(SHARED / "data" / "cats_vs_dogs"), "fingerprint": "f"})
    )
    return cfg


def test_prepare_key_follows_dataset_settings_only(prepared_cfg):
    key = reuse.stage_key(prepared_cfg, "prepare")
    prepared_cfg.head.dropout = 0.1
    prepared_cfg.finetune.layers = 2
    assert reuse.stage_key(prepared_cfg, "prepare") == key
    prepared_cfg.dataset.image_size = 48
    assert reuse.stage_key(prepared_cfg, "prepare") != key


def test_reuse_or_run_builds_once_then_reuses(prepared_cfg):
    first = reuse.reuse_or_run(prepared_cfg, "prepare", prepare.run)
    assert first["reused"] is False
    built = Path(prepared_cfg.paths.prepared)
    assert built.parent == Path(prepared_cfg.paths.cache) / "prepare"
    assert json.loads((built / "info.json").read_text())["cache_key"] == first["cache_key"]
    second = reuse.reuse_or_run(prepared_cfg, "prepare", prepare.run)
    assert second["reused"] is True and Path(prepared_cfg.paths.prepared) == built


def test_project_root_of_a_dvc_experiment_copy_is_the_repo_dvc_names(monkeypatch, tmp_path):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert project_root() == REPO_ROOT and project_root() / "mlruns" == store.STORE_DIR
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12"
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "proj"))  # what `dvc exp run` sets in a copy
    assert project_root(copy) == tmp_path / "proj"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "gone"))  # not a folder: ignored
    assert project_root(copy) == copy


# --- summary of a sweep from a real MLflow store -------------------------------------------


def test_summary_ranks_children_and_reports_failures(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweeps")
    parent = client.create_run(experiment, tags={"sweep": "parent"}).info.run_id
    for job, (layers, val, status) in enumerate(
        [(0, 0.80, "FINISHED"), (4, 0.90, "FINISHED"), (99, None, "FAILED")]
    ):
        run = client.create_run(
            experiment,
            tags={
                "mlflow.parentRunId": parent,
                "sweep.job": str(job),
                "sweep.overrides": json.dumps(["experiment=ci", f"finetune.layers={layers}"]),
            },
        ).info.run_id
        if val is not None:
            client.log_metric(run, "val.accuracy", val)
            client.log_metric(run, "test.accuracy", val - 0.05)
        else:
            client.set_tag(run, "error", "ConfigError: finetune.layers=99 is not allowed")
        client.set_terminated(run, status)
    frame = sweep.summarize(uri, parent)
    assert list(frame["finetune.layers"]) == [4, 0, 99]  # best val accuracy first, failures last
    assert list(frame["status"]) == ["FINISHED", "FINISHED", "FAILED"]
    assert sweep.swept_keys(frame) == ["finetune.layers"]
    table = sweep.to_markdown(frame)
    assert table.splitlines()[2].startswith("| 1 | 4 | FINISHED | 0.9000 | 0.8500")
    assert compare.main(["sweeps", "--tracking-uri", uri]) == 0  # the latest sweep by experiment
    assert table in capsys.readouterr().out
    assert compare.main(["no-such-experiment", "--tracking-uri", uri]) == 1
    plots = sweep.plot(frame, tmp_path)
    assert [p.name for p in plots] == ["sweep_finetune.layers.png"] and plots[0].stat().st_size > 1000


# --- real multiruns ------------------------------------------------------------------------


def run_sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, MlflowClient, dict]:
    require_shared()
    sweep_dir = tmp_path / "multirun"
    args = [
        sys.executable,
        "-m",
        "src.train",
        "-m",
        "experiment=ci",
        f"dataset.path={SHARED / 'data' / 'cats_vs_dogs'}",
        f"model.weights={SHARED / 'weights' / 'vgg16_imagenet_notop.weights.h5'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"hydra.sweep.dir={sweep_dir}",
        *path_overrides(tmp_path / "work"),
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=1200)
    parent = sweep.parent_of(sweep_dir)
    assert parent is not None, done.stderr[-3000:]
    return done, MlflowClient(parent["tracking_uri"]), parent


def job_logs(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in (tmp_path / "multirun").rglob("*.log"))


def children(client: MlflowClient, parent: dict):
    return client.search_runs(
        [parent["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}'"
    )


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    """One real 3-job sweep (the third job has an invalid value), shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    done, client, parent = run_sweep(tmp_path, "finetune.layers=0,2,99")
    return tmp_path, done, client, parent


@pytest.mark.slow
def test_multirun_logs_parent_children_reuses_features_and_survives_a_failing_job(basic_sweep):
    tmp_path, done, client, parent = basic_sweep
    assert done.returncode == 1, done.stderr[-3000:]  # one job failed: the sweep says so
    log_lines = [line for line in done.stdout.splitlines() if line.startswith("[")]  # Hydra logs to stdout
    assert "sweep done: 3 jobs, 1 failed" in log_lines[-1]
    runs = {json.loads(r.data.tags["sweep.overrides"])[-1]: r for r in children(client, parent)}
    assert {k: r.info.status for k, r in runs.items()} == {
        "finetune.layers=0": "FINISHED",
        "finetune.layers=2": "FINISHED",
        "finetune.layers=99": "FAILED",
    }
    assert "finetune.layers=99" in runs["finetune.layers=99"].data.tags["error"]
    ok = runs["finetune.layers=2"]
    assert ok.data.params["finetune.layers"] == "2" and "val.accuracy" in ok.data.metrics
    assert "test.accuracy" in ok.data.metrics and "finetune.loss" in ok.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent["run_id"])}
    assert {"summary.csv", "summary.md", "sweep_finetune.layers.png"} <= artifacts
    logs = job_logs(tmp_path)  # each job logs to its own file (and to stdout)
    assert logs.count("extract: building") == 1 and logs.count("extract: reusing") == 1
    assert client.get_run(parent["run_id"]).data.tags["failed_jobs"] == "1"
    assert client.get_run(parent["run_id"]).info.run_name == "sweep ci finetune.layers=0,2,99"


@contextlib.contextmanager
def mlflow_server(store_uri: str) -> Iterator[str]:
    """`mlflow server` over `store_uri` on a free loopback port while the block runs; yields its URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        tracking_server.wait_until_up(f"http://127.0.0.1:{port}", server, timeout=90)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_server_serves_the_sweep_over_rest(basic_sweep):
    """The MLflow tracking server, on a loopback port over the sweep's store, answers REST
    queries for the parent run, its children and their metrics."""
    _, _, _, parent = basic_sweep
    with mlflow_server(parent["tracking_uri"]) as base:

        def api(path: str, body: dict | None = None) -> dict:
            request = urllib.request.Request(
                f"{base}/api/2.0/mlflow/{path}",
                data=json.dumps(body).encode() if body is not None else None,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        got = api(f"runs/get?run_id={parent['run_id']}")["run"]
        assert {t["key"]: t["value"] for t in got["data"]["tags"]}["sweep"] == "parent"
        found = api(
            "runs/search",
            {
                "experiment_ids": [parent["experiment_id"]],
                "filter": f"tags.mlflow.parentRunId = '{parent['run_id']}'",
            },
        )["runs"]
        statuses = sorted(r["info"]["status"] for r in found)
        assert statuses == ["FAILED", "FINISHED", "FINISHED"]
        finished = [r for r in found if r["info"]["status"] == "FINISHED"]
        for run in finished:
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert 0.0 <= metrics["val.accuracy"] <= 1.0 and 0.0 <= metrics["test.accuracy"] <= 1.0
        history = api(f"metrics/get-history?run_id={finished[0]['info']['run_id']}&metric_key=head.val_loss")
        assert len(history["metrics"]) >= 1


@pytest.mark.slow
def test_parallel_jobs_with_the_joblib_launcher(tmp_path):
    done, client, parent = run_sweep(
        tmp_path, "finetune.layers=0,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = children(client, parent)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert all("test.accuracy" in r.data.metrics for r in runs)
    assert job_logs(tmp_path).count("extract: building") <= 1  # the lock lets one job build it


@pytest.mark.slow
def test_optuna_search_logs_its_trials_as_children(tmp_path):
    done, client, parent = run_sweep(tmp_path, "hparams_search=finetune_optuna", "hydra.sweeper.n_trials=4")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = children(client, parent)
    assert len(runs) == 4
    statuses = sorted(r.info.status for r in runs)  # the median pruner may stop the later trials
    assert statuses.count("FINISHED") >= 2 and set(statuses) <= {"FINISHED", "KILLED"}
    assert all(r.data.tags.get("optuna.state") == "PRUNED" for r in runs if r.info.status == "KILLED")
    keys = {o.split("=")[0] for r in runs for o in json.loads(r.data.tags["sweep.overrides"])}
    assert {"finetune.learning_rate", "head.dropout", "finetune.layers", "finetune.epochs"} <= keys
    name = client.get_run(parent["run_id"]).info.run_name  # the preset's search space
    assert name.startswith("sweep ci finetune.learning_rate=tag(log, interval(1e-6, 1e-4)) head.dropout=")
    assert name.endswith(" hparams_search=finetune_optuna")


# Flags for Chromium on a machine without network or screen (no background connections).
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.mark.slow
def test_the_mlflow_ui_compares_the_sweeps_child_runs_in_headless_chromium(basic_sweep, tmp_path):
    """The comparison page, rendered by a real browser from a real `mlflow server`, lists the
    finished child runs by name with the swept key and the test accuracy."""
    import shutil
    import urllib.parse

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    _, _, client, parent = basic_sweep
    finished = [r for r in children(client, parent) if r.info.status == "FINISHED"]
    assert len(finished) == 2
    with mlflow_server(parent["tracking_uri"]) as base:
        query = urllib.parse.urlencode(
            {
                "runs": json.dumps([r.info.run_id for r in finished]),
                "experiments": json.dumps([parent["experiment_id"]]),
            },
            quote_via=urllib.parse.quote,
        )
        rendered = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1600,2000",
             "--virtual-time-budget=30000", "--dump-dom", f"{base}/#/compare-runs?{query}"],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    page = rendered.stdout
    assert "Comparing 2 Runs" in page or "Comparing 2 runs" in page, page[-2000:]
    for run in finished:
        assert run.info.run_name in page  # each child run, by its job's overrides
    assert ">finetune.layers<" in page and ">test.accuracy<" in page  # the swept key and the metric


@pytest.mark.slow
def test_the_mlflow_ui_opens_the_experiment_on_its_runs(basic_sweep, tmp_path):
    """The experiment's page as the README links it, rendered by a real browser from a real
    `mlflow server`: the runs, the sweep's parent among them by its name, not the GenAI overview."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    _, _, client, parent = basic_sweep
    name = client.get_run(parent["run_id"]).info.run_name
    experiment = parent["experiment_id"]
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    with mlflow_server(parent["tracking_uri"]) as base:
        rendered = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1600,1200",
             "--virtual-time-budget=30000", "--dump-dom",
             f"{base}/#/experiments/{experiment}?workflowType=machine_learning"],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    page = rendered.stdout
    assert name in page, page[-2000:]
    assert f'href="#/experiments/{experiment}/runs/{parent["run_id"]}"' in page


def test_child_runs_are_named_by_their_swept_values_only(tmp_path):
    """Values the command line fixes are left out of child run names, however Hydra re-spells
    them in the job's overrides (spaces dropped, characters escaped)."""
    from src.config.compose import compose

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("names")
    command = ["experiment=ci", "dataset.limit_per_class={train: 150, val: 75}", "finetune.layers=4,8",
               f"tracking.uri={uri}"]  # fmt: skip
    parent = {"run_id": client.create_run(experiment_id).info.run_id, "experiment_id": experiment_id,
              "tracking_uri": uri, "overrides": command}  # fmt: skip
    job = ["experiment=ci", "dataset.limit_per_class={train:150,val:75}", "finetune.layers=8",
           f"tracking.uri={uri.replace(':', chr(92) + ':')}", "+optuna_trial_id=3"]  # fmt: skip
    run_id = sweep.start_child(compose(["experiment=ci"]), parent, job, 1)
    assert client.get_run(run_id).info.run_name == "job1: finetune.layers=8 +optuna_trial_id=3"


def multirun_config(*overrides: str):
    """The config Hydra hands a multirun's callbacks for `python -m src.train -m <overrides>`
    (composed from `conf/` in multirun mode: sweep overrides recorded, not applied)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from src.config.paths import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None
        return hydra.compose_config("config", list(overrides), run_mode=RunMode.MULTIRUN)


def test_a_sweeps_parent_run_is_named_by_what_it_sweeps(tmp_path):
    """The preset, the swept values (the command line's, then a preset's search space), then the
    fixed settings, as written; not where things live or how jobs are launched."""
    where = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.sweep.dir={tmp_path / 'multirun'}",
             f"dataset.path={tmp_path / 'images'}", *path_overrides(tmp_path / "work")]  # fmt: skip
    cases = {
        ("experiment=ci", "finetune.layers=4,8,12", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"):
            "sweep ci finetune.layers=4,8,12",
        ("experiment=ci", "head.dropout=0.3", "finetune.layers=range(0,6,2)"):
            "sweep ci finetune.layers=range(0,6,2) head.dropout=0.3",
        ("experiment=ci,gtsrb_finetune", "model=vgg16,resnet50"):
            "sweep experiment=ci,gtsrb_finetune model=vgg16,resnet50",
        ("experiment=ci", "hparams_search=finetune_optuna", "hydra.sweeper.n_trials=4",
         "finetune.layers=choice(2,4)"):
            "sweep ci finetune.layers=choice(2,4) finetune.learning_rate=tag(log, interval(1e-6, 1e-4)) "
            "head.dropout=interval(0.0, 0.6) finetune.epochs=choice(1, 2, 3) hparams_search=finetune_optuna",
    }  # fmt: skip
    for overrides, name in cases.items():
        assert sweep.sweep_name(multirun_config(*overrides, *where)) == name
    long = sweep.sweep_name(multirun_config("finetune.layers=" + ",".join(map(str, range(100)))))
    assert len(long) == 250 and long.startswith("sweep default finetune.layers=0,1,2,") and long.endswith("…")


def test_the_sweep_callback_opens_the_named_parent_run_in_an_experiment_of_model_training(tmp_path):
    config = multirun_config(
        "experiment=ci", "finetune.layers=4,8", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=sweeps", f"hydra.sweep.dir={tmp_path / 'multirun'}",
    )  # fmt: skip
    sweep.SweepCallback().on_multirun_start(config)
    parent = sweep.parent_of(tmp_path / "multirun")
    assert parent is not None
    client = MlflowClient(parent["tracking_uri"])
    run = client.get_run(parent["run_id"])
    assert run.info.run_name == "sweep ci finetune.layers=4,8" and run.data.tags["sweep"] == "parent"
    experiment = client.get_experiment(parent["experiment_id"])
    assert experiment.name == "sweeps"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_experiment_is_marked_as_model_training_for_the_mlflow_ui(tmp_path):
    """MLflow's experiment-kind tag: set on the experiment the project creates, added to one
    created without it (an older checkout, another tool), kept when someone chose another kind."""
    from src.config.compose import compose

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    created = store.use_store(compose(["experiment=ci", f"tracking.uri={uri}"]))
    assert client.get_experiment(created).name == "transfer-learning"
    assert client.get_experiment(created).tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("older")
    assert "mlflow.experimentKind" not in client.get_experiment(older).tags
    cfg = compose(["experiment=ci", f"tracking.uri={uri}", "tracking.experiment=older"])
    assert store.use_store(cfg) == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(older, "mlflow.experimentKind", "genai_development")
    store.use_store(cfg)
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "genai_development"
