"""Find the images and labels of a source tree (`scan_source`): class folders at the root or
under train/val/test folders (or their aliases), a flat test folder labelled by a CSV, and
GTSRB's official `Final_Training`/`Final_Test` layout."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from src.data.labels_csv import read_labels_csv
from src.data.scan import SPLIT_ALIASES, Scan, shown_name
from src.errors import StageError
from src.images.decode import is_image, natural_key
from src.images.files import list_folder, walk_files

log = logging.getLogger(__name__)


GTSRB_TEST_CSV = "GT-final_test.csv"  # the official test ground truth: Filename;...;ClassId


def _listing(folder: Path, above: frozenset[str]) -> tuple[list[Path], list[Path]]:
    """The visible files and subfolders of `folder`, subfolders in natural order, symlinks
    followed, loops left out (`above`: real paths of the folders `folder` lies in)."""
    files, folders = list_folder(folder, above)
    return files, sorted(folders, key=lambda d: natural_key(d.name))


def _images_below(folder: Path, above: frozenset[str]) -> list[Path]:
    """Image files in `folder` and its subfolders, symlinks followed, hidden names skipped."""
    files = [p for p in walk_files(folder, above) if is_image(p)]
    return sorted(files, key=lambda p: (natural_key(p.name), str(p)))


def _inside(above: frozenset[str], folder: Path) -> frozenset[str]:
    """`above` and the real path of `folder`: the folders a subfolder of `folder` lies in."""
    return above | {os.path.realpath(folder)}


def _scan_class_dirs(
    split: str | None,
    class_dirs: list[Path],
    above: frozenset[str],
    scan: Scan,
    name: Callable[[str], str] = str,
) -> None:
    """Add the images of each class folder (named `name(folder name)`, bytes that are not UTF-8
    escaped: `shown_name`); note those without any. `above`: real paths of the folders the class
    folders lie in."""
    for class_dir in class_dirs:
        images = _images_below(class_dir, above)
        if not images:
            scan.empty_folders.append(class_dir)
        label = shown_name(name(class_dir.name))
        scan.found[split] += [(label, p) for p in images]


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
    if test_dir.is_dir() and any(is_image(p) for p in list_folder(test_dir, above)[0]):
        csv_path = _gtsrb_test_csv(root, base, test_dir, labels_csv)
        log.info("GTSRB layout under %s: test labels from %s", base, csv_path)
        scan.split_dirs["test"] = test_dir
        pairs = read_labels_csv(csv_path, (root, test_dir), scan)
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
            scan.found[split] = read_labels_csv(csv_path, (root, csv_path.parent), scan)
        elif any(is_image(p) for p in files):
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
