"""Compose `conf/` with Hydra, write and load `params.yaml`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from src.config.checks import masked, validate
from src.config.paths import CONF_DIR, PARAMS_FILE, REPO_ROOT, portable_input, resolve_input
from src.config.schema import BACKBONES
from src.config.schema import register as register_schema
from src.errors import ConfigError
from src.outputs.atomic import atomic_file

_checking = False  # set while a resolver validates the config it is part of


def _check_composition(root: DictConfig) -> None:
    """Validate the config being resolved (all but the derived `inputs`, which are being
    resolved). This is how DVC's own Hydra composition (`dvc exp run -S ...`) refuses a bad
    value before it writes params.yaml or deletes any output."""
    global _checking
    if _checking:
        return
    _checking = True
    try:
        validate(OmegaConf.masked_copy(root, [key for key in root if key != "inputs"]))
    finally:
        _checking = False


def input_path(value: object, stand_in: str, *, _root_: DictConfig) -> str:
    """The file or folder DVC should hash for a configured input (`dataset.path`,
    `model.weights`): the input itself when it is a path; otherwise (`null`, `imagenet`:
    nothing on disk to hash, the code that fetches or initialises it decides) `stand_in`, a
    source file the stage depends on anyway. The whole config is validated first.

    A relative path stays as written (`../shared/...`, a tracked folder of the repository) where
    `portable_input` makes it reach the same data from DVC's experiment copies too, so that
    params.yaml and dvc.lock read the same in every clone that keeps its data at the same
    place; any other is given absolute."""
    _check_composition(_root_)
    if value in (None, "imagenet", "???"):
        return stand_in
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and (REPO_ROOT / path).exists() and portable_input(path):
        return path.as_posix()
    return str(resolve_input(str(value)).resolve())


def top_block(model: str) -> int:
    """How many layers `finetune=top_block` unfreezes: the top block of pretrained base `model`;
    0 for a model trained from scratch (no base: it trains whole, the finetune section unused)."""
    return int(BACKBONES.get(model, {}).get("top_block", 0))


def register_resolvers() -> None:
    """The schema (Hydra's ConfigStore) and the OmegaConf resolvers that `conf/` uses; also
    loaded by DVC's Hydra composition (`hydra_plugins/`)."""
    register_schema()
    OmegaConf.register_new_resolver("input_path", input_path, replace=True)
    OmegaConf.register_new_resolver("top_block", top_block, replace=True)


register_resolvers()


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides and resolve interpolations (which runs the
    checks: see `input_path`).

    An unknown key, group or preset, or a refused value, is a ConfigError naming it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise config_error(err, overrides) from None
    return resolve(cfg, overrides)


def resolve(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """Resolve `cfg`'s interpolations in place (the derived `inputs`, whose resolver validates
    the whole config); a refused value is a ConfigError, not OmegaConf's wrapping of it."""
    from omegaconf.errors import OmegaConfBaseException

    if OmegaConf.is_missing(cfg.dataset, "path"):
        raise ConfigError("dataset.path is required for dataset=folder: set dataset.path=/path/to/images")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise config_error(err, overrides) from None
    return cfg


def config_error(err: BaseException, overrides: Sequence[str]) -> ConfigError:
    """One line for a composition or resolution error: a check's own message, the key and value
    that did not fit its type, or Hydra's message (unknown group or preset)."""
    from omegaconf.errors import OmegaConfBaseException

    given = f"overrides: {masked(' '.join(overrides)) or 'none'}"
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ConfigError):  # a check that failed while resolving
            return ConfigError(f"{cause} ({given})")
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            key = str(cause.full_key).split("[")[0]
            value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith(f"{key}=")), "?")
            value, reason = masked(value), masked(str(cause).splitlines()[0])
            return ConfigError(
                f"{key}={value} is not allowed: {reason} (its type is in src/config/schema.py; {given})"
            )
        cause = cause.__cause__ or cause.__context__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = masked(" ".join(lines).split(" Config search path:")[0]) or type(err).__name__
    return ConfigError(f"{message} ({given})")


def to_yaml(cfg: DictConfig) -> str:
    """The YAML text of a composed config, as DVC's Hydra composition writes it."""
    return OmegaConf.to_yaml(cfg)


def write_params(cfg: DictConfig, path: Path = PARAMS_FILE) -> Path:
    """Write `cfg` to `path` atomically (temp file in the same folder, then rename)."""
    with atomic_file(path) as tmp:
        tmp.write_text(to_yaml(cfg), encoding="utf-8")
    return path


def load_params(path: Path | str = PARAMS_FILE) -> DictConfig:
    """Load the composed parameters that DVC tracks (`params.yaml`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: create it with `python -m src.params`")
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    return cfg
