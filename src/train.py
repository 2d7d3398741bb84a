"""Run the pipeline in one process for a Hydra-composed config:

    python -m src.train                                  # defaults
    python -m src.train experiment=ci head.dropout=0.3   # a preset plus overrides
    python -m src.train -m finetune.layers=4,8           # a Hydra multirun, one job per value

Unlike `dvc repro`, this reads `conf/` directly (not params.yaml) and runs every stage; it
returns the test accuracy, so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from src import download, evaluate, extract, finetune, prepare, stage, train_head
from src.config import ConfigError, validate

log = logging.getLogger(__name__)

STAGES: list[tuple[str, Callable[[DictConfig], dict]]] = [
    ("download", download.run),
    ("prepare", prepare.run),
    ("extract", extract.run),
    ("train_head", train_head.run),
    ("finetune", finetune.run),
    ("evaluate", evaluate.run),
]


def train(cfg: DictConfig) -> dict[str, dict]:
    """Validate `cfg`, run all stages in order, return each stage's summary."""
    validate(cfg)
    return {name: stage.timed_run(name, run, cfg) for name, run in STAGES}


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    try:
        results = train(cfg)
    except (ConfigError, stage.StageError) as err:
        log.error("%s", err)
        sys.exit(2 if isinstance(err, ConfigError) else 1)
    accuracy = results["evaluate"]["test"]["accuracy"]
    log.info("test accuracy %.4f", accuracy)
    return accuracy


if __name__ == "__main__":
    main()
