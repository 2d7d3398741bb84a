"""Where things are: the repository, `conf/`, `params.yaml`, and configured paths."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


CONF_DIR = REPO_ROOT / "conf"


PARAMS_FILE = REPO_ROOT / "params.yaml"


def resolve_path(path: str | Path) -> Path:
    """A configured path: absolute as given, relative ones from the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def project_root(root: Path = REPO_ROOT) -> Path:
    """The repository root; for DVC's queued and temporary experiments, which run in copies of
    the workspace, the original repository, which DVC names in $DVC_ROOT."""
    dvc_root = os.environ.get("DVC_ROOT")
    return Path(dvc_root) if dvc_root and Path(dvc_root).is_dir() else root


def resolve_input(path: str | Path) -> Path:
    """A configured input (dataset folder, weights file): like `resolve_path`, except that in a
    DVC queue copy a relative path found only beside the original repository resolves there."""
    resolved = resolve_path(path)
    if not resolved.exists() and not Path(path).expanduser().is_absolute():
        original = project_root() / Path(path).expanduser()
        if original.exists():
            return original
    return resolved
