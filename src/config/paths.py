"""Where things are: the repository, `conf/`, `params.yaml`, and configured paths."""

from __future__ import annotations

import itertools
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


# Where DVC runs queued (`dvc exp run --queue`) and temporary (`--temp`) experiments: in copies
# of the workspace one folder below each of these, so `../x` from a copy means `<parent>/x`.
EXPERIMENT_COPY_PARENTS = (Path(".dvc/tmp/exps"), Path(".dvc/tmp/exps/standalone"))
# Names DVC itself uses in those folders (and the copies' own `tmp...` names).
DVC_OWN_NAMES = frozenset({"cache", "celery", "run", "standalone"})


def portable_input(path: Path, root: Path = REPO_ROOT) -> bool:
    """Whether a relative input (`dataset.path`, `model.weights`) found from `root` can be
    recorded as written, so that params.yaml and dvc.lock read the same in every clone that
    keeps its data at the same place; the caller records it absolute otherwise.

    - Inside the repository: when git or DVC tracks it (then DVC's experiment copies hold it).
    - One level beside it (`../shared/...`): DVC's experiment copies live deeper, so a link
      named like its first folder is kept beside them (`.dvc/tmp/exps/shared -> ../shared`,
      real path), through which the same relative path leads to the same data. Refused when
      the name is one DVC uses there or something else already holds it.
    - Deeper (`../../data`): no; absolute."""
    ups = len(list(itertools.takewhile(lambda part: part == "..", path.parts)))
    rest = path.parts[ups:]
    if not rest or ".." in rest:
        return False  # `..` alone or `a/../b`: not a plain location
    if ups == 0:
        return tracked(path, root)
    if ups > 1:
        return False
    if not (root / ".dvc").is_dir():
        return True  # no DVC here, so no experiment copies to reach from
    name = rest[0]
    if name in DVC_OWN_NAMES or name.startswith("tmp"):
        return False
    target = (root.parent / name).resolve()
    if root != project_root(root):
        return True  # inside an experiment copy: the links are the original repository's
    return all(_link(root / parent / name, target) for parent in EXPERIMENT_COPY_PARENTS)


def tracked(path: Path, root: Path = REPO_ROOT) -> bool:
    """Whether git tracks `path` (a file, or files under a folder) or a `<path>.dvc` file does."""
    import subprocess

    if (root / f"{path}.dvc").is_file():
        return True
    out = subprocess.run(
        ["git", "ls-files", "--", str(path)], cwd=root, capture_output=True, text=True, check=False
    )
    return out.returncode == 0 and bool(out.stdout.strip())


def _link(link: Path, target: Path) -> bool:
    """`link` -> `target` (kept if already so); False when something else is there."""
    if link.is_symlink() or link.exists():
        return link.is_symlink() and link.resolve() == target
    link.parent.mkdir(parents=True, exist_ok=True)
    spare = link.with_name(f".{link.name}.{os.getpid()}")
    spare.unlink(missing_ok=True)
    spare.symlink_to(target, target_is_directory=True)
    os.replace(spare, link)  # two compositions at once both end with the same link
    return True
