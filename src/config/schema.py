"""The pipeline's configuration schema: every key, its type, its default and its allowed values.

One dataclass per config group, registered in Hydra's ConfigStore as `base_<group>`; each
option file in `conf/<group>/` starts from it (`defaults: [base_<group>, _self_]`) and states
only what differs. `typed(cfg)` checks a composed or loaded config against the schema: an
unknown key (also one added with `+key=value`), a value of the wrong type, or one outside its
allowed values is a ConfigError naming the key. Cross-field checks live in `src.config.checks`.

Allowed values ride on each field's metadata: `choices`, `min`, `max`, `below` (exclusive).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional  # noqa: UP035 - OmegaConf reads Optional[...] annotations

from omegaconf import II, MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.errors import ConfigError

DATASETS = ("cats_vs_dogs", "gtsrb", "flowers", "cifar10", "folder")
# The pretrained conv bases: how many Keras layers follow the input, the smallest input side,
# the layers of the top block (what `finetune=top_block` unfreezes: VGG16's block 5 with its
# pooling, Xception's block 14, ResNet50's last residual block) and, for bases whose top layers
# come in blocks with side branches, the `finetune.layers` values that cut between blocks (where
# one tensor flows), counted from the top. Xception: 6 is block 14 (its two separable
# convolutions, not a residual block), 16 adds block 13, each further 10 one more middle-flow
# block (12 down to 4), 116 adds block 3 of the entry flow, and 125-131 reach into blocks 2 and 1.
# VGG16 is sequential: any count cuts it cleanly. ResNet50 cuts cleanly after each residual block
# only, but fine-tunes from any count (running the whole network).
BACKBONES = {
    "vgg16": {"layers": 18, "min_size": 32, "top_block": 4},
    "resnet50": {"layers": 174, "min_size": 32, "top_block": 10},
    "xception": {
        "layers": 131,
        "min_size": 71,
        "top_block": 6,
        "cuts": (
            0,
            1,
            2,
            3,
            4,
            5,
            6,
            16,
            26,
            36,
            46,
            56,
            66,
            76,
            86,
            96,
            106,
            116,
            125,
            126,
            127,
            128,
            129,
            130,
            131,
        ),
    },
}
SCRATCH_MODELS = ("small_cnn",)
OPTIMIZERS = ("rmsprop", "adam", "sgd")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")  # see src/fitting/precision.py
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")  # see src/fitting/distribute.py
MAX_IMAGE_SIZE = 1024  # px per side: 1024² x 3 bytes is 3 MB per image before any model sees it
# Keys a job may carry beyond the schema: set by a Hydra sweeper, not by users.
OPTUNA_TRIAL_KEY = "optuna_trial_id"  # the Optuna trial an `optuna_study` sweep's job runs
RUNTIME_KEYS = (OPTUNA_TRIAL_KEY,)
# The node of a stage's view of the config that names the pipeline run it logs to (derived from
# the whole config by `src.tracking.store.run_identity`; never set by users).
RUN_NODE = "run"


def _allowed(**rules: Any) -> dict[str, Any]:
    return {"allowed": rules}


@dataclass
class PathsConfig:
    raw: str = "data/raw"  # download: the raw images (or a pointer to a local copy)
    downloads: str = "data/downloads"  # cache of downloaded archives (not a pipeline output)
    prepared: str = "data/prepared"  # prepare: resized uint8 arrays, labels, class list, manifest
    features: str = "data/features"  # extract: conv-base features per split
    models: str = "models"  # train_head / finetune: Keras models
    reports: str = "reports"  # stage summaries, metrics, plots
    cache: str = "data/cache"  # prepared data and features reused across runs, by content key


@dataclass
class SplitConfig:
    val_fraction: float = field(default=0.2, metadata=_allowed(min=0, below=1))
    test_fraction: float = field(default=0.2, metadata=_allowed(min=0, below=1))
    test_from: str = field(default="train", metadata=_allowed(choices=("train", "val")))
    seed: int = 42


@dataclass
class LimitConfig:
    train: Optional[int] = field(default=None, metadata=_allowed(min=1))  # noqa: UP045
    val: Optional[int] = field(default=None, metadata=_allowed(min=1))  # noqa: UP045
    test: Optional[int] = field(default=None, metadata=_allowed(min=1))  # noqa: UP045


@dataclass
class DatasetConfig:
    name: str = field(default=MISSING, metadata=_allowed(choices=DATASETS))
    path: Optional[str] = None  # noqa: UP045
    # the model's own input size unless the dataset or preset sets one (model.image_size)
    image_size: int = field(default=II("model.image_size"), metadata=_allowed(min=8, max=MAX_IMAGE_SIZE))
    test_labels_csv: Optional[str] = None  # noqa: UP045
    unknown_labels: str = field(default="error", metadata=_allowed(choices=("error", "drop")))
    leakage: str = field(default="warn", metadata=_allowed(choices=("warn", "drop")))
    max_pixels: int = field(default=40_000_000, metadata=_allowed(min=1_000_000))
    split: SplitConfig = field(default_factory=SplitConfig)
    limit_per_class: LimitConfig = field(default_factory=LimitConfig)


@dataclass
class BackboneConfig:
    """A pretrained conv base from `keras.applications`."""

    name: str = field(default=MISSING, metadata=_allowed(choices=tuple(BACKBONES)))
    weights: Optional[str] = "imagenet"  # noqa: UP045 - imagenet | null | a .weights.h5 path
    # the size its ImageNet weights were trained at: dataset.image_size unless a dataset sets its own
    image_size: int = field(default=224, metadata=_allowed(min=8, max=MAX_IMAGE_SIZE))
    # per-image contrast normalisation before the backbone's own preprocessing: each image to zero
    # mean and unit variance over its pixels (networks.preprocessing), for photos whose light varies
    standardize: bool = False


@dataclass
class ScratchCNNConfig:
    """A small CNN trained from scratch (no features extracted)."""

    name: str = field(default=MISSING, metadata=_allowed(choices=SCRATCH_MODELS))
    weights: Optional[str] = None  # noqa: UP045
    image_size: int = field(default=180, metadata=_allowed(min=8, max=MAX_IMAGE_SIZE))  # dataset's default
    standardize: bool = False  # per-image contrast normalisation, as for a pretrained base
    filters: list[int] = field(default_factory=lambda: [32, 64, 128])
    convs_per_block: int = field(default=2, metadata=_allowed(min=1))
    batchnorm: bool = True


@dataclass
class HeadConfig:
    pooling: str = field(default="avg", metadata=_allowed(choices=("flatten", "avg")))
    activation: Optional[str] = field(  # noqa: UP045
        default="relu", metadata=_allowed(choices=("relu", "gelu", "tanh", None))
    )
    units: list[int] = field(default_factory=lambda: [256])
    dropout: float = field(default=0.5, metadata=_allowed(min=0, below=1))
    batchnorm: bool = False
    optimizer: str = field(default="adam", metadata=_allowed(choices=OPTIMIZERS))
    learning_rate: float = field(default=1e-3, metadata=_allowed(above=0))
    schedule: str = field(default="constant", metadata=_allowed(choices=SCHEDULES))
    epochs: int = field(default=30, metadata=_allowed(min=0))
    batch_size: int = field(default=32, metadata=_allowed(min=1))


@dataclass
class FinetuneConfig:
    layers: int = field(default=4, metadata=_allowed(min=0))
    optimizer: str = field(default="rmsprop", metadata=_allowed(choices=OPTIMIZERS))
    learning_rate: float = field(default=1e-5, metadata=_allowed(above=0))
    schedule: str = field(default="constant", metadata=_allowed(choices=SCHEDULES))
    epochs: int = field(default=10, metadata=_allowed(min=0))
    batch_size: int = field(default=32, metadata=_allowed(min=1))
    cached_activations: bool = True
    # frozen: batch normalisation of the unfrozen top keeps its ImageNet statistics (inference mode);
    # adapt: it trains, its statistics following new images far from ImageNet's (small upscaled signs)
    batchnorm: str = field(default="frozen", metadata=_allowed(choices=("frozen", "adapt")))
    # after the recipe is chosen on validation: fine-tune on train and val together for `epochs`
    # and keep the last epoch (no held-out validation is left to pick one by, or to fit a temperature on)
    refit: bool = False


@dataclass
class AugmentConfig:
    flip: Optional[str] = field(  # noqa: UP045
        default="horizontal",
        metadata=_allowed(choices=(None, "horizontal", "vertical", "horizontal_and_vertical")),
    )
    rotation: float = field(default=0.1, metadata=_allowed(min=0, max=1))
    zoom: float = field(default=0.2, metadata=_allowed(min=0, max=1))
    translate: float = field(default=0.0, metadata=_allowed(min=0, max=1))
    shear: float = field(default=0.0, metadata=_allowed(min=0, max=1))
    # photometric: up to this fraction of the pixel range added (brightness) or of the contrast
    # scaled away or added; what varies between photos of one object (light, exposure, haze)
    brightness: float = field(default=0.0, metadata=_allowed(min=0, max=1))
    contrast: float = field(default=0.0, metadata=_allowed(min=0, max=1))
    # blend pairs of training examples and their labels (src/data/mixing.py): MixUp or CutMix,
    # with weights drawn from Beta(mix_alpha, mix_alpha)
    mix: Optional[str] = field(default=None, metadata=_allowed(choices=(None, "mixup", "cutmix")))  # noqa: UP045
    mix_alpha: float = field(default=1.0, metadata=_allowed(above=0))


@dataclass
class TrainConfig:
    batch_size: int = field(default=32, metadata=_allowed(min=1))
    jit_compile: Any = field(default="auto", metadata=_allowed(choices=("auto", True, False)))
    precision: str = field(default="auto", metadata=_allowed(choices=PRECISIONS))
    strategy: str = field(default="auto", metadata=_allowed(choices=STRATEGIES))
    logical_cpus: int = field(default=0, metadata=_allowed(min=0))


@dataclass
class EvaluateConfig:
    bins: int = field(default=15, metadata=_allowed(min=1, max=1000))
    temperature_scaling: bool = False
    # test-time augmentation: also score the test (and validation) images averaged with this many
    # views drawn by the model's own augmentation block (src/evaluation/views.py); 0 = off
    tta_views: int = field(default=0, metadata=_allowed(min=0, max=64))


EXPORT_FORMATS = ("onnx", "tflite_float", "tflite_int8")  # see src/exporting/


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: list(EXPORT_FORMATS))
    representative_images: int = field(default=200, metadata=_allowed(min=1, max=100000))
    latency_runs: int = field(default=100, metadata=_allowed(min=1, max=100000))


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # noqa: UP045
    experiment: str = "transfer-learning"
    registered_model: Optional[str] = "image-classifier"  # noqa: UP045
    run_id: Optional[str] = None  # noqa: UP045


@dataclass
class InputsConfig:
    """Derived in conf/config.yaml (do not set): what DVC hashes for the inputs outside the pipeline."""

    images: str = MISSING
    weights: str = MISSING


@dataclass
class PipelineConfig:
    inputs: InputsConfig = field(default_factory=InputsConfig)
    preset: str = "default"
    seed: int = 42
    paths: PathsConfig = field(default_factory=PathsConfig)
    dataset: DatasetConfig = MISSING
    model: Any = MISSING  # BackboneConfig or ScratchCNNConfig, chosen by model.name
    head: HeadConfig = MISSING
    finetune: FinetuneConfig = MISSING
    augment: AugmentConfig = MISSING
    train: TrainConfig = MISSING
    evaluate: EvaluateConfig = MISSING
    export: ExportConfig = MISSING
    tracking: TrackingConfig = MISSING


GROUPS: dict[str, type] = {
    "dataset": DatasetConfig,
    "head": HeadConfig,
    "finetune": FinetuneConfig,
    "augment": AugmentConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "tracking": TrackingConfig,
    "paths": PathsConfig,
    "backbone": BackboneConfig,
    "scratch_cnn": ScratchCNNConfig,
}


def register() -> None:
    """Put the schema in Hydra's ConfigStore: `base_config`, and `base_<group>` in each group's
    folder (`model/base_backbone`, `model/base_scratch_cnn`)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_config", node=PipelineConfig)
    for group, node in GROUPS.items():
        folder = "model" if group in ("backbone", "scratch_cnn") else group
        store.store(group=folder, name=f"base_{group}", node=node)


def model_schema(name: object) -> type:
    return ScratchCNNConfig if name in SCRATCH_MODELS else BackboneConfig


def _check_value(key: str, value: object, rules: dict[str, Any]) -> None:
    def bad(allowed: str) -> ConfigError:
        return ConfigError(f"{key}={value!r} is not allowed: {allowed}")

    if "choices" in rules:
        choices = rules["choices"]
        if not any(value is c or (value == c and type(value) is type(c)) for c in choices):
            raise bad(
                "choose one of "
                + ", ".join(
                    "null" if c is None else str(c).lower() if isinstance(c, bool) else str(c)
                    for c in choices
                )
            )
        return
    if value is None:
        return
    low, high = rules.get("min"), rules.get("max", rules.get("below"))
    if rules.get("above") == 0:
        allowed = "must be a positive number"
    elif low is not None and high is not None:
        allowed = f"must be in [{low}, {high}{']' if 'max' in rules else ')'}"
    elif low is not None:
        allowed = f"must be >= {low}"
    else:
        allowed = f"must be <= {high}"
    too_low = ("min" in rules and value < rules["min"]) or ("above" in rules and value <= rules["above"])
    too_high = ("max" in rules and value > rules["max"]) or ("below" in rules and value >= rules["below"])
    if too_low or too_high:
        raise bad(allowed)


def _check_fields(node: DictConfig, schema: type, prefix: str) -> None:
    """Each field's allowed values (its metadata), nested dataclasses included."""
    for spec in dataclasses.fields(schema):
        key = f"{prefix}{spec.name}"
        nested = spec.default_factory
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            _check_fields(node[spec.name], nested, f"{key}.")
        elif "allowed" in spec.metadata:
            _check_value(key, node[spec.name], spec.metadata["allowed"])


def typed(cfg: DictConfig) -> DictConfig:
    """`cfg` (resolved) merged into the schema: a typed config, or a ConfigError naming the
    first unknown key, wrongly typed value or value outside what its field allows."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    runtime = {key: data.pop(key) for key in RUNTIME_KEYS if key in data}
    model = data.get("model") or {}
    schema = OmegaConf.structured(PipelineConfig)
    try:
        merged = OmegaConf.merge(schema, {k: v for k, v in data.items() if k != "model"})
        with_model = OmegaConf.merge(OmegaConf.structured(model_schema(model.get("name"))), model)
        merged.model = with_model
    except OmegaConfBaseException as err:
        raise ConfigError(_schema_message(err)) from None
    for group, schema_type in GROUPS.items():
        if group in merged and group not in ("backbone", "scratch_cnn"):
            _check_fields(merged[group], schema_type, f"{group}.")
    _check_fields(merged.model, model_schema(merged.model.name), "model.")
    if runtime:
        OmegaConf.set_struct(merged, False)
        merged.merge_with(runtime)
        OmegaConf.set_struct(merged, True)
    return merged


def _schema_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    first = str(err).splitlines()[0]
    if "not in" in first or "Key '" in first and "not" in first:
        parent = key.rsplit(".", 1)[0] if "." in key else "the config"
        return (
            f"{key} is not a known key ({first}): check its spelling; the keys of {parent} are "
            "listed in src/config/schema.py and conf/"
        )
    return f"{key}: {first} (see src/config/schema.py for its type)"
