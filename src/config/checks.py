"""One source of configuration: compose `conf/` with Hydra, load `params.yaml`, validate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from src.config.compose import register_resolvers
from src.config.paths import CONF_DIR, REPO_ROOT, resolve_input, resolve_path
from src.errors import ConfigError

DATASETS = ("cats_vs_dogs", "gtsrb", "flowers", "cifar10", "folder")


# Pretrained conv bases: layers after the input (pooling included) and the smallest input side.
BACKBONES = {"vgg16": {"layers": 18, "min_size": 32}, "resnet50": {"layers": 174, "min_size": 32}}


SCRATCH_MODELS = ("small_cnn",)


OPTIMIZERS = ("rmsprop", "adam", "sgd")


SCHEDULES = ("constant", "cosine")


POOLINGS = ("flatten", "avg")


HEAD_ACTIVATIONS = ("relu", "gelu", "tanh", None)


FLIPS = (None, "horizontal", "vertical", "horizontal_and_vertical")


SPLIT_SOURCES = ("train", "val")


PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")  # see src/precision.py


STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")  # see src/distribute.py


MAX_IMAGE_SIZE = 1024  # px per side: 1024² x 3 bytes is 3 MB per image before any model sees it


# The pipeline's output folders (`paths.*`); `downloads` keeps archives, never replaced wholesale.
OUTPUT_KEYS = ("raw", "downloads", "prepared", "features", "models", "reports", "cache")


# A conv base's weight file, recognised by its convolution kernels: (how many, the first one's shape).
WEIGHT_SIGNATURES = {"vgg16": (13, (3, 3, 3, 64)), "resnet50": (53, (7, 7, 3, 64))}


register_resolvers()


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


def _check_int(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(key, value, "must be an integer")


def _check_units(cfg: DictConfig) -> None:
    units = OmegaConf.select(cfg, "head.units")
    ok = OmegaConf.is_list(units) and all(
        isinstance(u, int) and not isinstance(u, bool) and u >= 1 for u in units
    )
    if not ok:
        raise _bad("head.units", units, "must be a list of positive integers, e.g. [256] (or [] for none)")


def check_weights_file(model: str, path: Path, key: str = "model.weights") -> None:
    """Refuse, without loading TensorFlow, a weights file that is not HDF5 or whose convolution
    kernels are not those of `model` (e.g. VGG16 weights for ResNet50, or a saved `.keras` model)."""
    import h5py

    count, first = WEIGHT_SIGNATURES[model]
    kernels: list[tuple[int, ...]] = []
    try:
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda _, obj: (
                    kernels.append(tuple(obj.shape))
                    if isinstance(obj, h5py.Dataset) and len(obj.shape) == 4
                    else None
                )
            )
    except OSError as err:
        raise _bad(key, str(path), f"is not an HDF5 weights file ({err}); use a .weights.h5 file") from err
    first_seen = next((k for k in kernels if k[2] == 3), None)  # the kernel that sees the RGB input
    if len(kernels) != count or first_seen != first:
        raise _bad(
            key,
            str(path),
            f"holds {len(kernels)} convolution kernels (first {first_seen}), not the {count} of "
            f"{model} (first {first}): is it the weights of another model? use {model}'s conv-base weights",
        )


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_output_paths(cfg: DictConfig) -> None:
    """Refuse output folders that would replace or sit inside what the user owns: the dataset,
    the weights' folder, `conf/`, `src/`, `.git/`; or that are (or hold) the repository root or
    the home folder; or that overlap one another."""
    outputs = {key: resolve_path(cfg.paths[key]).resolve() for key in OUTPUT_KEYS if key in cfg.paths}
    protected: dict[str, Path] = {
        "conf/": CONF_DIR.resolve(),
        "src/": (REPO_ROOT / "src").resolve(),
        ".git/": (REPO_ROOT / ".git").resolve(),
    }
    if cfg.dataset.path not in (None, "???"):
        protected["dataset.path"] = resolve_input(cfg.dataset.path).resolve()
    weights = cfg.model.get("weights")
    if weights not in (None, "imagenet"):
        protected["the folder of model.weights"] = resolve_input(weights).resolve().parent
    holders = {"the repository root": REPO_ROOT.resolve(), "the home folder": Path.home().resolve()}
    for key, out in outputs.items():
        for name, path in holders.items():
            if path.is_relative_to(out):
                raise _bad(f"paths.{key}", cfg.paths[key], f"it is or holds {name} ({path}): use a subfolder")
        for name, path in protected.items():
            if _overlaps(out, path):
                raise _bad(
                    f"paths.{key}", cfg.paths[key], f"it overlaps {name} ({path}): choose another folder"
                )
    keys = list(outputs)
    for i, key in enumerate(keys):
        for other in keys[i + 1 :]:
            if _overlaps(outputs[key], outputs[other]):
                raise _bad(
                    f"paths.{key}", cfg.paths[key], f"it overlaps paths.{other}: give each its own folder"
                )


def validate(cfg: DictConfig) -> DictConfig:
    """Refuse invalid values before any heavy work, naming the key, the value and what is allowed."""
    _check_choice(cfg, "dataset.name", DATASETS)
    _check_choice(cfg, "model.name", (*BACKBONES, *SCRATCH_MODELS))
    _check_int(cfg, "seed")
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
    if cfg.dataset.image_size > MAX_IMAGE_SIZE:
        raise _bad("dataset.image_size", cfg.dataset.image_size, f"must be at most {MAX_IMAGE_SIZE} px")
    _check_units(cfg)
    for key in ("head.epochs", "finetune.epochs"):
        _check_positive_int(cfg, key, 0)
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
        if weights not in (None, "imagenet"):
            if not resolve_input(weights).is_file():
                raise _bad(
                    "model.weights",
                    weights,
                    "use imagenet, null, or the path of an existing .weights.h5 file",
                )
            check_weights_file(cfg.model.name, resolve_input(weights))
        fine_tuned = cfg.finetune.epochs > 0 and cfg.finetune.layers > 0
        if cfg.head.epochs == 0 and not fine_tuned:
            raise _bad(
                "head.epochs",
                0,
                "with no fine-tuning (finetune.epochs or finetune.layers 0) the model would stay untrained: "
                "train the head (head.epochs >= 1) or fine-tune",
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
        _check_positive_int(cfg, "head.epochs", 1)  # train_head trains the whole network
    _check_fraction(cfg, "head.dropout")
    _check_choice(cfg, "head.pooling", POOLINGS)
    _check_choice(cfg, "head.activation", HEAD_ACTIVATIONS)
    _check_choice(cfg, "train.precision", PRECISIONS)
    _check_choice(cfg, "train.jit_compile", ("auto", True, False))
    _check_choice(cfg, "train.strategy", STRATEGIES)
    _check_choice(cfg, "head.optimizer", OPTIMIZERS)
    _check_choice(cfg, "finetune.optimizer", OPTIMIZERS)
    _check_choice(cfg, "head.schedule", SCHEDULES)
    _check_choice(cfg, "finetune.schedule", SCHEDULES)
    _check_choice(cfg, "augment.flip", FLIPS)
    _check_choice(cfg, "dataset.split.test_from", SPLIT_SOURCES)
    _check_choice(cfg, "dataset.unknown_labels", ("error", "drop"))
    _check_choice(cfg, "dataset.leakage", ("warn", "drop"))
    _check_positive_int(cfg, "dataset.max_pixels", 1_000_000)
    _check_int(cfg, "dataset.split.seed")
    for key in ("dataset.split.val_fraction", "dataset.split.test_fraction"):
        _check_fraction(cfg, key)
    for key in ("augment.rotation", "augment.zoom", "augment.translate", "augment.shear"):
        _check_fraction(cfg, key, upper_inclusive=True)
    for key in ("head.batch_size", "finetune.batch_size", "train.batch_size"):
        _check_positive_int(cfg, key)
    for key in ("head.learning_rate", "finetune.learning_rate"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise _bad(key, value, "must be a positive number")
    for split, limit in cfg.dataset.limit_per_class.items():
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise _bad(f"dataset.limit_per_class.{split}", limit, "must be null or an integer >= 1")
    check_output_paths(cfg)
    return cfg
