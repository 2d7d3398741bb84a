"""Content digests of input files (dataset images, weight files), remembered per file.

A file's sha256 is stored in a small SQLite table keyed by its path, size, modification time
and inode: a file that has not changed is not read again, a file that changed in any of those
is hashed anew. Two folders with the same names and sizes but different pixels therefore get
different digests, at the cost of reading each new file once.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig

from src.config.paths import resolve_path
from src.outputs.folders import claim

CHUNK = 1 << 20


def store(cfg: DictConfig) -> Path:
    """Where the digests are remembered: beside the pipeline's cache of prepared data."""
    return claim(resolve_path(cfg.paths.cache)) / "file_hashes.sqlite"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _connect(db: Path) -> sqlite3.Connection:
    db.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(db, timeout=120)  # parallel sweep jobs wait for each other's writes
    con.execute(
        "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
        " inode INTEGER, sha256 TEXT)"
    )
    return con


def digests(paths: Iterable[Path], db: Path) -> list[str]:
    """The sha256 of each file's content, in order, reading only files not seen as they are now."""
    paths = [Path(p).resolve() for p in paths]
    con = _connect(db)
    try:
        known = {}
        for path in paths:
            row = con.execute(
                "SELECT size, mtime_ns, inode, sha256 FROM files WHERE path = ?", (str(path),)
            ).fetchone()
            if row:
                known[path] = row
        out, fresh = [], []
        for path in paths:
            st = path.stat()
            stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
            row = known.get(path)
            if row and tuple(row[:3]) == stamp:
                out.append(row[3])
                continue
            value = _sha256(path)
            out.append(value)
            fresh.append((str(path), *stamp, value))
        if fresh:
            with con:
                con.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", fresh)
        return out
    finally:
        con.close()


def file_digest(path: Path, db: Path) -> str:
    """The sha256 of one file's content (see `digests`)."""
    return digests([path], db)[0]
