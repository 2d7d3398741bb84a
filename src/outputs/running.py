"""Marks of running stage processes: one small file each under `.pipeline/running/` of the
workspace, made when a stage starts and removed when it ends, so that a mark whose process is
gone tells of a stage that was killed (kill -9, out of memory, power cut).

A mark names the stage, its process and the MLflow runs it logs into (`note_run`), which is
what the next run needs to finish what the killed one left (`src.stages.stage.recover`). The
folder is a dependency of the DVC stage `recover`, so `dvc repro` runs that stage exactly when
a mark was left behind, even when every other stage is restored from DVC's run-cache. Marks
hold no configuration and no secret."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from src.config.paths import REPO_ROOT
from src.outputs.atomic import write_json
from src.outputs.folders import process_start

RUNNING_DIR = REPO_ROOT / ".pipeline" / "running"  # in the workspace DVC runs the stage in
_mark: list[Path] = []  # this process's mark while a stage runs


@contextmanager
def marked(stage: str, folder: Path = RUNNING_DIR) -> Iterator[Path]:
    """Mark `stage` as running in this process until the block ends (however it ends, short of
    the process being killed)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stage}-{os.getpid()}.json"
    write_json(path, {"stage": stage, "pid": os.getpid(), "started": time.time(), "runs": []})
    _mark.append(path)
    try:
        yield path
    finally:
        _mark.remove(path)
        path.unlink(missing_ok=True)


def note_run(run_id: str) -> None:
    """Record in this process's mark (if a stage runs) that it logs into MLflow run `run_id`."""
    if not _mark:
        return
    path = _mark[-1]
    entry = json.loads(path.read_text())
    if run_id not in entry["runs"]:
        entry["runs"].append(run_id)
        write_json(path, entry)


def left_behind(folder: Path = RUNNING_DIR) -> list[tuple[Path, dict]]:
    """The marks whose process no longer runs (or whose process id now belongs to a process
    started after the mark was made), with what each says. Unreadable marks count as left."""
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
            pid, made = int(entry["pid"]), float(entry["started"])
        except (OSError, ValueError, KeyError, TypeError):
            found.append((path, {"stage": path.stem, "runs": []}))
            continue
        started = process_start(pid)
        if started is None or started > made + 1:
            found.append((path, entry))
    return found
