"""DVC's cache travels: `dvc repro` of the `ci` preset in a temporary copy, `dvc push` to an
S3-compatible remote (a moto server started here) and to the default local-directory remote,
a fresh `git clone` elsewhere that `dvc pull`s and then has no stage to run, and a queued
experiment that changes a head key only, taking prepare and extract from DVC's cache."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SHARED, VGG16_WEIGHTS, free_port, require_shared
from tests.test_dvc_pipeline import CI, copy_repo, ran_stages, run_queue, set_ci, sh

pytestmark = pytest.mark.slow

BUCKET = "dvc-store"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
EXPENSIVE = ("download", "prepare", "extract")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server (moto) on a free local port, with an empty bucket `BUCKET`."""
    pytest.importorskip("dvc_s3", reason="the S3 remote needs dvc-s3")
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server", reason="the S3 test server needs moto[server]")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
        )
        client.create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def origin(tmp_path_factory, s3_endpoint) -> dict:
    """The `ci` preset reproduced in a copy of the repository, committed, and pushed (outputs and
    run-cache) to the S3 remote and to the default local remote `../dvc-storage`."""
    require_shared()
    repo = copy_repo(tmp_path_factory.mktemp("origin"))
    sh(repo, "python", "-m", "src.params", *CI)
    start = time.perf_counter()
    assert len(ran_stages(sh(repo, "dvc", "repro"))) == 8  # seven stages, and recover (no lock entry yet)
    times = {"repro": time.perf_counter() - start}
    # under DVC the stages neither fill nor read src.train's content-addressed cache
    assert not {"prepare", "extract"} & {p.name for p in (repo / "data" / "cache").glob("*")}
    assert "cache: false" not in (repo / "dvc.lock").read_text()
    # the run-cache holds every stage but download, whose outputs persist, and recover (no outputs)
    assert len(list((repo / ".dvc" / "cache" / "runs").glob("*/*"))) == 6

    # the remote in the committed config, the keys in the untracked .dvc/config.local
    sh(repo, "dvc", "remote", "add", "s3", f"s3://{BUCKET}/store")
    sh(repo, "dvc", "remote", "modify", "s3", "endpointurl", s3_endpoint)
    sh(repo, "dvc", "remote", "modify", "--local", "s3", "access_key_id", KEYS["AWS_ACCESS_KEY_ID"])
    sh(repo, "dvc", "remote", "modify", "--local", "s3", "secret_access_key", KEYS["AWS_SECRET_ACCESS_KEY"])
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "ci preset reproduced")
    committed = sh(repo, "git", "show", "HEAD:.dvc/config")
    assert "endpointurl" in committed and "access_key_id" not in committed
    for remote in ("s3", "local"):
        start = time.perf_counter()
        sh(repo, "dvc", "push", "-r", remote, "--run-cache")
        times[f"push {remote}"] = time.perf_counter() - start
    assert any((repo.parent / "dvc-storage" / "files" / "md5").iterdir())
    return {"repo": repo, "times": times}


@pytest.mark.parametrize("remote", ["s3", "local"])
def test_a_fresh_clone_pulls_and_has_nothing_to_run(origin, remote, tmp_path):
    """`git clone` + `dvc pull` elsewhere, with `../shared` beside it: `dvc repro` runs no stage.
    The S3 keys come from the environment here; the local remote is the default `../dvc-storage`,
    which this clone sees through a link. The S3 clone sees `../shared` through a link too; the
    other has its own copy of the data at another real path, which params.yaml and dvc.lock
    name relatively, so nothing changes either."""
    if remote == "s3":
        (tmp_path / "shared").symlink_to(SHARED)
    else:  # a teammate's own copy of the data, beside their clone
        shutil.copytree(SHARED / "data" / "cats_vs_dogs", tmp_path / "shared" / "data" / "cats_vs_dogs")
        (tmp_path / "shared" / "weights").mkdir()
        shutil.copy2(VGG16_WEIGHTS, tmp_path / "shared" / "weights" / VGG16_WEIGHTS.name)
        lock = (origin["repo"] / "dvc.lock").read_text()
        assert "../shared/data/cats_vs_dogs" in lock and str(SHARED) not in lock
    (tmp_path / "dvc-storage").symlink_to(origin["repo"].parent / "dvc-storage")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(origin["repo"]), str(clone))
    env = KEYS if remote == "s3" else {}
    start = time.perf_counter()
    sh(clone, "dvc", "pull", "--run-cache", *(["-r", remote] if remote == "s3" else []), env=env)
    pulled = time.perf_counter() - start
    assert (clone / "models" / "final.keras").is_file() and (clone / "data" / "features").is_dir()
    assert (clone / "data" / "prepared" / ".pipeline-output").is_file()

    out = sh(clone, "dvc", "repro", env=env)
    assert "Running stage" not in out and ran_stages(out) == set(), out
    assert "test.accuracy" in sh(clone, "dvc", "metrics", "show")

    # an output lost from the workspace comes back from the pulled run-cache, not by rerunning
    shutil.rmtree(clone / "data" / "features")
    out = sh(clone, "dvc", "repro")
    assert "Stage 'extract' is cached" in out and ran_stages(out) == set(), out
    times = origin["times"]
    print(
        f"\n{remote} remote: recompute (dvc repro) {times['repro']:.1f} s, "
        f"push {times[f'push {remote}']:.1f} s, pull {pulled:.1f} s"
    )


def test_queued_head_experiment_reuses_prepare_and_extract_from_dvc(origin):
    """A queued experiment that only changes `head.epochs` runs train_head, finetune and evaluate;
    download, prepare and extract come from DVC's cache (checked out or from the run-cache)."""
    repo: Path = origin["repo"]
    name = "head-epochs-2"
    overrides = (*set_ci(), "-S", "head.epochs=2")
    queued = sh(repo, "dvc", "exp", "run", "--queue", "-n", name, *overrides)
    assert "Queued experiment" in queued, queued
    status = run_queue(repo)
    assert "Success" in status, status
    logs = sh(repo, "dvc", "queue", "logs", name)
    assert ran_stages(logs) == {"train_head", "finetune", "evaluate", "export"}, logs
    for stage in EXPENSIVE:
        assert re.search(rf"Stage '{stage}' (didn't change, skipping|is cached - skipping run)", logs), logs
