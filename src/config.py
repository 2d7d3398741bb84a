"""One source of configuration: compose `conf/` with Hydra, load `params.yaml`, validate."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
PARAMS_FILE = REPO_ROOT / "params.yaml"

DATASETS = ("cats_vs_dogs", "gtsrb", "flowers", "cifar10", "folder")
# Pretrained conv bases: layers after the input (pooling included) and the smallest input side.
BACKBONES = {"vgg16": {"layers": 18, "min_size": 32}, "resnet50": {"layers": 174, "min_size": 32}}
SCRATCH_MODELS = ("small_cnn",)
OPTIMIZERS = ("rmsprop", "adam", "sgd")
POOLINGS = ("flatten", "avg")
HEAD_ACTIVATIONS = ("relu", "gelu", "tanh", None)
FLIPS = (None, "horizontal", "vertical", "horizontal_and_vertical")
SPLIT_SOURCES = ("train", "val")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")  # see src/precision.py


class ConfigError(ValueError):
    """A configuration value that the pipeline refuses, with the key and what is allowed."""


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides and resolve interpolations."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The YAML text of a composed config, as DVC's Hydra composition writes it."""
    return OmegaConf.to_yaml(cfg)


def write_params(cfg: DictConfig, path: Path = PARAMS_FILE) -> Path:
    """Write `cfg` to `path` atomically (temp file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, path)
    return path


def load_params(path: Path | str = PARAMS_FILE) -> DictConfig:
    """Load the composed parameters that DVC tracks (`params.yaml`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: create it with `python -m src.params`")
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    return cfg


def _bad(key: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _check_choice(cfg: DictConfig, key: str, choices: Sequence[object]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise _bad(key, value, f"choose one of {shown}")


def _check_fraction(cfg: DictConfig, key: str, upper_inclusive: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, (int, float)) and value >= 0 and (value <= 1 if upper_inclusive else value < 1)
    if not ok:
        raise _bad(
            key, value, "must be a number in [0, 1]" if upper_inclusive else "must be a number in [0, 1)"
        )


def _check_positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _bad(key, value, f"must be an integer >= {minimum}")


def is_pretrained(cfg: DictConfig) -> bool:
    """Whether the model is a pretrained conv base (features extracted) or trained from scratch."""
    return cfg.model.name in BACKBONES


def validate(cfg: DictConfig) -> DictConfig:
    """Refuse invalid values before any heavy work, naming the key, the value and what is allowed."""
    _check_choice(cfg, "dataset.name", DATASETS)
    _check_choice(cfg, "model.name", (*BACKBONES, *SCRATCH_MODELS))
    if OmegaConf.is_missing(cfg.dataset, "path"):
        raise ConfigError("dataset.path is required for dataset=folder: set dataset.path=/path/to/images")
    path = cfg.dataset.path
    if path is not None and not resolve_input(path).is_dir():
        raise _bad(
            "dataset.path",
            path,
            "must be an existing folder of class subfolders (relative paths start at the repository root)",
        )
    _check_positive_int(cfg, "dataset.image_size", 8)
    if is_pretrained(cfg):
        spec = BACKBONES[cfg.model.name]
        if cfg.dataset.image_size < spec["min_size"]:
            raise _bad(
                "dataset.image_size",
                cfg.dataset.image_size,
                f"{cfg.model.name} needs at least {spec['min_size']} px",
            )
        _check_positive_int(cfg, "finetune.layers", 0)
        if cfg.finetune.layers > spec["layers"]:
            raise _bad(
                "finetune.layers",
                cfg.finetune.layers,
                f"{cfg.model.name} has {spec['layers']} layers after its input (0..{spec['layers']})",
            )
        weights = cfg.model.weights
        if weights not in (None, "imagenet") and not resolve_input(weights).is_file():
            raise _bad(
                "model.weights", weights, "use imagenet, null, or the path of an existing .weights.h5 file"
            )
    else:
        if cfg.model.weights is not None:
            raise _bad(
                "model.weights", cfg.model.weights, f"{cfg.model.name} is trained from scratch: use null"
            )
        if cfg.dataset.image_size < 2 ** len(cfg.model.filters):
            raise _bad(
                "dataset.image_size",
                cfg.dataset.image_size,
                f"{len(cfg.model.filters)} pooling blocks need at least {2 ** len(cfg.model.filters)} px",
            )
    _check_fraction(cfg, "head.dropout")
    _check_choice(cfg, "head.pooling", POOLINGS)
    _check_choice(cfg, "head.activation", HEAD_ACTIVATIONS)
    _check_choice(cfg, "train.precision", PRECISIONS)
    _check_choice(cfg, "train.jit_compile", ("auto", True, False))
    _check_choice(cfg, "head.optimizer", OPTIMIZERS)
    _check_choice(cfg, "finetune.optimizer", OPTIMIZERS)
    _check_choice(cfg, "augment.flip", FLIPS)
    _check_choice(cfg, "dataset.split.test_from", SPLIT_SOURCES)
    for key in ("dataset.split.val_fraction", "dataset.split.test_fraction"):
        _check_fraction(cfg, key)
    for key in ("augment.rotation", "augment.zoom", "augment.translate", "augment.shear"):
        _check_fraction(cfg, key, upper_inclusive=True)
    for key in ("head.epochs", "finetune.epochs"):
        _check_positive_int(cfg, key, 0)
    for key in ("head.batch_size", "finetune.batch_size", "train.batch_size"):
        _check_positive_int(cfg, key)
    for key in ("head.learning_rate", "finetune.learning_rate"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or value <= 0:
            raise _bad(key, value, "must be a positive number")
    for split, limit in cfg.dataset.limit_per_class.items():
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise _bad(f"dataset.limit_per_class.{split}", limit, "must be null or an integer >= 1")
    return cfg


def resolve_path(path: str | Path) -> Path:
    """A configured path: absolute as given, relative ones from the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def project_root(root: Path = REPO_ROOT) -> Path:
    """The repository root; for DVC's queued experiments, which run in temporary copies under
    `.dvc/tmp/exps/`, the original repository."""
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def resolve_input(path: str | Path) -> Path:
    """A configured input (dataset folder, weights file): like `resolve_path`, except that in a
    DVC queue copy a relative path found only beside the original repository resolves there."""
    resolved = resolve_path(path)
    if not resolved.exists() and not Path(path).expanduser().is_absolute():
        original = project_root() / Path(path).expanduser()
        if original.exists():
            return original
    return resolved
