"""The classes of a dataset (those the training split has) and what to do with val/test images
labelled with another class: stop with a description of where each such label comes from, or
drop them and report it."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from src.data.report import listed_lines, listed_names
from src.data.scan import Item, Scan, shown_path
from src.errors import StageError
from src.images.decode import natural_key

log = logging.getLogger(__name__)


def training_classes(found: dict[str | None, list[Item]]) -> list[str]:
    """The classes: those with images in the training split (or the root of a tree without splits)."""
    names = {name for name, _ in found.get("train", []) + found.get(None, [])}
    return sorted(names, key=natural_key)


def _unknown_labels(scan: Scan, classes: list[str], root: Path) -> list[dict]:
    """Val/test images whose label is not a training class, with where each label comes from."""
    known = set(classes)
    unknown = []
    for split in ("val", "test"):
        for name, path in scan.found.get(split, []):
            if name in known:
                continue
            if path in scan.csv_lines:
                source = f"{shown_path(scan.csv_file, root)} line {scan.csv_lines[path]}"
            else:
                source = f"{shown_path(scan.split_dirs[split] / name, root)}/"
            unknown.append({"split": split, "source": source, "path": shown_path(path, root), "label": name})
    return unknown


def _describe_unknown(unknown: list[dict], classes: list[str], scan: Scan) -> list[str]:
    """One line per CSV row or class folder with labels the training split lacks, with a hint."""
    by_lower = {c.lower(): c for c in classes}
    empty = {d.name for d in scan.empty_folders if d.parent == scan.split_dirs.get("train")}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for entry in unknown:
        groups[(entry["source"], entry["label"])].append(entry)
    lines = []
    for (source, label), entries in groups.items():
        if source.endswith("/"):
            what = f"{source}: {len(entries)} image(s) of class {label!r}"
        else:
            what = f"{source}: {entries[0]['path']} labelled {label!r}"
        if label.lower() in by_lower:
            what += f" (did you mean {by_lower[label.lower()]!r}?)"
        elif label in empty:
            what += f" (the training folder {label}/ has no images)"
        lines.append(what)
    return lines


def resolve_unknown_labels(scan: Scan, classes: list[str], root: Path, mode: str) -> list[dict]:
    """Refuse (mode "error") or drop (mode "drop") val/test images with labels the training split
    lacks; return the dropped ones."""
    unknown = _unknown_labels(scan, classes, root)
    if not unknown:
        return []
    lines = _describe_unknown(unknown, classes, scan)
    if mode != "drop":
        raise StageError(
            f"{len(unknown)} val/test image(s) have labels that the training split lacks "
            f"(its classes: {listed_names(classes)}):\n{listed_lines(lines)}\n"
            "fix the labels or folders, or set dataset.unknown_labels=drop to leave these images out "
            "(they are counted in report.json)"
        )
    known = set(classes)
    for split in ("val", "test"):
        if split in scan.found:
            had = len(scan.found[split])
            scan.found[split] = [item for item in scan.found[split] if item[0] in known]
            if had and not scan.found[split]:
                raise StageError(
                    f"all {had} {split} images have labels that the training split lacks "
                    f"(its classes: {listed_names(classes)}):\n{listed_lines(lines)}"
                )
    log.warning(
        "dropped %d val/test image(s) with labels the training split lacks "
        "(dataset.unknown_labels=drop):\n%s",
        len(unknown),
        listed_lines(lines),
    )
    return unknown
