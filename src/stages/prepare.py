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
noticed, dropped or skipped), `info.json`. Nothing is written unless every split has images."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from src.config.paths import resolve_input, resolve_path
from src.data.decoding import compact_rows, decode_split
from src.data.labels import resolve_unknown_labels, training_classes
from src.data.layouts import scan_source
from src.data.leakage import find_leakage
from src.data.memory import check_disk, decode_workers
from src.data.report import Report, report_leakage, report_missing, report_scan
from src.data.scan import SPLITS, Item, shown_name, shown_path
from src.data.splits import assign_splits, limit_per_class
from src.errors import StageError
from src.images.decode import DEFAULT_MAX_PIXELS
from src.outputs import folders
from src.stages import reuse, stage

log = logging.getLogger(__name__)


def failed_skipped_csv(cfg: DictConfig) -> Path:
    """Where the skipped files of a run that stopped on an empty split are listed."""
    return resolve_path(cfg.paths.reports) / "prepare_skipped.csv"


def select(cfg: DictConfig, root: Path, report: Report) -> tuple[dict[str, list[Item]], list[str]]:
    """The items of each split and the classes, before any image is decoded."""
    ds = cfg.dataset
    scan = scan_source(root, ds.test_labels_csv)
    report_scan(scan, root, report)
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
    splits = {s: limit_per_class(items, ds.limit_per_class[s], rng) for s, items in splits.items()}
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
        s: decode_split(splits[s], ds.image_size, out_dir / f"images_{s}.npy", max_pixels, workers)
        for s in SPLITS
    }
    for s in SPLITS:
        for (_, path), reason in zip(splits[s], decoded[s].reasons):
            if reason is not None:
                report.skipped.append({"split": s, "path": shown_name(path), "reason": reason})
                log.warning("skipped image %s (%s)", shown_name(path), reason)
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
    report_leakage(report.leakage, report.leakage_images, drop)
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
        compact_rows(out_dir / f"images_{s}.npy", keep[s])
        kept = [item for item, good in zip(splits[s], keep[s]) if good]
        np.save(out_dir / f"labels_{s}.npy", np.array([class_index[n] for n, _ in kept], dtype=np.int32))
        rows += [
            {
                "split": s,
                "index": i,
                "label": class_index[name],
                "class": name,
                "path": shown_path(path, root),
            }
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
    report_missing(counts, report)
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
        "cache_key": reuse.stage_key(cfg, "prepare"),
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


@stage.reads("dataset", "paths.raw", "paths.prepared", "paths.reports")
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
    out_dir = folders.staging_dir(final)
    report = Report()
    try:
        manifest, classes = build(cfg, root, out_dir, report)
        info = _write_outputs(cfg, source, out_dir, manifest, classes, report)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    folders.replace_dir(out_dir, final)
    failed_skipped_csv(cfg).unlink(missing_ok=True)  # from an earlier run that stopped
    return info


if __name__ == "__main__":
    stage.main("prepare", run)
