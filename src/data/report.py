"""What `prepare` noticed, dropped or skipped: the `Report` written to `report.json` and
summarised in `info.json`, the warnings it logs, and the short listings its messages use."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from src.data.scan import SPLITS, Scan, shown_path
from src.images.decode import ImageTooLarge

log = logging.getLogger(__name__)


def listed_lines(lines: list[str], limit: int = 10) -> str:
    """Indented lines, the first `limit` of them and a count of the rest."""
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return "\n".join(shown)


def listed_names(names: list[str], limit: int = 10) -> str:
    """The first `limit` names, comma-separated, and how many there are in all when more."""
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@dataclass
class Report:
    """What prepare noticed, dropped or skipped: written to report.json, summarised in info.json."""

    empty_class_folders: list[str] = field(default_factory=list)
    csv_duplicate_rows: list[dict] = field(default_factory=list)
    unknown_labels_dropped: list[dict] = field(default_factory=list)
    leakage: list[dict] = field(default_factory=list)  # rows of leakage.csv
    leakage_images: int = 0  # val/test images whose bytes an earlier split holds
    leakage_dropped: int = 0
    duplicates_within_split: int = 0
    classes_missing: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """The counts (and the classes without test images) that info.json carries."""
        return {
            "skipped": len(self.skipped),
            "too_large": sum(e["reason"].startswith(ImageTooLarge.__name__) for e in self.skipped),
            "unknown_labels_dropped": len(self.unknown_labels_dropped),
            "csv_duplicate_rows": len(self.csv_duplicate_rows),
            "csv_conflicts": 0,  # a conflict stops the stage
            "empty_class_folders": len(self.empty_class_folders),
            "classes_without_test": self.classes_missing.get("test", []),
            "leakage_groups": len({row["hash"] for row in self.leakage}),
            "leakage_images": self.leakage_images,
            "leakage_dropped": self.leakage_dropped,
            "duplicates_within_split": self.duplicates_within_split,
        }

    def details(self) -> dict:
        return {
            "summary": self.summary(),
            "empty_class_folders": self.empty_class_folders,
            "csv_duplicate_rows": self.csv_duplicate_rows,
            "unknown_labels_dropped": self.unknown_labels_dropped,
            "classes_missing": self.classes_missing,
        }


def report_scan(scan: Scan, root: Path, report: Report) -> None:
    """Warn about empty class folders and repeated CSV rows."""
    for folder in scan.empty_folders:
        rel = shown_path(folder, root)
        report.empty_class_folders.append(rel)
        in_train = folder.parent == scan.split_dirs.get("train", scan.split_dirs.get(None))
        log.warning(
            "class folder %s/ has no images%s", rel, ": not a class (no training images)" if in_train else ""
        )
    report.csv_duplicate_rows = scan.csv_duplicates
    if scan.csv_duplicates:
        lines = [
            f"{d['path']} ({d['label']}): lines {d['lines'][0]} and {d['lines'][1]}"
            for d in scan.csv_duplicates
        ]
        log.warning(
            "%s repeats %d row(s), each kept once:\n%s",
            scan.csv_file,
            len(scan.csv_duplicates),
            listed_lines(lines),
        )


def report_leakage(rows: list[dict], n_images: int, dropped: bool) -> None:
    """Warn about val/test images whose bytes an earlier split holds (`rows`: leakage.csv)."""
    if not rows:
        return
    groups = len({row["hash"] for row in rows})
    if dropped:
        log.warning(
            "leakage: removed %d val/test image(s) with the same bytes as an image of an earlier split "
            "(%d groups, listed in leakage.csv; dataset.leakage=drop)",
            n_images,
            groups,
        )
    else:
        log.warning(
            "leakage: %d val/test image(s) have the same bytes as an image of an earlier split "
            "(%d groups, listed in leakage.csv); set dataset.leakage=drop to remove them from val/test",
            n_images,
            groups,
        )


def report_missing(counts: pd.DataFrame, report: Report) -> None:
    """Note and warn about the classes without images in a split (`counts`: class x split)."""
    report.classes_missing = {s: [str(c) for c in counts.index[counts[s] == 0]] for s in SPLITS}
    for split, missing in report.classes_missing.items():
        if missing:
            log.warning("%d class(es) have no %s images: %s", len(missing), split, listed_names(missing))
