"""Decode a split's image files, several at a time, into one memory-mapped uint8 `.npy` array,
noting per row the file's digest or why it could not be read; then rewrite the array with only
the rows kept (`compact_rows`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.data.scan import Item
from src.images.decode import decode_file
from src.outputs.atomic import atomic_file

COMPACT_ROWS = 256


@dataclass
class Decoded:
    """One split decoded into its array: per row, the file digest or why it could not be read."""

    digests: list[str | None]
    reasons: list[str | None]

    @property
    def ok(self) -> np.ndarray:
        return np.array([d is not None for d in self.digests], dtype=bool)


def decode_split(items: list[Item], size: int, path: Path, max_pixels: int, workers: int) -> Decoded:
    """Decode every item into row i of the .npy array at `path`; failed rows stay zero."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(items), size, size, 3))
    digests: list[str | None] = [None] * len(items)
    reasons: list[str | None] = [None] * len(items)

    def decode(i: int) -> None:
        try:
            images[i], digests[i] = decode_file(items[i][1], size, max_pixels)
        except Exception as err:  # any unreadable file is skipped and listed, never fatal
            reasons[i] = f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        list(pool.map(decode, range(len(items))))
    images.flush()
    return Decoded(digests, reasons)


def compact_rows(path: Path, keep: np.ndarray) -> None:
    """Rewrite the .npy array at `path` with only the rows where `keep` is set, a chunk at a time."""
    if keep.all():
        return
    images = np.load(path, mmap_mode="r")
    rows = np.flatnonzero(keep)
    with atomic_file(path) as tmp:
        compact = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(rows), *images.shape[1:])
        )
        for start in range(0, len(rows), COMPACT_ROWS):
            compact[start : start + COMPACT_ROWS] = images[rows[start : start + COMPACT_ROWS]]
        compact.flush()
        del compact, images
