"""What scanning a source tree yields (`Scan`: (class, image path) items per split, where each
label came from, empty class folders), the split names and their aliases."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


Item = tuple[str, Path]


@dataclass
class Scan:
    """What scan_source found: (class, path) pairs per split (None: a tree without splits), and
    where each label came from."""

    found: dict[str | None, list[Item]]
    split_dirs: dict[str | None, Path]
    csv_file: Path | None = None
    csv_lines: dict[Path, int] = field(default_factory=dict)  # image -> its line in csv_file
    csv_duplicates: list[dict] = field(default_factory=list)
    empty_folders: list[Path] = field(default_factory=list)


def shown_name(path: Path | str) -> str:
    """`path` as text that can be written anywhere (CSV, JSON, logs): a name that is not valid
    UTF-8 (held by Python with surrogate escapes) shows its bytes escaped, `caf\\xe9.jpg`;
    any other path is unchanged."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown_path(path: Path, root: Path) -> str:
    """`path` relative to the source `root` when it lies below it, else as it is (`shown_name`:
    bytes that are not UTF-8 escaped)."""
    return shown_name(path.relative_to(root) if path.is_relative_to(root) else path)
