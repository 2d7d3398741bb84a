"""Content digests of input files (dataset images, weight files), remembered per file.

A file's sha256 is stored in a small SQLite table keyed by its path, size, modification time,
status-change time (ctime) and inode: a file that has not changed is not read again, a file
that changed in any of those is hashed anew. A file rewritten in place with its mtime set back
(same size) still gets a new ctime, so it is read again. Two folders with the same names and
sizes but different pixels therefore get different digests, at the cost of reading each new
file once.

Paths are stored as their bytes (`os.fsencode`), so a file name that is not valid UTF-8 (a
name Python holds with surrogate escapes) is remembered like any other. The table is
`file_digests`; the `files` table of older versions (no ctime, text paths) is left untouched
for checkouts that still use it.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig

from src.config.paths import resolve_path
from src.outputs.folders import claim

CHUNK = 1 << 20
TABLE = "file_digests"  # path (bytes), size, mtime_ns, ctime_ns, inode -> sha256


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
        f"CREATE TABLE IF NOT EXISTS {TABLE} (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
        " ctime_ns INTEGER, inode INTEGER, sha256 TEXT)"
    )
    return con


def digests(paths: Iterable[Path], db: Path) -> list[str]:
    """The sha256 of each file's content, in order, reading only files not seen as they are now."""
    paths = [Path(p).resolve() for p in paths]
    con = _connect(db)
    try:
        known = {}
        for path in paths:
            key = os.fsencode(path)
            row = con.execute(
                f"SELECT size, mtime_ns, ctime_ns, inode, sha256 FROM {TABLE} WHERE path = ?", (key,)
            ).fetchone()
            if row:
                known[key] = row
        out, fresh = [], []
        for path in paths:
            key = os.fsencode(path)
            st = path.stat()
            stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            row = known.get(key)
            if row and tuple(row[:4]) == stamp:
                out.append(row[4])
                continue
            value = _sha256(path)
            out.append(value)
            fresh.append((key, *stamp, value))
        if fresh:
            with con:
                con.executemany(f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?)", fresh)
        return out
    finally:
        con.close()


def file_digest(path: Path, db: Path) -> str:
    """The sha256 of one file's content (see `digests`)."""
    return digests([path], db)[0]
