"""Find identical image files (by digest) across splits, the leakage `prepare` reports in
leakage.csv and may drop, and count the copies within a split."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from src.data.decoding import Decoded
from src.data.scan import SPLITS, Item, shown_path


def find_leakage(
    splits: dict[str, list[Item]], decoded: dict[str, Decoded], root: Path
) -> tuple[list[dict], dict[str, np.ndarray], int]:
    """Identical files across splits: (leakage.csv rows for every member of a group spanning
    splits, per split the rows whose bytes an earlier split already holds, within-split copies)."""
    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for split in SPLITS:
        for i, digest in enumerate(decoded[split].digests):
            if digest is not None:
                groups[digest].append((split, i))
    rows: list[dict] = []
    later = {s: np.zeros(len(splits[s]), dtype=bool) for s in SPLITS}
    within = 0
    for digest, members in groups.items():
        in_splits = {s for s, _ in members}
        within += len(members) - len(in_splits)
        if len(in_splits) < 2:
            continue
        first = min(in_splits, key=SPLITS.index)
        for split, i in members:
            rows.append({"hash": digest, "split": split, "path": shown_path(splits[split][i][1], root)})
            later[split][i] = split != first
    return rows, later, within
