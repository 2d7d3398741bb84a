"""Cross-field checks of a configuration, run after the schema (`src.config.schema.typed`):
layers against the backbone, input size against the model, a weights file against the model,
and output folders the pipeline may own. `validate` runs both and is what every entry point
calls: `src.params`, each stage, each `src.train` job, and DVC's own Hydra composition (through
the `input_path` resolver of conf/config.yaml), so a bad value stops a run before DVC deletes
anything."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from omegaconf import DictConfig, OmegaConf

from src.config.paths import REPO_ROOT, resolve_input, resolve_path
from src.config.schema import BACKBONES, EXPORT_FORMATS, OPTUNA_TRIAL_KEY, typed
from src.errors import ConfigError
from src.outputs.folders import made_here

# The pipeline's output folders (`paths.*`); `downloads` keeps archives, never replaced wholesale.
OUTPUT_KEYS = ("raw", "downloads", "prepared", "features", "models", "reports", "cache")
# Folders of the repository the pipeline writes into freely: what is below them is its own.
OUTPUT_ROOTS = ("data", "models", "reports")
# Folders of the repository that are never an output nor hold one: code, configs, metadata, the
# MLflow store, a virtualenv. (Hydra's run and sweep folders exist without the pipeline's marker:
# an existing one is refused like any folder the pipeline did not make; a new subfolder is fine.)
RESERVED = (
    "src",
    "conf",
    "tests",
    "benchmarks",
    "docs",
    "hydra_plugins",
    ".git",
    ".dvc",
    ".ci",
    ".pipeline",
    "mlruns",
    ".venv",
)
# A conv base's weight file, recognised by its convolution kernels: (how many, the first one's shape).
# (Xception: 6 convolutions, and a depthwise and a pointwise kernel for each of 34 separable ones.)
WEIGHT_SIGNATURES = {
    "vgg16": (13, (3, 3, 3, 64)),
    "resnet50": (53, (7, 7, 3, 64)),
    "xception": (74, (3, 3, 3, 32)),
}


def _bad(key: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def is_pretrained(cfg: DictConfig) -> bool:
    """Whether the model is a pretrained conv base (features extracted) or trained from scratch."""
    return cfg.model.name in BACKBONES


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


def _owned(folder: Path, root: Path) -> bool:
    """Whether the pipeline may write `folder`: below one of its output roots in the repository,
    not there yet, empty, or made by the pipeline (its marker file)."""
    if any(folder.is_relative_to((root / name).resolve()) for name in OUTPUT_ROOTS):
        return True
    if not folder.exists():
        return True
    return folder.is_dir() and (not any(folder.iterdir()) or made_here(folder))


def check_output_paths(cfg: DictConfig, root: Path = REPO_ROOT) -> None:
    """Refuse output folders the pipeline does not own (see `_owned`), and any that would replace
    or sit inside what the user owns: the dataset, the weights file, the repository's code,
    configs, metadata, MLflow store, Hydra folders and virtualenv; that are (or hold) the
    repository root or the home folder; or that overlap one another."""
    root = root.resolve()
    outputs = {key: resolve_path(cfg.paths[key]).resolve() for key in OUTPUT_KEYS if key in cfg.paths}
    holders = {"the repository root": root, "the home folder": Path.home().resolve()}
    inputs: dict[str, Path] = {}
    if cfg.dataset.path not in (None, "???"):
        inputs["dataset.path"] = resolve_input(cfg.dataset.path).resolve()
    weights = cfg.model.get("weights")
    if weights not in (None, "imagenet"):
        inputs["model.weights"] = resolve_input(weights).resolve()
    reserved = {f"{name}/ of the repository": (root / name).resolve() for name in RESERVED}
    for key, out in outputs.items():
        shown = cfg.paths[key]
        for name, path in holders.items():
            if path.is_relative_to(out):
                raise _bad(f"paths.{key}", shown, f"it is or holds {name} ({path}): use a subfolder")
        for name, path in {**inputs, **reserved}.items():
            if _overlaps(out, path):
                raise _bad(f"paths.{key}", shown, f"it overlaps {name} ({path}): choose another folder")
        if not _owned(out, root):
            raise _bad(
                f"paths.{key}",
                shown,
                f"{out} exists and was not made by this pipeline (no marker file in it), and the "
                "pipeline replaces what it writes: use a folder under data/, models/ or reports/, "
                "a new folder, or one the pipeline made",
            )
    keys = list(outputs)
    for i, key in enumerate(keys):
        for other in keys[i + 1 :]:
            if _overlaps(outputs[key], outputs[other]):
                raise _bad(
                    f"paths.{key}", cfg.paths[key], f"it overlaps paths.{other}: give each its own folder"
                )


# Where the credentials of each kind of store go instead of its URI (the URI lands in params.yaml,
# dvc.lock, reports, DVC's run-cache and MLflow params).
CREDENTIAL_HOMES = {
    "http": "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)",
    "postgresql": "PGPASSWORD or ~/.pgpass",
    "mysql": "a MySQL option file (~/.my.cnf)",
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile, AWS_PROFILE)",
}
SECRET_QUERY_KEYS = re.compile(r"pass|token|secret|key|auth|sig", re.IGNORECASE)
USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


SECRET_QUERY_VALUE = re.compile(
    r"([?&][^=&\s]*(?:pass|token|secret|key|auth|sig)[^=&\s]*=)[^&\s'\"]+", re.IGNORECASE
)


def masked(text: str) -> str:
    """`text` with the user part of any URI in it (`//user:password@`) and the values of secret-
    looking query parameters (`?token=...`) shown as `***`."""
    return SECRET_QUERY_VALUE.sub(r"\1***", USERINFO.sub("***@", text))


RECORDS = "params.yaml, dvc.lock, reports and MLflow"  # where a configured URI is written


def credentials_problem(
    key: str, uri: str | None, written_to: str = RECORDS, home: str | None = None
) -> str | None:
    """What is wrong when `uri` carries credentials (a password, a user name or token before `@`
    of a web URI, a query parameter that looks secret), never repeating them; None otherwise."""
    if not uri or "://" not in uri:
        return None
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    family = "http" if scheme in ("http", "https") else scheme
    secret_query = [k for k, _ in parse_qsl(parts.query) if SECRET_QUERY_KEYS.search(k)]
    if parts.password is None and not secret_query and not (family == "http" and parts.username):
        return None  # a database user name alone is no secret
    home = home or CREDENTIAL_HOMES.get(family, "the environment variables or files the store's client reads")
    return (
        f"{key} carries credentials ({masked(uri).split('?')[0]}): they would be written to "
        f"{written_to}. Give the URI without them and put them in {home}"
    )


def refuse_credentials(key: str, uri: str | None, written_to: str = RECORDS, home: str | None = None) -> None:
    """A ConfigError when `uri` carries credentials (see `credentials_problem`)."""
    if problem := credentials_problem(key, uri, written_to, home):
        raise ConfigError(problem)


DVC_CONFIG = REPO_ROOT / ".dvc" / "config"  # committed; .dvc/config.local beside it is not
# Options of a DVC remote that hold credentials (S3, Azure, GCS, SSH, HTTP, WebDAV remotes).
DVC_SECRET_OPTIONS = re.compile(
    r"secret|password|token|key_id|credential|account_key|sas|connection_string|keyfile", re.IGNORECASE
)
DVC_REMOTE_SECTION = re.compile(r"""^\s*\[\s*['"]?remote\s+"(?P<name>[^"]+)"['"]?\s*\]""")


def remote_credentials(config_file: Path = DVC_CONFIG) -> None:
    """A ConfigError when a DVC remote in the committed `.dvc/config` carries credentials (a
    secret option, or a URL or S3 endpoint with a password in it), naming the remote and the
    option, never the value, and where they go instead: `.dvc/config.local` or AWS_*."""
    if not config_file.is_file():
        return
    remote = None
    for number, line in enumerate(config_file.read_text(errors="replace").splitlines(), 1):
        if line.lstrip().startswith("["):
            found = DVC_REMOTE_SECTION.match(line)
            remote = found["name"] if found else None
            continue
        if remote is None or "=" not in line:
            continue
        option, value = (part.strip() for part in line.split("=", 1))
        secret = bool(DVC_SECRET_OPTIONS.search(option))
        in_uri = option in ("url", "endpointurl") and credentials_problem(option, value) is not None
        if secret or in_uri:
            raise ConfigError(
                f"{config_file}:{number}: DVC remote {remote!r} has credentials in {option!r}, and this "
                "file is committed with the repository. Keep them out of it: "
                f"`dvc remote modify --local {remote} {option} ...` writes them to .dvc/config.local "
                f"(never committed), or give S3 remotes {CREDENTIAL_HOMES['s3']}"
                + ("; and the URL without them" if in_uri else "")
            )


def _check_model(cfg: DictConfig) -> None:
    size = cfg.dataset.image_size
    if is_pretrained(cfg):
        spec = BACKBONES[cfg.model.name]
        if size < spec["min_size"]:
            raise _bad(
                "dataset.image_size",
                size,
                f"{cfg.model.name} needs at least {spec['min_size']} px (its strided blocks would leave "
                "nothing of a smaller image)",
            )
        cuts = spec.get("cuts")
        if cuts is not None and cfg.finetune.layers not in cuts and cfg.finetune.layers <= spec["layers"]:
            below = max(c for c in cuts if c < cfg.finetune.layers)
            above = min(c for c in cuts if c > cfg.finetune.layers)
            raise _bad(
                "finetune.layers",
                cfg.finetune.layers,
                f"it cuts inside a block of {cfg.model.name}, whose side branch would stay frozen; the "
                f"nearest counts that unfreeze whole blocks are {below} and {above} (all: "
                f"{', '.join(map(str, cuts))})",
            )
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
        return
    if cfg.model.weights is not None:
        raise _bad("model.weights", cfg.model.weights, f"{cfg.model.name} is trained from scratch: use null")
    if any(f < 1 for f in cfg.model.filters) or not cfg.model.filters:
        raise _bad("model.filters", list(cfg.model.filters), "must be a non-empty list of positive integers")
    if size < 2 ** len(cfg.model.filters):
        blocks = len(cfg.model.filters)
        raise _bad("dataset.image_size", size, f"{blocks} pooling blocks need at least {2**blocks} px")
    if cfg.head.epochs < 1:  # train_head trains the whole network
        raise _bad("head.epochs", cfg.head.epochs, f"{cfg.model.name} is trained by train_head: use >= 1")


def _check_refit(cfg: DictConfig) -> None:
    """`finetune.refit` trains on the validation images: refuse what needs them held out."""
    if not cfg.finetune.refit:
        return
    if cfg.evaluate.temperature_scaling:
        raise _bad(
            "finetune.refit",
            True,
            "it trains on the validation images, which evaluate.temperature_scaling fits the temperature "
            "on: set one of them to false",
        )
    if cfg.get(OPTUNA_TRIAL_KEY) is not None:
        raise _bad(
            "finetune.refit",
            True,
            "an Optuna study ranks trials by validation accuracy, which a refit on the validation images "
            "leaves none of: sweep without it, then refit the chosen recipe",
        )


def validate(cfg: DictConfig) -> DictConfig:
    """The typed config, or a ConfigError naming the key, the value and what is allowed; before
    any heavy work."""
    if OmegaConf.is_missing(cfg.dataset, "path") or (
        cfg.dataset.name == "folder" and cfg.dataset.path is None
    ):
        raise ConfigError("dataset.path is required for dataset=folder: set dataset.path=/path/to/images")
    cfg = typed(cfg)
    path = cfg.dataset.path
    if path is not None and not resolve_input(path).is_dir():
        raise _bad(
            "dataset.path",
            path,
            "must be an existing folder of class subfolders (relative paths start at the repository root)",
        )
    if any(u < 1 for u in cfg.head.units):
        raise _bad(
            "head.units", list(cfg.head.units), "must be a list of positive integers, e.g. [256] (or [])"
        )
    unknown = [f for f in cfg.export.formats if f not in EXPORT_FORMATS]
    if unknown or len(set(cfg.export.formats)) != len(cfg.export.formats):
        raise _bad(
            "export.formats",
            list(cfg.export.formats),
            f"a list of distinct formats of {list(EXPORT_FORMATS)}",
        )
    _check_model(cfg)
    _check_refit(cfg)
    check_output_paths(cfg)
    refuse_credentials("tracking.uri", cfg.tracking.uri)
    return cfg
