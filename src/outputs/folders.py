"""Output folders the pipeline owns: a marker in each, built aside and moved into place, temp
entries of killed runs removed."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from src.errors import StageError
from src.outputs.atomic import TEMP_TAG, temp_name

log = logging.getLogger(__name__)


MARKER = ".pipeline-output"  # in every folder the pipeline builds: only those it may replace


def staging_dir(final: Path) -> Path:
    """A fresh temp folder beside `final` to build an output in before `replace_dir`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent)
    built = Path(tempfile.mkdtemp(dir=final.parent, prefix=temp_name(final.name)))
    built.chmod(0o755)  # mkdtemp makes it private; outputs are ordinary folders
    (built / MARKER).write_text("built by the transfer-learning pipeline; replaced on the next run\n")
    return built


@contextmanager
def scratch_dir(parent: Path, name: str = "scratch") -> Iterator[Path]:
    """A temp folder under `parent` (checkpoints, cached activations), removed on exit; one
    left by a killed process is removed by the next `clean_stale` of `parent`."""
    import shutil

    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=temp_name(name)))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None if it is not running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, someone else's
    try:  # Linux: field 22 of /proc/<pid>/stat is the start time in clock ticks after boot
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0  # alive, start unknown: treat as older than anything


def clean_stale(parent: Path) -> list[Path]:
    """Remove temp entries under `parent` left by processes that no longer run (killed, or
    whose id now belongs to a process started after the entry was made). A live process's
    entries are never touched. Returns what was removed."""
    import shutil

    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if not entry.name.startswith(".") or TEMP_TAG not in entry.name:
            continue
        owner = entry.name.rsplit(TEMP_TAG, 1)[1].split("-", 1)[0]
        if not owner.isdigit():
            continue  # not named by `temp_name`
        started = process_start(int(owner))
        try:
            made = entry.lstat().st_mtime
        except FileNotFoundError:
            continue
        if started is not None and started <= made + 1:
            continue  # its owner is alive and older than it: in use
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        log.info("removed %s, left by a process that no longer runs", entry)
        removed.append(entry)
    return removed


def made_here(folder: Path) -> bool:
    """Whether the pipeline built `folder`: its marker, or (folders from before the marker)
    the `info.json` with a `cache_key` that prepare and extract write."""
    if (folder / MARKER).is_file():
        return True
    try:
        return "cache_key" in json.loads((folder / "info.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def replace_dir(built: Path, final: Path) -> Path:
    """Move a fully built folder into place, replacing the old one only now. A non-empty folder
    that the pipeline did not build (no marker file) is never replaced: that is an error."""
    import shutil

    if final.exists():
        if not final.is_dir() or (any(final.iterdir()) and not made_here(final)):
            shutil.rmtree(built, ignore_errors=True)
            raise StageError(
                f"{final} exists and was not made by this pipeline (no {MARKER} file in it): "
                "it is left as it is. Move it away or point the output at another folder (paths.*)"
            )
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=temp_name(final.name)))
        os.replace(final, old / "x")
        os.replace(built, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, final)
    return final


def claim(folder: Path) -> Path:
    """Make `folder` with the pipeline's marker when it does not exist yet, so that later checks
    (`src.config.checks`) know the pipeline owns it; an existing folder is left as it is."""
    if not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text("made by the transfer-learning pipeline for its outputs\n")
    return folder
