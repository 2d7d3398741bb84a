"""List and walk folders of files: names starting with `.` skipped, symlinks followed, symlink
loops and broken links reported and left out, unreadable folders reported as empty."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def _real(path: str | Path) -> str:
    return os.path.realpath(path)


def list_folder(folder: Path, above: Collection[str] = ()) -> tuple[list[Path], list[Path]]:
    """The files and the subfolders of `folder`, in name order, symlinks followed, names starting
    with `.` left out.

    `above` holds the real paths of the folders `folder` lies in; a subfolder resolving to one of
    them or to `folder` itself is a symlink loop: reported and left out, as are broken links. An
    unreadable folder is reported and has nothing in it."""
    inside = {*above, _real(folder)}
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as err:
        log.warning("cannot read folder %s (%s): skipped", folder, err)
        return [], []
    files, folders = [], []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_dir():
            if (real := _real(path)) in inside:
                log.warning(
                    "%s links back to %s, a folder it lies in (symlink loop): not followed", path, real
                )
            else:
                folders.append(path)
        elif entry.is_file():
            files.append(path)
        elif entry.is_symlink():
            log.warning("%s is a broken link (to %s): skipped", path, os.readlink(path))
    return files, folders


def walk_files(top: Path, above: Collection[str] = ()) -> Iterator[Path]:
    """Every file below `top` as a path under `top`, depth first in name order: symlinked folders
    and files followed, names starting with `.` skipped at every depth, symlink loops reported
    and not entered (`list_folder`; `above`: real paths of the folders `top` lies in)."""
    stack = [(Path(top), frozenset(above))]
    while stack:
        folder, ancestors = stack.pop()
        files, folders = list_folder(folder, ancestors)
        yield from files
        inside = ancestors | {_real(folder)}
        stack += [(sub, inside) for sub in reversed(folders)]
