"""Stratified train/val/test splits: the splits a source lacks carved out per class with a fixed
seed, and at most a given number of items per class (`limit_per_class`)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from omegaconf import DictConfig

from src.data.scan import SPLITS, Item
from src.images.decode import natural_key


def _by_class(items: list[Item]) -> list[list[Item]]:
    """Items grouped by class, classes in natural order, items in their original order."""
    groups: dict[str, list] = defaultdict(list)
    for item in items:
        groups[item[0]].append(item)
    return [groups[name] for name in sorted(groups, key=natural_key)]


def _carve(items: list[Item], fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """Split items into (kept, carved) with `fraction` of each class carved out at random."""
    kept, carved = [], []
    for group in _by_class(items):
        order = rng.permutation(len(group))
        n_out = int(round(fraction * len(group)))
        carved += [group[i] for i in sorted(order[:n_out])]
        kept += [group[i] for i in sorted(order[n_out:])]
    return kept, carved


def assign_splits(found: dict, split_cfg: DictConfig) -> dict[str, list[Item]]:
    """Stratified train/val/test with a fixed seed, carving out the splits the source lacks."""
    rng = np.random.default_rng(split_cfg.seed)
    splits = {s: list(found.get(s, [])) for s in SPLITS}
    splits["train"] += found.get(None, [])
    if not splits["test"]:
        source = split_cfg.test_from if splits[split_cfg.test_from] else "train"
        splits[source], splits["test"] = _carve(splits[source], split_cfg.test_fraction, rng)
    if not splits["val"]:
        splits["train"], splits["val"] = _carve(splits["train"], split_cfg.val_fraction, rng)
    return splits


def limit_per_class(items: list, limit: int | None, rng: np.random.Generator) -> list:
    """At most `limit` items per class, drawn at random (all when `limit` is None)."""
    if limit is None:
        return items
    out = []
    for group in _by_class(items):
        out += [group[i] for i in sorted(rng.permutation(len(group))[:limit])]
    return out
