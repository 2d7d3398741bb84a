"""A team's MLflow tracking server: runs and the model registry in PostgreSQL, artifacts proxied
by the server (`--artifacts-destination`: a local folder by default, `s3://bucket/prefix` for an
S3-compatible store), so clients need neither database credentials nor storage access.

    # against an existing PostgreSQL database
    PGPASSWORD=... python -m src.tracking.server --backend-store-uri postgresql://mlflow@db:5432/mlflow \\
        --artifacts-destination s3://team-bucket/mlflow --host 0.0.0.0 --port 5000
    # or start a PostgreSQL of its own in a folder (its binaries must be installed; see README)
    python -m src.tracking.server --postgres-dir /srv/mlflow/pg --artifacts-destination /srv/mlflow/artifacts

Clients then run `python -m src.train tracking=server tracking.uri=http://HOST:5000` (or
`dvc repro` with that in params.yaml). The PostgreSQL started here listens on loopback only and
asks every login for a password (scram-sha-256): its superuser `pgadmin` and the role `mlflow`,
which owns the MLflow database and is no superuser (it cannot run programs on the server), get
generated passwords, kept in `<postgres-dir>.pgpass` (PostgreSQL's password-file format, mode
0600) and handed to clients through PGPASSFILE, never on a command line or in a URI. SIGTERM
stops the MLflow server and then PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from src.config.checks import CREDENTIAL_HOMES, refuse_credentials
from src.errors import ConfigError

DB_USER = DB_NAME = "mlflow"
ADMIN_USER = "pgadmin"  # the cluster's superuser: used to create the MLflow role and database only
SERVICE_USER = "postgres"  # PostgreSQL will not run as root: as root, it runs as this user


class ServerError(RuntimeError):
    """PostgreSQL or the MLflow server could not be started."""


def postgres_bindir() -> Path | None:
    """The folder with `initdb`, `pg_ctl` and `postgres`: from PATH, else the newest Debian/Ubuntu
    install under /usr/lib/postgresql; None when PostgreSQL's server binaries are not installed."""
    if found := shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def _as_service_user() -> list[str]:
    """The command prefix that runs PostgreSQL's tools as a user it accepts."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError as err:
        raise ServerError(f"running as root, and no user '{SERVICE_USER}' to run PostgreSQL as") from err
    return ["runuser", "-u", SERVICE_USER, "--"]


def _run(command: list[str], what: str, env: dict[str, str] | None = None, stdin: str | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=env, input=stdin)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-2000:]
        raise ServerError(f"{what} failed ({done.returncode}): {said}")


def password_file(data_dir: Path) -> Path:
    """Where the passwords of a cluster started by `start_postgres` are kept: beside its folder,
    `<data_dir>.pgpass`, readable by its owner only."""
    data_dir = data_dir.resolve()
    return data_dir.with_name(f"{data_dir.name}.pgpass")


def client_env(data_dir: Path) -> dict[str, str]:
    """The environment a client of the cluster in `data_dir` needs: PGPASSFILE set."""
    return {**os.environ, "PGPASSFILE": str(password_file(data_dir))}


def _write_private(path: Path, text: str) -> None:
    """`text` into `path`, created readable and writable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _initdb(bindir: Path, data_dir: Path, prefix: list[str], admin_password: str) -> None:
    """A cluster whose every login needs a password; its superuser's password from a temp file
    the service user alone reads, removed at once."""
    fd, name = tempfile.mkstemp(prefix="pwfile-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(admin_password + "\n")
        if prefix:  # initdb runs as the service user: the file must be its own
            entry = pwd.getpwnam(SERVICE_USER)
            os.chown(name, entry.pw_uid, entry.pw_gid)
        _run([*prefix, str(bindir / "initdb"), "-D", str(data_dir), "-U", ADMIN_USER, "--auth=scram-sha-256",
              f"--pwfile={name}", "--encoding=UTF8", "--no-instructions"], "initdb")  # fmt: skip
    finally:
        os.unlink(name)


def start_postgres(data_dir: Path, port: int, bindir: Path | None = None) -> str:
    """Create (first time) and start a PostgreSQL cluster in `data_dir` listening on 127.0.0.1:`port`,
    with password logins only, a superuser `pgadmin`, and a database owned by the role `mlflow`
    (no superuser); return the SQLAlchemy URI, without password: clients read it from
    `password_file(data_dir)` through PGPASSFILE (`client_env`)."""
    bindir = bindir or postgres_bindir()
    if bindir is None:
        raise ServerError(
            "PostgreSQL's server binaries (initdb, pg_ctl) were not found: install them "
            "(Debian/Ubuntu: apt-get install postgresql) or pass --backend-store-uri of a running one"
        )
    prefix = _as_service_user()
    data_dir = data_dir.resolve()
    passwords = password_file(data_dir)
    fresh = not (data_dir / "PG_VERSION").is_file()
    if not fresh and not passwords.is_file():
        raise ServerError(
            f"{data_dir} holds a cluster without its password file {passwords} (made by an older "
            "version, with trust logins): dump its database, remove the folder and start afresh"
        )
    if fresh:
        data_dir.mkdir(parents=True, exist_ok=True)
        if prefix:  # the service user owns the cluster
            entry = pwd.getpwnam(SERVICE_USER)
            os.chown(data_dir, entry.pw_uid, entry.pw_gid)
        admin, mlflow = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        _write_private(passwords, f"127.0.0.1:*:*:{ADMIN_USER}:{admin}\n127.0.0.1:*:*:{DB_USER}:{mlflow}\n")
        _initdb(bindir, data_dir, prefix, admin)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={data_dir}"
    _run([*prefix, str(bindir / "pg_ctl"), "-D", str(data_dir), "-o", options,
          "-l", str(data_dir / "server.log"), "-w", "-t", "60", "start"], "pg_ctl start")  # fmt: skip
    if fresh:
        mlflow = passwords.read_text().splitlines()[1].rsplit(":", 1)[1]
        psql = bindir / "psql" if (bindir / "psql").is_file() else Path(shutil.which("psql") or "psql")
        sql = (  # read from stdin: no password on a command line
            f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{mlflow}' NOSUPERUSER NOCREATEDB NOCREATEROLE;\n"
            f"CREATE DATABASE {DB_NAME} OWNER {DB_USER};\n"
            f"REVOKE ALL ON DATABASE {DB_NAME} FROM PUBLIC;\n"
        )
        _run([str(psql), "-h", "127.0.0.1", "-p", str(port), "-U", ADMIN_USER, "-d", "postgres", "-w",
              "-v", "ON_ERROR_STOP=1", "-q", "-f", "-"], "creating the mlflow role and database",
             env=client_env(data_dir), stdin=sql)  # fmt: skip
    return f"postgresql://{DB_USER}@127.0.0.1:{port}/{DB_NAME}"


def stop_postgres(data_dir: Path, bindir: Path | None = None) -> None:
    """Stop the cluster in `data_dir` (fast shutdown)."""
    bindir = bindir or postgres_bindir()
    if bindir is not None and (data_dir / "postmaster.pid").is_file():
        _run([*_as_service_user(), str(bindir / "pg_ctl"), "-D", str(data_dir.resolve()), "-m", "fast", "-w",
              "stop"], "pg_ctl stop")  # fmt: skip


def server_command(backend_store_uri: str, artifacts_destination: str, host: str, port: int,
                   workers: int = 1) -> list[str]:  # fmt: skip
    """`mlflow server` with the backend store and proxied artifact storage."""
    if "://" not in artifacts_destination:  # a local folder
        artifacts_destination = Path(artifacts_destination).resolve().as_uri()
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifacts_destination,
        "--serve-artifacts",
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def wait_until_up(url: str, process: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    """Wait until `url`/health answers, or fail (early, if `process` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"mlflow server exited with status {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(1)
    raise ServerError(f"no answer from {url}/health within {timeout:.0f} s")


@contextlib.contextmanager
def running_server(backend_store_uri: str, artifacts_destination: str, port: int, log_file: Path,
                   host: str = "127.0.0.1") -> Iterator[str]:  # fmt: skip
    """An MLflow server for the duration of the block; yields its URL."""
    url = f"http://{host}:{port}"
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            server_command(backend_store_uri, artifacts_destination, host, port), stdout=log, stderr=log
        )
        try:
            wait_until_up(url, process)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--backend-store-uri", help="postgresql://user@host:port/database (password: PGPASSWORD)"
    )
    where.add_argument("--postgres-dir", type=Path, help="start a local PostgreSQL with its data here")
    parser.add_argument("--postgres-port", type=int, default=5432)
    parser.add_argument("--artifacts-destination", default="mlartifacts",
                        help="a folder or s3://bucket/prefix (default: ./mlartifacts)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    backend = args.backend_store_uri
    shown = "the server's command line, which every local user can read (ps)"
    try:
        refuse_credentials("--backend-store-uri", backend, shown)
        refuse_credentials("--artifacts-destination", args.artifacts_destination, shown)
        endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        logs = "the server's logs and its clients' error messages"
        refuse_credentials("MLFLOW_S3_ENDPOINT_URL", endpoint, logs, CREDENTIAL_HOMES["s3"])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    process = None
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # so that the cleanup below runs
    try:
        if args.postgres_dir is not None:
            backend = start_postgres(args.postgres_dir, args.postgres_port)
            env = client_env(args.postgres_dir)
            print(f"PostgreSQL in {args.postgres_dir} at {backend}", flush=True)
        command = server_command(backend, args.artifacts_destination, args.host, args.port, args.workers)
        print(f"MLflow server on http://{args.host}:{args.port}", flush=True)
        process = subprocess.Popen(command, env=env)
        return process.wait()
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        if args.postgres_dir is not None:
            with contextlib.suppress(ServerError):
                stop_postgres(args.postgres_dir)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
