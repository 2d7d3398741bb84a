"""Content-addressed reuse of prepared data and extracted features for `python -m src.train`.

Which cache serves which command: under `dvc repro` and `dvc exp run` (queued or not) every
stage output is in DVC's cache and unchanged stages are skipped, checked out or restored from
DVC's run-cache; the stage entry points (`python -m src.stages.prepare`, `src.extract`) never call
`reuse_or_run` and never read or fill `<paths.cache>/<stage>/`. They only record their key in
`info.json`, so that `src.train` can reuse what DVC produced or pulled. This module serves
what DVC cannot: `python -m src.train` outside DVC and its Hydra multiruns, whose jobs share
prepared data and features.

A stage output is identified by a key: the sha256 of everything that determines it (the config
subtree the stage reads, the fingerprint of its input, the source of the code that makes it: the
stage module and every `src` module it imports, as `src.codedeps` finds them).
`prepare` and `extract` record their key in `info.json`. Before running one of them, a job looks
for an output with the same key, first where `dvc repro` leaves it (`paths.prepared`,
`paths.features`), then under `<paths.cache>/<stage>/<key>/`, and reuses it; otherwise it builds
it there, holding a lock so that parallel jobs wanting the same output build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from src.config.paths import REPO_ROOT, resolve_input, resolve_path
from src.fitting import precision
from src.outputs import codedeps, hashing

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


def find(cfg: DictConfig, stage: str, key: str) -> Path | None:
    """An existing output of `stage` with this key: the DVC output first, then the cache."""
    out_key = CACHED_STAGES[stage]
    for folder in (resolve_path(cfg.paths[out_key]), resolve_path(cfg.paths.cache) / stage / key):
        if _read_info(folder).get("cache_key") == key:
            return folder
    return None


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
    """Point `cfg.paths.<output>` at a matching output, building it in the cache if none exists.

    Returns the stage's info with `reused` (bool) and `cache_key` set.
    """
    out_key = CACHED_STAGES[stage]
    key = stage_key(cfg, stage)
    found = find(cfg, stage, key)
    if found is None:
        target = resolve_path(cfg.paths.cache) / stage / key
        with lock(target.with_name(f"{key}.lock")):
            found = find(cfg, stage, key)  # another job may have built it while we waited
            if found is None:
                with open_dict(cfg):
                    cfg.paths[out_key] = str(target)
                log.info("%s: building %s (key %s)", stage, target, key)
                info = run(cfg)
                return {**info, "reused": False, "cache_key": key}
    with open_dict(cfg):
        cfg.paths[out_key] = str(found)
    log.info("%s: reusing %s (key %s), not recomputed", stage, found, key)
    return {**_read_info(found), "reused": True, "cache_key": key}
