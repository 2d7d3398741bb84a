"""Stage `prepare`: decode, convert to RGB, resize, encode labels, split, write uint8 arrays.

Reads the tree that `download` points at (`<paths.raw>/source.json`): class subfolders,
optionally under `train/ val/ test/` (also `validation/`, `valid/`, `testing/`), and for a
flat test folder a CSV `path,label` (`dataset.test_labels_csv`, e.g. GTSRB's `Test.csv`).
Splits the source lacks are carved out with a fixed seed, stratified by class.

Writes to `<paths.prepared>/`: `images_<split>.npy` (N x S x S x 3 uint8, memory-mappable),
`labels_<split>.npy`, `classes.json`, `manifest.csv`, `counts.csv`, `skipped.csv`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from PIL import Image, ImageFile

from src import cache, stage
from src.config import resolve_path
from src.stage import StageError

log = logging.getLogger(__name__)

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
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ImageFile.LOAD_TRUNCATED_IMAGES = False


def natural_key(name: str) -> tuple:
    """Sort key putting "10" after "9" and "img2" before "img10"."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part.lower())
        for part in re.split(r"(\d+)", name)
        if part
    )


def load_rgb(path: Path, size: int) -> np.ndarray:
    """Decode any image file to a size x size x 3 uint8 RGB array (alpha composited on white)."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size, size))  # let libjpeg decode at a reduced scale: much faster
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im.alpha_composite(rgba)
        elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = im.point(lambda v: v / 256).convert("L")  # 16-bit grayscale down to 8 bit
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(
        (d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: natural_key(d.name),
    )


def _read_labels_csv(csv_path: Path, root: Path) -> list[tuple[str, Path]]:
    """(class, image path) pairs from a CSV whose first two columns are path and label."""
    if not csv_path.is_file():
        raise StageError(f"dataset.test_labels_csv: {csv_path} does not exist")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header = [h.strip().lower() for h in rows[0]]
    path_col = next((i for i, h in enumerate(header) if h in ("path", "filename", "file")), 0)
    label_col = next((i for i, h in enumerate(header) if h in ("label", "classid", "class")), 1)
    pairs = []
    for row in rows[1:]:
        if row:
            rel = row[path_col].strip()
            image = root / rel if (root / rel).exists() else csv_path.parent / rel
            pairs.append((row[label_col].strip(), image))
    return pairs


def scan_source(root: Path, labels_csv: str | None) -> dict[str | None, list[tuple[str, Path]]]:
    """Find (class, path) pairs per split; key None holds images of a tree without splits."""
    if not root.is_dir():
        raise StageError(f"dataset root {root} does not exist: rerun the download stage")
    split_dirs = {
        SPLIT_ALIASES[d.name.lower()]: d for d in _class_dirs(root) if d.name.lower() in SPLIT_ALIASES
    }
    found: dict[str | None, list[tuple[str, Path]]] = defaultdict(list)
    for split, folder in split_dirs.items() if split_dirs else [(None, root)]:
        classes = _class_dirs(folder)
        if classes:
            for class_dir in classes:
                found[split] += [
                    (class_dir.name, p)
                    for p in sorted(class_dir.rglob("*"), key=lambda p: natural_key(p.name))
                    if _is_image(p)
                ]
        elif split == "test" and labels_csv:
            found[split] = _read_labels_csv(root / labels_csv, root)
        elif any(_is_image(p) for p in folder.iterdir()):
            raise StageError(
                f"{folder} holds images but no class subfolders: "
                "set dataset.test_labels_csv to a CSV (path,label) that labels them"
            )
    if not any(found.values()):
        raise StageError(
            f"no images found under {root}: expected class subfolders, optionally under train/ val/ test/"
        )
    return dict(found)


def _by_class(items: list[tuple[str, Path]]) -> list[list[tuple[str, Path]]]:
    """Items grouped by class, classes in natural order, items in their original order."""
    groups: dict[str, list] = defaultdict(list)
    for item in items:
        groups[item[0]].append(item)
    return [groups[name] for name in sorted(groups, key=natural_key)]


def _carve(items: list[tuple[str, Path]], fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """Split items into (kept, carved) with `fraction` of each class carved out at random."""
    kept, carved = [], []
    for group in _by_class(items):
        order = rng.permutation(len(group))
        n_out = int(round(fraction * len(group)))
        carved += [group[i] for i in sorted(order[:n_out])]
        kept += [group[i] for i in sorted(order[n_out:])]
    return kept, carved


def assign_splits(found: dict, split_cfg: DictConfig) -> dict[str, list[tuple[str, Path]]]:
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


def _limit(items: list, limit: int | None, rng: np.random.Generator) -> list:
    """At most `limit` items per class, drawn at random (all when `limit` is None)."""
    if limit is None:
        return items
    out = []
    for group in _by_class(items):
        out += [group[i] for i in sorted(rng.permutation(len(group))[:limit])]
    return out


def _decode_split(
    items: list, size: int, out_dir: Path, split: str, class_index: dict, skipped: list
) -> list[tuple[str, Path]]:
    """Decode one split into `images_<split>.npy` and `labels_<split>.npy`; return kept items."""
    images = np.lib.format.open_memmap(
        out_dir / f"images_{split}.npy", mode="w+", dtype=np.uint8, shape=(len(items), size, size, 3)
    )
    ok = np.zeros(len(items), dtype=bool)

    def decode(i: int) -> None:
        try:
            images[i] = load_rgb(items[i][1], size)
            ok[i] = True
        except Exception as err:  # any unreadable file is skipped and listed, never fatal
            skipped.append(
                {"split": split, "path": str(items[i][1]), "reason": f"{type(err).__name__}: {err}"}
            )

    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL releases the GIL while decoding
        list(pool.map(decode, range(len(items))))
    kept = [item for item, good in zip(items, ok) if good]
    if not ok.all():  # compact the array without the skipped rows
        compact = np.lib.format.open_memmap(
            out_dir / f".images_{split}.npy", mode="w+", dtype=np.uint8, shape=(len(kept), size, size, 3)
        )
        compact[:] = images[ok]
        compact.flush()
        del images, compact
        (out_dir / f".images_{split}.npy").replace(out_dir / f"images_{split}.npy")
    else:
        images.flush()
        del images
    labels = np.array([class_index[name] for name, _ in kept], dtype=np.int32)
    np.save(out_dir / f"labels_{split}.npy", labels)
    return kept


def run(cfg: DictConfig) -> dict:
    """Prepare the dataset described by `cfg.dataset`; return counts and the data fingerprint."""
    source_file = resolve_path(cfg.paths.raw) / "source.json"
    if not source_file.is_file():
        raise StageError(f"{source_file} not found: run the download stage first (dvc repro download)")
    source = json.loads(source_file.read_text())
    root = Path(source["root"])
    ds = cfg.dataset
    found = scan_source(root, ds.test_labels_csv)
    splits = assign_splits(found, ds.split)
    rng = np.random.default_rng(ds.split.seed)
    splits = {s: _limit(items, ds.limit_per_class[s], rng) for s, items in splits.items()}
    for split in ("train", "val", "test"):
        if not splits[split]:
            raise StageError(
                f"split {split!r} is empty under {root}: check dataset.split and dataset.limit_per_class"
            )
    classes = sorted({name for items in splits.values() for name, _ in items}, key=natural_key)
    if len(classes) < 2:
        raise StageError(
            f"found {len(classes)} class under {root}: a classifier needs at least 2 class subfolders"
        )
    class_index = {name: i for i, name in enumerate(classes)}

    final = resolve_path(cfg.paths.prepared)
    out_dir = stage.staging_dir(final)
    skipped: list[dict] = []
    rows = []
    for split in SPLITS:
        kept = _decode_split(splits[split], ds.image_size, out_dir, split, class_index, skipped)
        rows += [
            {
                "split": split,
                "index": i,
                "label": class_index[name],
                "class": name,
                "path": str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
            }
            for i, (name, path) in enumerate(kept)
        ]
        log.info("%s: %d images", split, len(kept))
    manifest = pd.DataFrame(rows)
    manifest.to_csv(out_dir / "manifest.csv", index=False)
    counts = manifest.pivot_table(
        index="class", columns="split", values="index", aggfunc="count", fill_value=0
    )
    counts = counts.reindex(index=classes, columns=list(SPLITS), fill_value=0)
    counts.to_csv(out_dir / "counts.csv")
    pd.DataFrame(skipped, columns=["split", "path", "reason"]).to_csv(out_dir / "skipped.csv", index=False)
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    digest = hashlib.sha256()
    digest.update(f"{source.get('fingerprint')}|{ds.image_size}|".encode())
    digest.update(manifest.to_csv(index=False).encode())
    fingerprint = digest.hexdigest()[:16]
    info = {
        "classes": classes,
        "image_size": ds.image_size,
        "fingerprint": fingerprint,
        "counts": {s: int(counts[s].sum()) for s in SPLITS},
        "skipped": len(skipped),
        "cache_key": cache.stage_key(cfg, "prepare"),
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    stage.replace_dir(out_dir, final)
    for entry in skipped:
        log.warning("skipped unreadable image %s (%s)", entry["path"], entry["reason"])
    return info


if __name__ == "__main__":
    stage.main("prepare", run)
