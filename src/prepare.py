"""Stage `prepare`: decode, convert to RGB, resize, encode labels, split, write uint8 arrays.

Reads the tree that `download` points at (`<paths.raw>/source.json`): class subfolders,
optionally under `train/ val/ test/` (also `validation/`, `valid/`, `testing/`), and for a
flat test folder a CSV `path,label` (`dataset.test_labels_csv`, e.g. GTSRB's `Test.csv`; `,`
`;` tab or `|` between the columns). GTSRB as published is read too: `Final_Training/Images/
000NN/` as classes "0", "1", ... and `Final_Test/Images/` labelled by `GT-final_test.csv`.
Splits the source lacks are carved out with a fixed seed, stratified by class. The classes are
those of the training split; a val/test label it lacks is an error (`dataset.unknown_labels`).
Symlinked folders and files are followed (a link to a folder it lies in is reported and not
followed); hidden files and folders (names starting with `.`) are ignored at every depth.

Writes to `<paths.prepared>/`: `images_<split>.npy` (N x S x S x 3 uint8, memory-mappable),
`labels_<split>.npy`, `classes.json`, `manifest.csv`, `counts.csv`, `skipped.csv` (unreadable
or too large files), `leakage.csv` (identical files in two splits), `report.json` (what was
noticed, dropped or skipped), `info.json`. Nothing is written unless every split has images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from PIL import Image, ImageFile, UnidentifiedImageError

from src import cache, stage
from src.atomic import atomic_file
from src.config import resolve_input, resolve_path
from src.download import list_folder, walk_files
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
CSV_DELIMITERS = ",;\t|"
PATH_COLUMNS = ("path", "filename", "file")
LABEL_COLUMNS = ("label", "classid", "class")
GTSRB_TEST_CSV = "GT-final_test.csv"  # the official test ground truth: Filename;...;ClassId
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
JPEG_FORMATS = ("JPEG", "MPO")  # decoded by libjpeg, which can scale down while decoding
DEFAULT_MAX_PIXELS = 40_000_000
MAX_WORKERS = 4
BYTES_PER_PIXEL_WORST = 4 * 3  # RGBA, and up to three copies while converting
DISK_MARGIN = 64 * 2**20
COMPACT_ROWS = 256
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's bomb check sees the full size before a JPEG is scaled down and warns below its error
# threshold; load_rgb checks the size really decoded against its own cap instead, on every image.
Image.MAX_IMAGE_PIXELS = None

Item = tuple[str, Path]


class ImageTooLarge(ValueError):
    """An image with more pixels to decode than the configured cap."""


def natural_key(name: str) -> tuple:
    """Sort key putting "10" after "9" and "img2" before "img10"."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part.lower())
        for part in re.split(r"(\d+)", name)
        if part
    )


def load_rgb(path: Path | io.BytesIO, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode any image file to a size x size x 3 uint8 RGB array (alpha composited on white).

    JPEGs are decoded at a reduced scale where that still covers `size`; an image with more than
    `max_pixels` pixels left to decode raises ImageTooLarge before any pixel is decoded."""
    with Image.open(path) as im:
        if im.format in JPEG_FORMATS:
            im.draft("RGB", (size, size))  # let libjpeg decode at a reduced scale: much faster
        width, height = im.size
        if width * height > max_pixels:
            reduced = " (after reduced-size JPEG decoding)" if im.format in JPEG_FORMATS else ""
            raise ImageTooLarge(
                f"{width}x{height} = {width * height:,} pixels to decode{reduced}, "
                f"over dataset.max_pixels={max_pixels}"
            )
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im.alpha_composite(rgba)
        elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = im.point(lambda v: v / 256).convert("L")  # 16-bit grayscale down to 8 bit
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _decode_file(path: Path, size: int, max_pixels: int) -> tuple[np.ndarray, str]:
    """The decoded image and the blake2b digest of the file's bytes, reading the file once."""
    data = path.read_bytes()
    try:
        array = load_rgb(io.BytesIO(data), size, max_pixels)
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}") from None
    return array, hashlib.blake2b(data, digest_size=16).hexdigest()


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _listing(folder: Path, above: frozenset[str]) -> tuple[list[Path], list[Path]]:
    """The visible files and subfolders of `folder`, subfolders in natural order, symlinks
    followed, loops left out (`above`: real paths of the folders `folder` lies in)."""
    files, folders = list_folder(folder, above)
    return files, sorted(folders, key=lambda d: natural_key(d.name))


def _images_below(folder: Path, above: frozenset[str]) -> list[Path]:
    """Image files in `folder` and its subfolders, symlinks followed, hidden names skipped."""
    files = [p for p in walk_files(folder, above) if _is_image(p)]
    return sorted(files, key=lambda p: (natural_key(p.name), str(p)))


def _inside(above: frozenset[str], folder: Path) -> frozenset[str]:
    """`above` and the real path of `folder`: the folders a subfolder of `folder` lies in."""
    return above | {os.path.realpath(folder)}


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _listed(lines: list[str], limit: int = 10) -> str:
    """Indented lines, the first `limit` of them and a count of the rest."""
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return "\n".join(shown)


def _names(names: list[str], limit: int = 10) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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


def _delimiter(header: str) -> str:
    """The delimiter of a label CSV, sniffed from its header line among `, ; tab |` (else a comma)."""
    try:
        return csv.Sniffer().sniff(header, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","


def _read_labels_csv(csv_path: Path, bases: tuple[Path, ...], scan: Scan) -> list[Item]:
    """(class, image path) pairs from a CSV whose columns include a path and a label, found by
    header name (path/filename/file, label/classid/class; else the first two), with `,` `;`
    tab or `|` between them. A path is taken relative to the first of `bases` where it exists.

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
        conflicts = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line = reader.line_num
            if len(row) <= max(path_col, label_col):
                raise StageError(f"{csv_path} line {line}: expected a path and a label, got {row!r}")
            rel, label = row[path_col].strip(), row[label_col].strip()
            candidates = [base / rel for base in bases]
            image = next((c for c in candidates if c.exists()), candidates[-1])
            key = os.path.normpath(image)
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
    if conflicts:
        raise StageError(
            f"{csv_path} gives {len(conflicts)} image(s) two different labels:\n{_listed(conflicts)}\n"
            "each image must be labelled once: fix the CSV"
        )
    return pairs


def _scan_class_dirs(
    split: str | None,
    class_dirs: list[Path],
    above: frozenset[str],
    scan: Scan,
    name: Callable[[str], str] = str,
) -> None:
    """Add the images of each class folder (named `name(folder name)`); note those without any.
    `above`: real paths of the folders the class folders lie in."""
    for class_dir in class_dirs:
        images = _images_below(class_dir, above)
        if not images:
            scan.empty_folders.append(class_dir)
        scan.found[split] += [(name(class_dir.name), p) for p in images]


def gtsrb_class(name: str) -> str:
    """GTSRB's class folder `00042` (or ClassId `42`) as the class name "42", the name the
    `train/<ClassId>/` trees use."""
    return str(int(name)) if name.isascii() and name.isdigit() else name


def official_gtsrb(root: Path) -> Path | None:
    """The folder holding GTSRB's `Final_Training/Images/` (`root` or `root/GTSRB`), if any."""
    return next((b for b in (root, root / "GTSRB") if (b / "Final_Training" / "Images").is_dir()), None)


def _gtsrb_test_csv(root: Path, base: Path, test_dir: Path, labels_csv: str | None) -> Path:
    """The CSV labelling `Final_Test/Images/`: `dataset.test_labels_csv` where it exists, else
    `GT-final_test.csv` beside the images, in the GTSRB folder or at the root."""
    places = [root / labels_csv] if labels_csv else []
    places += [folder / GTSRB_TEST_CSV for folder in dict.fromkeys((test_dir, base, root))]
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        raise StageError(
            f"{test_dir} holds images but no labels: none of {', '.join(map(str, places))} exists. "
            f"Put {GTSRB_TEST_CSV} (from GTSRB_Final_Test_GT.zip) beside the images, or set "
            "dataset.test_labels_csv to a CSV (path,label) that labels them"
        )
    return found


def _scan_gtsrb(root: Path, base: Path, labels_csv: str | None) -> Scan:
    """GTSRB as published: `Final_Training/Images/000NN/*.ppm` is the training split (classes
    "0", "1", ...; the per-class `GT-000NN.csv` files are not images), `Final_Test/Images/*.ppm`
    labelled by `GT-final_test.csv` the test split."""
    train_dir, test_dir = base / "Final_Training" / "Images", base / "Final_Test" / "Images"
    scan = Scan(found=defaultdict(list), split_dirs={"train": train_dir})
    above = frozenset(os.path.realpath(p) for p in (root, base, train_dir.parent))
    _scan_class_dirs("train", _listing(train_dir, above)[1], _inside(above, train_dir), scan, gtsrb_class)
    above = frozenset(os.path.realpath(p) for p in (root, base, test_dir.parent))
    if test_dir.is_dir() and any(_is_image(p) for p in list_folder(test_dir, above)[0]):
        csv_path = _gtsrb_test_csv(root, base, test_dir, labels_csv)
        log.info("GTSRB layout under %s: test labels from %s", base, csv_path)
        scan.split_dirs["test"] = test_dir
        pairs = _read_labels_csv(csv_path, (root, test_dir), scan)
        scan.found["test"] = [(gtsrb_class(label), path) for label, path in pairs]
    return scan


def _scan_splits(
    root: Path,
    listing: tuple[list[Path], list[Path]],
    split_dirs: dict[str | None, Path],
    labels_csv: str | None,
) -> Scan:
    """Class folders under each split folder (or under `root`, whose files and folders are
    `listing`), a flat test folder by its CSV."""
    scan = Scan(found=defaultdict(list), split_dirs=split_dirs or {None: root})
    at_root = _inside(frozenset(), root)
    for split, folder in scan.split_dirs.items():
        above = frozenset() if split is None else at_root
        files, class_dirs = listing if split is None else _listing(folder, above)
        if class_dirs:
            _scan_class_dirs(split, class_dirs, _inside(above, folder), scan)
        elif split == "test" and labels_csv:
            csv_path = root / labels_csv
            scan.found[split] = _read_labels_csv(csv_path, (root, csv_path.parent), scan)
        elif any(_is_image(p) for p in files):
            raise StageError(
                f"{folder} holds images but no class subfolders: "
                "set dataset.test_labels_csv to a CSV (path,label) that labels them"
            )
    return scan


def scan_source(root: Path, labels_csv: str | None) -> Scan:
    """Find (class, path) pairs per split, following symlinks and skipping hidden files and
    folders at every depth. A tree with GTSRB's `Final_Training/Images/` (and no split
    folders) is read as GTSRB's official layout."""
    if not root.is_dir():
        raise StageError(f"dataset root {root} does not exist: rerun the download stage")
    listing = _listing(root, frozenset())
    split_dirs: dict[str | None, Path] = {
        SPLIT_ALIASES[d.name.lower()]: d for d in listing[1] if d.name.lower() in SPLIT_ALIASES
    }
    gtsrb = None if split_dirs else official_gtsrb(root)
    if gtsrb is not None:
        scan = _scan_gtsrb(root, gtsrb, labels_csv)
    else:
        scan = _scan_splits(root, listing, split_dirs, labels_csv)
    if not any(scan.found.values()):
        raise StageError(
            f"no images found under {root}: expected class subfolders, optionally under train/ val/ test/"
        )
    scan.found = dict(scan.found)
    return scan


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
                source = f"{_rel(scan.csv_file, root)} line {scan.csv_lines[path]}"
            else:
                source = f"{_rel(scan.split_dirs[split] / name, root)}/"
            unknown.append({"split": split, "source": source, "path": _rel(path, root), "label": name})
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
            f"(its classes: {_names(classes)}):\n{_listed(lines)}\n"
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
                    f"(its classes: {_names(classes)}):\n{_listed(lines)}"
                )
    log.warning(
        "dropped %d val/test image(s) with labels the training split lacks "
        "(dataset.unknown_labels=drop):\n%s",
        len(unknown),
        _listed(lines),
    )
    return unknown


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


def _limit(items: list, limit: int | None, rng: np.random.Generator) -> list:
    """At most `limit` items per class, drawn at random (all when `limit` is None)."""
    if limit is None:
        return items
    out = []
    for group in _by_class(items):
        out += [group[i] for i in sorted(rng.permutation(len(group))[:limit])]
    return out


# --- memory and disk -----------------------------------------------------------------------


def _cgroup_available() -> int | None:
    """Memory left under this process's cgroup (v2) limit, reclaimable file cache counted as
    free; None without a limit."""
    folder = Path("/sys/fs/cgroup")
    try:
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((folder / "memory.current").read_text())
        stat = dict(line.split()[:2] for line in (folder / "memory.stat").read_text().splitlines())
        return max(0, int(limit) - used + int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        return None


def _available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable, or free pages; capped by a cgroup limit),
    None if unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    in_cgroup = _cgroup_available()
    return available if in_cgroup is None else min(available, in_cgroup)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def decode_workers(max_pixels: int) -> int:
    """Decoding threads: at most 4, one per CPU, and as many worst-case images as fit in memory."""
    available = _available_memory()
    by_memory = MAX_WORKERS if available is None else available // (max_pixels * BYTES_PER_PIXEL_WORST)
    return max(1, min(MAX_WORKERS, _cpu_count(), by_memory))


def check_disk(folder: Path, sizes: list[int], image_size: int) -> None:
    """Refuse to start when `folder` lacks room for the split arrays (plus one compaction copy)."""
    row = image_size * image_size * 3
    arrays = sum(sizes) * row
    needed = arrays + max(sizes) * row + DISK_MARGIN
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StageError(
            f"not enough disk space in {folder}: the image arrays need {needed:,} bytes "
            f"({needed / 2**30:.2f} GiB: {arrays:,} for {sum(sizes)} images at {image_size} px, "
            f"room to compact the largest split and a margin), {free:,} bytes are available; "
            "free some space, or lower dataset.image_size or dataset.limit_per_class"
        )


# --- decoding ------------------------------------------------------------------------------


@dataclass
class Decoded:
    """One split decoded into its array: per row, the file digest or why it could not be read."""

    digests: list[str | None]
    reasons: list[str | None]

    @property
    def ok(self) -> np.ndarray:
        return np.array([d is not None for d in self.digests], dtype=bool)


def _decode_split(items: list[Item], size: int, path: Path, max_pixels: int, workers: int) -> Decoded:
    """Decode every item into row i of the .npy array at `path`; failed rows stay zero."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(items), size, size, 3))
    digests: list[str | None] = [None] * len(items)
    reasons: list[str | None] = [None] * len(items)

    def decode(i: int) -> None:
        try:
            images[i], digests[i] = _decode_file(items[i][1], size, max_pixels)
        except Exception as err:  # any unreadable file is skipped and listed, never fatal
            reasons[i] = f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        list(pool.map(decode, range(len(items))))
    images.flush()
    return Decoded(digests, reasons)


def _compact(path: Path, keep: np.ndarray) -> None:
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
            rows.append({"hash": digest, "split": split, "path": _rel(splits[split][i][1], root)})
            later[split][i] = split != first
    return rows, later, within


# --- reporting -----------------------------------------------------------------------------


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


def _report_scan(scan: Scan, root: Path, report: Report) -> None:
    """Warn about empty class folders and repeated CSV rows."""
    for folder in scan.empty_folders:
        rel = _rel(folder, root)
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
            _listed(lines),
        )


def _report_leakage(rows: list[dict], n_images: int, dropped: bool) -> None:
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


def _report_missing(counts: pd.DataFrame, report: Report) -> None:
    report.classes_missing = {s: [str(c) for c in counts.index[counts[s] == 0]] for s in SPLITS}
    for split, missing in report.classes_missing.items():
        if missing:
            log.warning("%d class(es) have no %s images: %s", len(missing), split, _names(missing))


def failed_skipped_csv(cfg: DictConfig) -> Path:
    """Where the skipped files of a run that stopped on an empty split are listed."""
    return resolve_path(cfg.paths.reports) / "prepare_skipped.csv"


# --- the stage -----------------------------------------------------------------------------


def select(cfg: DictConfig, root: Path, report: Report) -> tuple[dict[str, list[Item]], list[str]]:
    """The items of each split and the classes, before any image is decoded."""
    ds = cfg.dataset
    scan = scan_source(root, ds.test_labels_csv)
    _report_scan(scan, root, report)
    classes = training_classes(scan.found)
    if len(classes) < 2:
        raise StageError(
            f"found {len(classes)} class with training images under {root}: "
            "a classifier needs at least 2 class subfolders"
        )
    report.unknown_labels_dropped = resolve_unknown_labels(
        scan, classes, root, ds.get("unknown_labels", "error")
    )
    splits = assign_splits(scan.found, ds.split)
    rng = np.random.default_rng(ds.split.seed)
    splits = {s: _limit(items, ds.limit_per_class[s], rng) for s, items in splits.items()}
    for split in SPLITS:
        if not splits[split]:
            raise StageError(
                f"split {split!r} is empty under {root}: check dataset.split and dataset.limit_per_class"
            )
    return splits, classes


def _decode_all(splits: dict[str, list[Item]], ds: DictConfig, out_dir: Path, report: Report) -> dict:
    """Decode every split into `out_dir` (within the memory bounds); list the files skipped."""
    max_pixels = ds.get("max_pixels", DEFAULT_MAX_PIXELS)
    workers = decode_workers(max_pixels)
    log.info("decoding %d images with %d thread(s)", sum(len(v) for v in splits.values()), workers)
    decoded = {
        s: _decode_split(splits[s], ds.image_size, out_dir / f"images_{s}.npy", max_pixels, workers)
        for s in SPLITS
    }
    for s in SPLITS:
        for (_, path), reason in zip(splits[s], decoded[s].reasons):
            if reason is not None:
                report.skipped.append({"split": s, "path": str(path), "reason": reason})
                log.warning("skipped image %s (%s)", path, reason)
    pd.DataFrame(report.skipped, columns=["split", "path", "reason"]).to_csv(
        out_dir / "skipped.csv", index=False
    )
    return decoded


def _keep(
    splits: dict[str, list[Item]], decoded: dict, root: Path, out_dir: Path, drop: bool, report: Report
) -> dict[str, np.ndarray]:
    """Per split, the rows to keep: those decoded, less (with `drop`) the copies of images of an
    earlier split. Writes leakage.csv."""
    report.leakage, later, report.duplicates_within_split = find_leakage(splits, decoded, root)
    report.leakage_images = int(sum(later[s].sum() for s in SPLITS))
    report.leakage_dropped = report.leakage_images if drop else 0
    pd.DataFrame(report.leakage, columns=["hash", "split", "path"]).to_csv(
        out_dir / "leakage.csv", index=False
    )
    _report_leakage(report.leakage, report.leakage_images, drop)
    if report.duplicates_within_split:
        log.warning(
            "%d image(s) are exact copies of another in the same split", report.duplicates_within_split
        )
    return {s: decoded[s].ok & ~later[s] if drop else decoded[s].ok for s in SPLITS}


def _refuse_empty_split(
    cfg: DictConfig, splits: dict, decoded: dict, keep: dict[str, np.ndarray], out_dir: Path
) -> None:
    """Stop when a split has no image left, keeping the list of skipped files in reports."""
    for s in SPLITS:
        if keep[s].any():
            continue
        kept_csv = failed_skipped_csv(cfg)
        kept_csv.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / "skipped.csv", kept_csv)
        reasons = decoded[s].reasons
        failed = [r for r in reasons if r is not None]
        parts = (
            [f"{len(failed)} could not be read (see {kept_csv}; the first: {failed[0]})"] if failed else []
        )
        leaked = len(reasons) - len(failed)
        if leaked:
            parts.append(f"{leaked} dropped as copies of images of an earlier split (dataset.leakage=drop)")
        raise StageError(
            f"split {s!r} has no images left: of its {len(splits[s])} files, {'; '.join(parts)}. "
            "The prepared data was not written (a previous output is left as it was)"
        )


def build(cfg: DictConfig, root: Path, out_dir: Path, report: Report) -> tuple[pd.DataFrame, list[str]]:
    """Decode every split into `out_dir`; return the manifest of the images kept and the classes."""
    ds = cfg.dataset
    splits, classes = select(cfg, root, report)
    class_index = {name: i for i, name in enumerate(classes)}
    check_disk(out_dir, [len(splits[s]) for s in SPLITS], ds.image_size)
    decoded = _decode_all(splits, ds, out_dir, report)
    keep = _keep(splits, decoded, root, out_dir, ds.get("leakage", "warn") == "drop", report)
    _refuse_empty_split(cfg, splits, decoded, keep, out_dir)
    rows = []
    for s in SPLITS:
        _compact(out_dir / f"images_{s}.npy", keep[s])
        kept = [item for item, good in zip(splits[s], keep[s]) if good]
        np.save(out_dir / f"labels_{s}.npy", np.array([class_index[n] for n, _ in kept], dtype=np.int32))
        rows += [
            {"split": s, "index": i, "label": class_index[name], "class": name, "path": _rel(path, root)}
            for i, (name, path) in enumerate(kept)
        ]
        log.info("%s: %d images", s, len(kept))
    return pd.DataFrame(rows), classes


def _write_outputs(
    cfg: DictConfig, source: dict, out_dir: Path, manifest: pd.DataFrame, classes: list[str], report: Report
) -> dict:
    """Write the manifest, counts, classes, report and info beside the arrays; return the info."""
    ds = cfg.dataset
    manifest.to_csv(out_dir / "manifest.csv", index=False)
    counts = manifest.pivot_table(
        index="class", columns="split", values="index", aggfunc="count", fill_value=0
    )
    counts = counts.reindex(index=classes, columns=list(SPLITS), fill_value=0)
    counts.to_csv(out_dir / "counts.csv")
    _report_missing(counts, report)
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    (out_dir / "report.json").write_text(json.dumps(report.details(), indent=2) + "\n")
    digest = hashlib.sha256()
    digest.update(f"{source.get('fingerprint')}|{ds.image_size}|".encode())
    digest.update(manifest.to_csv(index=False).encode())
    info = {
        "classes": classes,
        "image_size": ds.image_size,
        "fingerprint": digest.hexdigest()[:16],
        "counts": {s: int(counts[s].sum()) for s in SPLITS},
        "skipped": len(report.skipped),
        "cache_key": cache.stage_key(cfg, "prepare"),
        "report": report.summary(),
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def source_root(cfg: DictConfig, source: dict) -> Path:
    """The folder of raw images that `source.json` describes. Its `root` is an absolute path of
    the checkout that ran `download`; in another checkout (a clone that pulled `<paths.raw>`
    from a DVC remote) a downloaded dataset is the one under this `<paths.raw>`, and a local
    folder that is not there is found again from `dataset.path`."""
    if source.get("kind") == "download" and source.get("dataset"):
        return resolve_path(cfg.paths.raw) / source["dataset"]
    root = Path(source["root"])
    if source.get("kind") == "local" and not root.is_dir() and cfg.dataset.path is not None:
        return resolve_input(cfg.dataset.path).resolve()
    return root


def run(cfg: DictConfig) -> dict:
    """Prepare the dataset described by `cfg.dataset`; return counts and the data fingerprint.

    Builds in a staging folder beside `paths.prepared` and moves it into place only when done:
    on any error the staging folder is removed and the previous output stays."""
    source_file = resolve_path(cfg.paths.raw) / "source.json"
    if not source_file.is_file():
        raise StageError(f"{source_file} not found: run the download stage first (dvc repro download)")
    source = json.loads(source_file.read_text())
    root = source_root(cfg, source)
    final = resolve_path(cfg.paths.prepared)
    out_dir = stage.staging_dir(final)
    report = Report()
    try:
        manifest, classes = build(cfg, root, out_dir, report)
        info = _write_outputs(cfg, source, out_dir, manifest, classes, report)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    stage.replace_dir(out_dir, final)
    failed_skipped_csv(cfg).unlink(missing_ok=True)  # from an earlier run that stopped
    return info


if __name__ == "__main__":
    stage.main("prepare", run)
