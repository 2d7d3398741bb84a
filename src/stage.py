"""The thin entry point every DVC stage shares: load params.yaml, validate, run, summarise.

Each stage module ends with `if __name__ == "__main__": stage.main("<name>", run)`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from src.config import ConfigError, load_params, resolve_path, validate

log = logging.getLogger("src")


class StageError(RuntimeError):
    """A failure with a message meant for the user (bad input, missing file, offline)."""


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically: a temp file beside `path`, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def summary_path(cfg: DictConfig, name: str) -> Path:
    """Where a stage's summary (counts, timings) goes: `reports/<stage>.json`."""
    return resolve_path(cfg.paths.reports) / f"{name}.json"


def timed_run(name: str, run: Callable[[DictConfig], dict], cfg: DictConfig) -> dict:
    """Run a stage, add its wall time, write its summary JSON and return it."""
    start = time.perf_counter()
    result = run(cfg)
    result["seconds"] = round(time.perf_counter() - start, 2)
    write_json(summary_path(cfg, name), result)
    log.info("%s done in %.1f s", name, result["seconds"])
    return result


def main(name: str, run: Callable[[DictConfig], dict]) -> None:
    """Entry point of `python -m src.<stage>`: exits 2 on a bad config, 1 on a stage error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = validate(load_params())
        timed_run(name, run, cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def staging_dir(final: Path) -> Path:
    """A fresh temp folder beside `final` to build an output in before `replace_dir`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    built.chmod(0o755)  # mkdtemp makes it private; outputs are ordinary folders
    return built


def replace_dir(built: Path, final: Path) -> Path:
    """Move a fully built folder into place, replacing the old one only now."""
    import shutil

    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        os.replace(final, old / "x")
        os.replace(built, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, final)
    return final
