"""`tracking=server` for real: PostgreSQL and `mlflow server` (proxied artifacts) started on
loopback ports by `src.tracking.server`, the `ci` preset run against it, and the run, its metrics,
artifacts and registered model read back over MLflow's REST API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from src.config.checks import validate
from src.config.compose import compose
from src.config.paths import REPO_ROOT
from src.tracking import server as tracking_server
from src.train import train
from tests.conftest import CATS_DOGS, VGG16_WEIGHTS, free_port, local_postgres, path_overrides, require_shared


def rest(url: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}/{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    artifacts = tmp / "artifacts"
    with (
        local_postgres() as backend,
        tracking_server.running_server(backend, str(artifacts), free_port(), tmp / "server.log") as url,
    ):
        yield url, backend, artifacts, tmp


@pytest.mark.slow
def test_a_pipeline_run_lands_in_postgres_and_reads_back_over_rest(server):
    import mlflow
    import pandas as pd
    import psycopg

    require_shared()
    url, backend, artifacts, tmp = server
    cfg = validate(
        compose(
            [
                "experiment=ci",
                "tracking=server",
                f"tracking.uri={url}",
                f"dataset.path={CATS_DOGS}",
                f"model.weights={VGG16_WEIGHTS}",
                *path_overrides(tmp / "work"),
            ]
        )
    )
    results = train(cfg)
    logged = results["evaluate"]["mlflow"]
    run_id = logged["run_id"]

    run = rest(url, "api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["test.accuracy"] == pytest.approx(results["evaluate"]["test"]["accuracy"])
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["preset"] == "ci" and params["finetune.layers"] == "4"
    history = rest(url, "api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="head.val_loss")
    assert [m["step"] for m in history["metrics"]] == [1]

    listed = rest(url, "api/2.0/mlflow/artifacts/list", run_id=run_id)
    assert {"metrics.json", "figures", "config.yaml"} <= {f["path"] for f in listed["files"]}
    with urllib.request.urlopen(f"{url}/get-artifact?path=metrics.json&run_uuid={run_id}") as response:
        assert json.loads(response.read())["test"]["accuracy"] == pytest.approx(metrics["test.accuracy"])
    assert list(artifacts.rglob("metrics.json")), "the server stores artifacts under --artifacts-destination"

    name = cfg.tracking.registered_model
    alias = rest(url, "api/2.0/mlflow/registered-models/alias", name=name, alias="champion")
    version = alias["model_version"]
    assert version["run_id"] == run_id and logged["alias"] == "champion"
    mlflow.set_tracking_uri(url)  # the registered classifier comes back through the server's proxy
    (tmp / "loaded").mkdir()  # MLflow downloads it here (by default to a /tmp folder it keeps)
    classifier = mlflow.pyfunc.load_model(f"models:/{name}@champion", dst_path=str(tmp / "loaded"))
    cat = sorted((CATS_DOGS / "validation" / "cats").iterdir())[0]
    assert classifier.predict(pd.DataFrame({"path": [str(cat)]}))["class"].tolist()[0] in {"cats", "dogs"}

    with psycopg.connect(backend) as connection, connection.cursor() as cursor:  # really in PostgreSQL
        cursor.execute("select status from runs where run_uuid = %s", (run_id,))
        assert cursor.fetchone() == ("FINISHED",)
        cursor.execute("select count(*) from model_versions where name = %s", (name,))
        assert cursor.fetchone() == (1,)


def test_without_postgres_binaries_the_error_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setattr(tracking_server, "postgres_bindir", lambda: None)
    with pytest.raises(tracking_server.ServerError, match="apt-get install postgresql"):
        tracking_server.start_postgres(tmp_path / "pg", free_port())


@pytest.mark.slow
def test_its_own_postgres_asks_for_passwords_and_the_mlflow_role_runs_no_programs():
    import psycopg

    with local_postgres() as uri:
        passwords = Path(os.environ["PGPASSFILE"])
        assert passwords.stat().st_mode & 0o777 == 0o600 and "127.0.0.1" in passwords.read_text()
        assert ":" not in uri.split("//", 1)[1].split("@")[0]  # no password in the URI
        with psycopg.connect(uri) as conn:  # with the password file: in
            role = conn.execute("select rolsuper, rolcreaterole from pg_roles where rolname = current_user")
            assert role.fetchone() == (False, False)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("COPY (SELECT 1) TO PROGRAM 'true'")
        env = {k: v for k, v in os.environ.items() if k not in ("PGPASSFILE", "PGPASSWORD")}
        for user in ("mlflow", "pgadmin", "postgres"):  # without a password: out, whoever asks
            host, port = uri.split("@", 1)[1].split("/")[0].split(":")
            check = "import psycopg, sys; psycopg.connect(sys.argv[1])"
            conninfo = f"host={host} port={port} dbname=postgres user={user} passfile=/nonexistent"
            done = subprocess.run(
                [sys.executable, "-c", check, conninfo], env=env, capture_output=True, text=True
            )
            assert done.returncode != 0 and "password" in done.stderr.lower(), done.stderr[-500:]


@pytest.mark.slow
def test_sigterm_stops_the_server_and_its_postgres(tmp_path):
    if tracking_server.postgres_bindir() is None:
        pytest.skip("PostgreSQL's server binaries are not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg")
    top = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))  # not under pytest's private tmp folders:
    top.chmod(0o755)  # reachable by the postgres user when the tests run as root
    pg = top / "pg"
    port = free_port()
    command = [sys.executable, "-m", "src.tracking.server", "--postgres-dir", str(pg),
               "--postgres-port", str(free_port()), "--port", str(port), "--workers", "1",
               "--artifacts-destination", str(tmp_path / "artifacts")]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        tracking_server.wait_until_up(f"http://127.0.0.1:{port}", process, timeout=120)
        assert (pg / "postmaster.pid").is_file()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert not (pg / "postmaster.pid").exists()  # PostgreSQL stopped with it
    finally:
        if process.poll() is None:
            process.kill()
        tracking_server.stop_postgres(pg)
        shutil.rmtree(top, ignore_errors=True)
