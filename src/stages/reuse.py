"""Content-addressed reuse of prepared data and extracted features for `python -m src.train`.

Which cache serves which command: under `dvc repro` and `dvc exp run` (queued or not) every
stage output is in DVC's cache and unchanged stages are skipped, checked out or restored from
DVC's run-cache; the stage entry points (`python -m src.stages.prepare`, `src.extract`) never call
`reuse_or_run` and never read or fill `<paths.cache>/<stage>/`. They only record their key in
`info.json`, so that `src.train` can reuse what DVC produced or pulled. This module serves
what DVC cannot: `python -m src.train` outside DVC and its Hydra multiruns, whose jobs share
prepared data and features.

`src.train` never reads an output that a concurrent `dvc repro` may replace underneath it: it
reads prepared data and features only from `<paths.cache>/<stage>/<key>/`, folders nothing but
`reuse_or_run` (under the key's lock) ever writes, and its downloads land in its own
`raw_dir`, not in DVC's `paths.raw`.

A stage output is identified by a key: the sha256 of everything that determines it (the config
subtree the stage reads, the fingerprint of its input, the source of the code that makes it: the
stage module and every `src` module it imports, as `src.codedeps` finds them).
`prepare` and `extract` record their key in `info.json`. Before running one of them, a job looks
for an output with the same key under `<paths.cache>/<stage>/<key>/` and reuses it. Otherwise,
holding a lock so that parallel jobs wanting the same output make it once, it snapshots the
output `dvc repro` left (`paths.prepared`, `paths.features`) when that holds the same key: hard
links (copies where the filesystem refuses them) made in a staging folder, kept only if the
copied `info.json` still carries the key, then moved into place. DVC and the stages replace
files by unlinking them, never by writing into them, so the linked files stay what they were.
If the DVC output does not match, or stopped matching while it was copied, the job builds the
output in the cache instead.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from src.config.paths import REPO_ROOT, resolve_input, resolve_path
from src.fitting import precision
from src.outputs import codedeps, folders, hashing
from src.outputs.atomic import TEMP_TAG

log = logging.getLogger(__name__)

# stage -> the paths key of its output
CACHED_STAGES: dict[str, str] = {"prepare": "prepared", "extract": "features"}


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _code(stage: str) -> dict[str, str]:
    """The sha256 of each source file that `python -m src.<stage>` runs."""
    return {
        f: hashlib.sha256((REPO_ROOT / f).read_bytes()).hexdigest()
        for f in codedeps.code_deps(f"src.stages.{stage}")
    }


def _read_info(folder: Path) -> dict:
    try:
        return json.loads((folder / "info.json").read_text())
    except (OSError, ValueError):
        return {}


def stage_key(cfg: DictConfig, stage: str) -> str:
    """The key of the output `stage` would produce for `cfg`, given its inputs on disk."""
    if stage == "prepare":
        source = json.loads((resolve_path(cfg.paths.raw) / "source.json").read_text())
        dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
        dataset.pop("path", None)  # where the files are does not matter, what they are does
        return _digest("prepare", dataset, source.get("fingerprint"), _code(stage))
    if stage == "extract":
        upstream = _read_info(resolve_path(cfg.paths.prepared)).get("cache_key")
        model = OmegaConf.to_container(cfg.model, resolve=True)
        weights = cfg.model.get("weights")
        if weights not in (None, "imagenet"):  # the file's content, not its name
            model["weights"] = hashing.file_digest(resolve_input(weights), hashing.store(cfg))
        policy = precision.resolve(cfg.train.precision)
        return _digest("extract", model, cfg.dataset.image_size, policy, upstream, _code(stage))
    raise KeyError(stage)


def cache_dir(cfg: DictConfig) -> Path:
    """`paths.cache`, made with the pipeline's marker when it is not there yet: concurrent jobs
    share it, and one job's checks must never see it unmarked with another's lock file in it."""
    return folders.claim(resolve_path(cfg.paths.cache))


def raw_dir(cfg: DictConfig) -> Path:
    """The raw-data folder of `src.train` for this dataset (`<paths.cache>/raw/<digest>`), never
    DVC's `paths.raw`: a `dvc repro download` may rewrite that while a run reads it."""
    path = cfg.dataset.get("path")
    where = None if path is None else str(resolve_input(path).resolve())
    return cache_dir(cfg) / "raw" / _digest("raw", cfg.dataset.name, where)


def _matches(folder: Path, key: str) -> bool:
    return _read_info(folder).get("cache_key") == key


def find(cfg: DictConfig, stage: str, key: str) -> Path | None:
    """The output of `stage` with this key in the cache (`<paths.cache>/<stage>/<key>/`), if any.
    The DVC output is never returned: `dvc repro` may replace it while it is read."""
    folder = cache_dir(cfg) / stage / key
    return folder if _matches(folder, key) else None


def _link_or_copy(src_fd: int, name: str, dst: Path) -> str:
    """Hard-link file `name` of the folder open as `src_fd` to `dst`, or copy it where links are
    refused (another filesystem, no permission). Returns "hardlink" or "copy". A source file
    that is gone raises FileNotFoundError."""
    try:
        os.link(name, dst, src_dir_fd=src_fd)
        return "hardlink"
    except OSError as err:
        if err.errno == errno.ENOENT:
            raise
    with (
        open(name, "rb", opener=lambda p, flags: os.open(p, flags, dir_fd=src_fd)) as src,
        open(dst, "wb") as out,
    ):
        shutil.copyfileobj(src, out, 1 << 20)
    return "copy"


def _copy_tree(src_fd: int, dst: Path, last: str | None = None) -> set[str]:
    """Every file under the folder open as `src_fd` into `dst` (which exists), `last` after the
    others; the pipeline's marker and temp entries are left out. Returns how files came over."""
    how: set[str] = set()
    names = sorted(os.listdir(src_fd), key=lambda n: (n == last, n))
    for name in names:
        if name == folders.MARKER or (name.startswith(".") and TEMP_TAG in name):
            continue
        if stat.S_ISDIR(os.stat(name, dir_fd=src_fd).st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=src_fd)
            try:
                (dst / name).mkdir(exist_ok=True)
                how |= _copy_tree(sub, dst / name)
            finally:
                os.close(sub)
        else:
            how.add(_link_or_copy(src_fd, name, dst / name))
    return how


def snapshot(source: Path, target: Path, key: str) -> Path | None:
    """Copy the output in `source` (a DVC output that holds `key`) to `target`, a cache folder
    nothing else writes; returns `target`, or None when `source` does not hold `key` or stopped
    holding it while it was copied (replaced meanwhile: the copy is discarded).

    The files are hard-linked where the filesystem allows, else copied, into a staging folder
    beside `target`, from the source folder opened once (a folder renamed away meanwhile is still
    the one read; one removed meanwhile fails the copy). `info.json` comes last; the copy is moved
    into place only if the copied `info.json` carries `key` and the source's `info.json` is still
    the file it was when the copy began."""
    try:
        src_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    built = None
    try:
        before = os.stat("info.json", dir_fd=src_fd)
        with open("info.json", "rb", opener=lambda p, flags: os.open(p, flags, dir_fd=src_fd)) as f:
            if json.loads(f.read()).get("cache_key") != key:
                return None
        built = folders.staging_dir(target)
        how = _copy_tree(src_fd, built, last="info.json")
        after = os.stat("info.json", dir_fd=src_fd)
        same = (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
        if not same or not _matches(built, key):
            log.warning("%s changed while it was copied: not used", source)
            shutil.rmtree(built, ignore_errors=True)
            return None
    except (OSError, ValueError) as err:  # gone or rewritten midway
        log.warning("%s could not be copied (%s): not used", source, err)
        if built is not None:
            shutil.rmtree(built, ignore_errors=True)
        return None
    except BaseException:
        if built is not None:
            shutil.rmtree(built, ignore_errors=True)
        raise
    finally:
        os.close(src_fd)
    folders.replace_dir(built, target)
    log.info("snapshot of %s in %s (%s)", source, target, " and ".join(sorted(how)) or "empty")
    return target


@contextmanager
def lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (an flock on `path`), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def reuse_or_run(cfg: DictConfig, stage: str, run: Callable[[DictConfig], dict]) -> dict:
    """Point `cfg.paths.<output>` at the matching output in the cache: one already there, a
    snapshot of the DVC output when that matches, or one built there.

    Returns the stage's info with `reused` (bool), `cache_key` and `folder` (the folder the
    later stages read) set, and `snapshot_of` when the DVC output was snapshotted."""
    out_key = CACHED_STAGES[stage]
    key = stage_key(cfg, stage)
    target = cache_dir(cfg) / stage / key
    extra: dict = {}
    found = find(cfg, stage, key)
    if found is None:
        with lock(target.with_name(f"{key}.lock")):
            found = find(cfg, stage, key)  # another job may have made it while we waited
            if found is None:
                dvc_output = resolve_path(cfg.paths[out_key])
                if dvc_output != target and _matches(dvc_output, key):
                    found = snapshot(dvc_output, target, key)
                    if found is not None:
                        extra["snapshot_of"] = str(dvc_output)
            if found is None:
                with open_dict(cfg):
                    cfg.paths[out_key] = str(target)
                log.info("%s: building %s (key %s)", stage, target, key)
                info = run(cfg)
                return {**info, "reused": False, "cache_key": key, "folder": str(target)}
    with open_dict(cfg):
        cfg.paths[out_key] = str(found)
    log.info("%s: reusing %s (key %s), not recomputed", stage, found, key)
    return {**_read_info(found), "reused": True, "cache_key": key, "folder": str(found), **extra}
