"""Stage `download`: fetch the raw dataset, or point the pipeline at a local copy.

Two sources:

* `dataset.path` set (always for `dataset=folder`): the images already sit on disk. Nothing is
  copied; `<paths.raw>/source.json` records where they are and a fingerprint of the file list.
* `dataset.path: null`: the official archives listed in `ARCHIVES` are downloaded into
  `paths.downloads` (checked against pinned checksums, written to `<name>.part` and renamed
  only once verified, skipped when already there) and unpacked into `<paths.raw>/<dataset>/`
  as class subfolders that `prepare` reads:

  - cats_vs_dogs: the *Deep Learning with Python* subset of the Microsoft/Kaggle archive,
    1000 / 500 / 1000 images per class in `train/ validation/ test/`; the archive's corrupt
    JPEGs are skipped (the next readable image takes their place).
  - gtsrb: `train/<ClassId>/` from the training archive, the flat `test/` folder and
    `Test.csv` (`Path,ClassId`) built from the official ground-truth CSV.
  - flowers: TensorFlow's `flower_photos` class folders.
  - cifar10: the pickled python batches decoded to PNG files in `train/<class>/`, `test/<class>/`.

Archives are unpacked member by member: a member whose path would land outside the target, or
that is a link or a device, stops the stage. Without network access the stage fails at once,
naming the URL and how to use a local copy instead."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from src.config.paths import resolve_input, resolve_path
from src.data.sources import ARCHIVES, BUILDERS, DownloadError, fetch
from src.images.files import walk_files
from src.outputs import atomic, folders, hashing
from src.stages import stage

log = logging.getLogger(__name__)


def fingerprint(root: Path, db: Path) -> tuple[int, str]:
    """(file count, sha256 over every file's relative path and content digest). Files are found
    by `walk_files`, as `prepare` finds them: symlinks followed, hidden names left out. Content
    digests are remembered in `db` (`src.hashing`), so an unchanged tree is not read again. A
    name that is not valid UTF-8 enters as its bytes on disk (`os.fsencode`: for any other name
    the same bytes as its UTF-8)."""
    files = sorted(walk_files(root))
    digest = hashlib.sha256()
    for path, content in zip(files, hashing.digests(files, db)):
        digest.update(os.fsencode(path.relative_to(root).as_posix()) + f"|{content}\n".encode())
    return len(files), digest.hexdigest()


@stage.reads("dataset.name", "dataset.path", "paths.raw", "paths.downloads", "paths.cache")
def run(cfg: DictConfig) -> dict:
    """Make the raw dataset available under `<paths.raw>` and describe it in `source.json`."""
    ds = cfg.dataset
    raw = folders.claim(resolve_path(cfg.paths.raw))
    if ds.path is not None:
        root = resolve_input(ds.path).resolve()
        if not root.is_dir():
            raise DownloadError(f"dataset.path: {root} is not a folder; point it at the images")
        kind, archives = "local", []
    else:
        if ds.name not in ARCHIVES:
            raise DownloadError(
                f"dataset.name={ds.name!r} has no download source; set dataset.path to a local copy"
            )
        downloads = folders.claim(resolve_path(cfg.paths.downloads))
        archives = [fetch(archive, downloads) for archive in ARCHIVES[ds.name]]
        root = raw / ds.name
        built = folders.staging_dir(root)
        try:
            BUILDERS[ds.name](archives, built)
        except Exception:
            shutil.rmtree(built, ignore_errors=True)
            raise
        folders.replace_dir(built, root)
        kind = "download"
    files, digest = fingerprint(root, hashing.store(cfg))
    if files == 0:
        raise DownloadError(f"{root} holds no files: expected class subfolders of images")
    info = {
        "kind": kind,
        "dataset": ds.name,
        "root": str(root),
        "archives": [a.name for a in archives],
        "files": files,
        "fingerprint": digest,
    }
    atomic.write_json(raw / "source.json", info)
    log.info("%s: %d files under %s", ds.name, files, root)
    return info


if __name__ == "__main__":
    stage.main("download", run)
