"""Bad (and good) inputs built at test time: small real files, no binary blobs in git.

Each function writes real bytes a user could hand the pipeline: images in every mode, truncated
and fake images, a decompression-bomb PNG, macOS AppleDouble files, hidden folders, label CSVs
with unknown, duplicate and conflicting rows, text files posing as weights."""

from __future__ import annotations

import csv
import struct
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image


def image(path: Path, side: int = 24, mode: str = "RGB", seed: int = 0) -> Path:
    """A real image of random pixels (format from the suffix), converted to `mode`."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def class_tree(root: Path, counts: Mapping[str, int], side: int = 24, seed: int = 0, suffix=".png") -> Path:
    """`root/<class>/<class><i><suffix>` for each class and count; distinct pixels everywhere."""
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image(root / name / f"{name}{i}{suffix}", side, seed=seed * 100_000 + c * 1000 + i)
    return root


def split_tree(root: Path, splits: Mapping[str, Mapping[str, int]], side: int = 24) -> Path:
    """`root/<split>/<class>/...` with distinct images in every split."""
    for s, (split, counts) in enumerate(splits.items()):
        class_tree(root / split, counts, side, seed=s + 1)
    return root


def truncated_jpeg(path: Path, side: int = 64) -> Path:
    """A JPEG cut off half way: the header reads, the pixels do not."""
    image(path.with_suffix(".tmp.jpg"), side)
    data = path.with_suffix(".tmp.jpg").read_bytes()
    path.with_suffix(".tmp.jpg").unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def appledouble(path: Path) -> Path:
    """A macOS resource-fork file (`._name.jpg`): an image suffix, no image inside."""
    path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000))
    return path


def text_file(path: Path, text: str = "not an image, not weights\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def bomb_png(path: Path, side: int = 13000, mode: str = "RGBA") -> Path:
    """A PNG of side x side pixels that compresses to well under a megabyte (one flat colour),
    written row by row without ever holding the decoded image in memory."""
    channels, colour_type = {"RGBA": (4, 6), "RGB": (3, 2)}[mode]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" + bytes([200, 120, 40, 255][:channels]) * side  # filter byte + one colour
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )
    return path


def labels_csv(path: Path, rows: Iterable[tuple[str, str]], header=("Path", "ClassId")) -> Path:
    """A `path,label` CSV for a flat test folder."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def flat_test(root: Path, labels: Iterable[str], side: int = 24, seed: int = 7) -> list[tuple[str, str]]:
    """Images `root/test/<i>.png`, one per label; returns their (relative path, label) rows."""
    rows = []
    for i, label in enumerate(labels):
        rel = f"test/{i:04d}.png"
        image(root / rel, side, seed=seed * 1000 + i)
        rows.append((rel, label))
    return rows
