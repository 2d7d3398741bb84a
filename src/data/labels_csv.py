"""Read the CSV labelling a flat test folder: the delimiter sniffed from the header, the path
and label columns found by name, repeated rows reported and kept once, conflicting labels an
error."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from src.data.report import listed_lines
from src.data.scan import Item, Scan
from src.errors import StageError

CSV_DELIMITERS = ",;\t|"  # those the header is sniffed for
PATH_COLUMNS = ("path", "filename", "file")  # header names of the path column (else the first)
LABEL_COLUMNS = ("label", "classid", "class")  # header names of the label column (else the second)


def _delimiter(header: str) -> str:
    """The delimiter of a label CSV, sniffed from its header line among `, ; tab |` (else a comma)."""
    try:
        return csv.Sniffer().sniff(header, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","


def _inside_root(rel: str, bases: tuple[Path, ...]) -> list[Path]:
    """`rel` under each of `bases`, normalised, where it stays inside the dataset root
    `bases[0]` (none for an absolute path)."""
    if os.path.isabs(rel):
        return []
    root = os.path.normpath(bases[0])
    prefix = root.rstrip(os.sep) + os.sep
    candidates = [os.path.normpath(base / rel) for base in bases]
    return [Path(c) for c in candidates if c == root or c.startswith(prefix)]


def read_labels_csv(csv_path: Path, bases: tuple[Path, ...], scan: Scan) -> list[Item]:
    """(class, image path) pairs from a CSV whose columns include a path and a label, found by
    header name (path/filename/file, label/classid/class; else the first two), with `,` `;`
    tab or `|` between them. A path is taken relative to the first of `bases` where it exists.

    `bases[0]` is the dataset root: a row's path must stay inside it. An absolute path, or one
    whose `..` climb out of the root once normalised (`os.path.normpath(base / path)`, symlinks
    not followed, so a linked split folder still works), is an error naming the CSV, the line
    and the path; the image read is the normalised path, the one judged.

    A row repeating an earlier one is reported and kept once; the same image with two labels
    is an error naming the lines."""
    if not csv_path.is_file():
        raise StageError(f"dataset.test_labels_csv: {csv_path} does not exist")
    scan.csv_file = csv_path
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        delimiter = _delimiter(f.readline())
        f.seek(0)
        reader = csv.reader(f, delimiter=delimiter)
        header = [h.strip().lower() for h in next(reader, [])]
        if not header:
            raise StageError(f"dataset.test_labels_csv: {csv_path} is empty (expected a header path,label)")
        path_col = next((i for i, h in enumerate(header) if h in PATH_COLUMNS), 0)
        label_col = next((i for i, h in enumerate(header) if h in LABEL_COLUMNS), 1)
        pairs: list[Item] = []
        seen: dict[str, tuple[str, int]] = {}
        conflicts, outside = [], []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line = reader.line_num
            if len(row) <= max(path_col, label_col):
                raise StageError(f"{csv_path} line {line}: expected a path and a label, got {row!r}")
            rel, label = row[path_col].strip(), row[label_col].strip()
            candidates = _inside_root(rel, bases)
            if not candidates:
                outside.append(f"line {line}: {rel!r}")
                continue
            image = next((c for c in candidates if c.exists()), candidates[-1])
            key = str(image)
            if key in seen:
                first_label, first_line = seen[key]
                if first_label != label:
                    conflicts.append(f"{rel}: {first_label!r} on line {first_line}, {label!r} on line {line}")
                else:
                    scan.csv_duplicates.append(
                        {"csv": str(csv_path), "lines": [first_line, line], "path": rel, "label": label}
                    )
                continue
            seen[key] = (label, line)
            scan.csv_lines[image] = line
            pairs.append((label, image))
    if outside:
        raise StageError(
            f"{csv_path}: {len(outside)} row(s) name a file outside the dataset {bases[0]}:\n"
            f"{listed_lines(outside)}\nwrite each path relative to the folder the CSV describes "
            f"({' or '.join(map(str, dict.fromkeys(bases)))}), with no leading / and no '..' "
            "climbing out of the dataset; copy or link images kept elsewhere into the dataset"
        )
    if conflicts:
        raise StageError(
            f"{csv_path} gives {len(conflicts)} image(s) two different labels:\n{listed_lines(conflicts)}\n"
            "each image must be labelled once: fix the CSV"
        )
    return pairs
