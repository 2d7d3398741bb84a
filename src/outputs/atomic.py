"""The one way the pipeline writes a file: build it under a temp name beside its final path,
then rename it into place, so a reader never sees half a file and a crash leaves only a temp
entry that the next run's `folders.clean_stale` removes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_TAG = ".tmp-"  # temp entries are named `.<name>.tmp-<pid>-<random>` beside what they become


def temp_name(name: str) -> str:
    """The prefix of a temp entry for `name`, carrying this process's id for `folders.clean_stale`."""
    return f".{name}{TEMP_TAG}{os.getpid()}-"


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix) to write; renamed to `path` on success,
    removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_name(path.name), suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically: a temp file beside `path`, then rename."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    return path
