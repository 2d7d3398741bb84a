"""The thin entry point every DVC stage shares: load params.yaml, validate, run, summarise.

Each stage module ends with `if __name__ == "__main__": stage.main("<name>", run)`."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from src.config.checks import validate
from src.config.compose import load_params
from src.config.paths import resolve_path
from src.errors import ConfigError, StageError
from src.outputs import folders
from src.outputs.atomic import write_json
from src.outputs.folders import clean_stale

log = logging.getLogger(__name__)


def summary_path(cfg: DictConfig, name: str) -> Path:
    """Where a stage's summary (counts, timings) goes: `reports/<stage>.json`."""
    return resolve_path(cfg.paths.reports) / f"{name}.json"


def clean_outputs(cfg: DictConfig) -> None:
    """Remove what killed runs left beside the outputs (see `clean_stale`)."""
    from src.config.checks import OUTPUT_KEYS

    folders = {resolve_path(cfg.paths[key]).parent for key in OUTPUT_KEYS if key in cfg.paths}
    folders.add(resolve_path(cfg.paths.models))
    folders |= {resolve_path(cfg.paths.cache) / name for name in ("prepare", "extract")}
    for folder in folders:
        clean_stale(folder)


def timed_run(name: str, run: Callable[[DictConfig], dict], cfg: DictConfig) -> dict:
    """Run a stage, add its wall time, write its summary JSON and return it. Temp folders left
    by killed runs are removed first."""
    clean_outputs(cfg)
    for key in ("models", "reports", "cache"):  # marked as the pipeline's when it makes them
        folders.claim(resolve_path(cfg.paths[key]))
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
