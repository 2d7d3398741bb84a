"""Shared fixtures: the real config composed from conf/, shrunk to tiny real inputs.

The datasets and ImageNet weights come from the `shared/` folder beside the repository
(override with TL_SHARED_DIR)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import DictConfig

from src.config.checks import validate
from src.config.compose import compose
from src.config.paths import REPO_ROOT

SHARED = Path(os.environ.get("TL_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()
CATS_DOGS = SHARED / "data" / "cats_vs_dogs"
GTSRB = SHARED / "data" / "gtsrb_40"
VGG16_WEIGHTS = SHARED / "weights" / "vgg16_imagenet_notop.weights.h5"


# Built from the shared script, not kept in ../shared (CI builds it before the tests).
XCEPTION_WEIGHTS = Path(
    os.environ.get(
        "TL_XCEPTION_WEIGHTS", REPO_ROOT / "data" / "weights" / "xception_imagenet_notop.weights.h5"
    )
)


def require_shared() -> None:
    if not CATS_DOGS.is_dir() or not VGG16_WEIGHTS.is_file():
        pytest.skip(f"shared datasets and weights not found under {SHARED} (set TL_SHARED_DIR)")


def require_xception_weights() -> Path:
    """The ImageNet Xception weights file, built with the shared script the first time (about a
    minute; it needs the package index), or a skip saying how to build it."""
    script = SHARED / "weights" / "xception_imagenet_notop.sh"
    if not XCEPTION_WEIGHTS.is_file() and script.is_file():
        XCEPTION_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHON": sys.executable}
        subprocess.run([str(script), str(XCEPTION_WEIGHTS)], env=env, capture_output=True, timeout=900)
    if not XCEPTION_WEIGHTS.is_file():
        pytest.skip(
            f"no Xception weights at {XCEPTION_WEIGHTS}: build them with "
            f"{SHARED}/weights/xception_imagenet_notop.sh {XCEPTION_WEIGHTS} (or set TL_XCEPTION_WEIGHTS)"
        )
    return XCEPTION_WEIGHTS


PATH_KEYS = ("raw", "downloads", "prepared", "features", "models", "reports", "cache")


def path_overrides(work: Path) -> list[str]:
    """Overrides putting every `paths.*` folder under `work`."""
    return [f"paths.{key}={work / key}" for key in PATH_KEYS]


def scratch_overrides(tmp_path: Path, size: int) -> list[str]:
    """Overrides for the small CNN trained from scratch (no weights, features or fine-tuning) at
    `size` px, with every output and a private MLflow store (no registered model) under tmp_path."""
    return [
        "model=small_cnn",
        "model.weights=null",
        "finetune=none",
        f"dataset.image_size={size}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.registered_model=null",
        *path_overrides(tmp_path / "work"),
    ]


def small_images(root: Path, dataset: str = "folder") -> list[str]:
    """Overrides reading `root` as `dataset` at 32 px, for the stages before any model: VGG16, as
    the folder default Xception needs 71 px."""
    return [f"dataset={dataset}", f"dataset.path={root}", "dataset.image_size=32", "model=vgg16"]


def make_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    """The `ci` preset with every output under tmp_path and a private MLflow store."""
    outputs = path_overrides(tmp_path / "work")
    cfg = compose(
        [
            "experiment=ci",
            f"dataset.path={CATS_DOGS}",
            f"model.weights={VGG16_WEIGHTS}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *outputs,
            *overrides,
        ]
    )
    return validate(cfg)


@pytest.fixture
def shared() -> Path:
    require_shared()
    return SHARED


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_postgres() -> Iterator[str]:
    """A real PostgreSQL (`src.tracking.server`: password logins only) on a free loopback port for
    the block, with PGPASSFILE pointing at its passwords; yields its URI (no password in it).
    Skips the test when the server binaries or the driver are missing."""
    from src.tracking import server

    if server.postgres_bindir() is None:
        pytest.skip("PostgreSQL's server binaries are not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="psycopg is missing: pip install -e '.[server]'")
    data = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp")) / "data"
    data.parent.chmod(0o755)  # reachable by the postgres user when the tests run as root
    before = os.environ.get("PGPASSFILE")
    try:
        uri = server.start_postgres(data, free_port())
        # its clients (this process, the mlflow server, sweep workers) read the passwords from here
        os.environ["PGPASSFILE"] = str(server.password_file(data))
        yield uri
    finally:
        if before is None:
            os.environ.pop("PGPASSFILE", None)
        else:
            os.environ["PGPASSFILE"] = before
        server.stop_postgres(data)
        shutil.rmtree(data.parent, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def remove_temporary_folders_of_a_passing_module(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Once a test module's tests have all passed, remove the temporary folders it made (its
    shared pipelines, models, exports and DVC caches): kept to the end, the whole suite would hold
    several gigabytes. A module with a failure keeps its folders for inspection."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for folder in set(base.iterdir()) - before:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def float32_after_each_test():
    """Stages set Keras' global precision policy (mixed_bfloat16 where the CPU has it): put it
    back after each test, so that no test sees the policy an earlier one left."""
    yield
    import sys

    if "keras" in sys.modules:
        sys.modules["keras"].mixed_precision.set_global_policy("float32")
