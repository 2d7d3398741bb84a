"""Where MLflow runs go and what they are called: the store (the local SQLite file unless a
server or another URI is configured), the experiment, run names from the settings that differ
from the preset, and metric and param keys every store accepts. Light enough for the training
stages, which log their epochs as they run (`src.tracking.live_metrics`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import time
from collections import defaultdict
from collections.abc import Iterable

from omegaconf import DictConfig, OmegaConf

from src.config.checks import masked
from src.config.paths import project_root
from src.config.schema import RUN_NODE
from src.errors import StageError

log = logging.getLogger(__name__)
STORE_DIR = project_root() / "mlruns"
# Key characters every MLflow store takes: letters, digits, `_ - . /` (not all take spaces or colons).
UNSAFE_KEY_CHARS = re.compile(r"[^\w./-]")
MAX_KEY_LENGTH = 250  # MLflow's limit on metric and param keys


def default_uri() -> str:
    return f"sqlite:///{STORE_DIR / 'mlflow.db'}"


def tracking_uri(cfg: DictConfig) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else the local SQLite store."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def use_store(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and select (creating if needed) the experiment.

    The experiment is marked as one of model training: MLflow's experiment-kind tag
    `mlflow.experimentKind` = `custom_model_development`, which MLflow's UI reads to open an
    experiment on its runs rather than on the GenAI overview (an experiment created without it,
    e.g. by an older checkout, gets it here; a kind someone chose is kept). UIs with a global
    "GenAI / Model training" switch in the sidebar follow that switch instead, or
    `?workflowType=machine_learning` in the experiment's URL."""
    import mlflow

    kind = {"mlflow.experimentKind": "custom_model_development"}
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment
    if mlflow.get_experiment_by_name(name) is None:
        location = None
        if uri == default_uri():
            STORE_DIR.mkdir(exist_ok=True)
            location = (STORE_DIR / "artifacts").as_uri()
        mlflow.create_experiment(name, artifact_location=location, tags=kind)
    experiment = mlflow.set_experiment(name)
    for key, value in kind.items():
        if key not in experiment.tags:
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


class StoreError(StageError):
    """The MLflow store could not be used: one line naming it, instead of a driver's traceback."""


STORE_TRIES = 4  # the first try and three more, 1, 2 and 4 s apart (a store locked for a moment)


def reach_store(cfg: DictConfig, tries: int | None = None) -> str:
    """`use_store`, tried again with growing pauses while the store refuses (locked, restarting);
    a StoreError naming the store (credentials masked) when it never answers."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    tries = tries or STORE_TRIES
    for attempt in range(tries):
        try:
            return use_store(cfg)
        except (MlflowException, SQLAlchemyError, OSError) as err:
            if attempt == tries - 1:
                raise store_error(cfg, err, f"after {tries} tries") from None
            log.warning("MLflow store not ready (%s); trying again", type(err).__name__)
            time.sleep(2**attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


def store_error(cfg: DictConfig, err: BaseException, when: str = "") -> StoreError:
    """One line for a failure of the MLflow store: which store, what it said, what to check."""
    uri = masked(tracking_uri(cfg))
    said = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return StoreError(
        f"the MLflow store {uri} failed{' ' + when if when else ''} ({type(err).__name__}: {said[:300]}): "
        "check that no other process holds it locked and that it is an MLflow store, or point "
        "tracking.uri (or MLFLOW_TRACKING_URI) at another one"
    )


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Resolved config as dotted keys -> strings (lists kept as their YAML-ish text)."""
    out: dict[str, str] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = "null" if node is None else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def safe_keys(keys: Iterable[str]) -> dict[str, str]:
    """Map each key to one MLflow accepts on every store: characters outside letters, digits and
    `_ - . /` become `_` (`dogs, big (2)` -> `dogs__big__2_`), a key that would read as a file path
    (`a//b`, `../x`) loses its slashes, and keys that end up equal to another key get a short
    suffix from a hash of their original text, so distinct keys stay distinct on every rerun."""
    keys = list(dict.fromkeys(keys))
    cleaned = {}
    for key in keys:
        safe = UNSAFE_KEY_CHARS.sub("_", key)
        if posixpath.normpath(safe) != safe or safe.startswith(("/", "..")) or safe in ("", "."):
            safe = safe.replace("/", "_")
            if safe.startswith("..") or safe in ("", "."):
                safe = "_" + safe
        cleaned[key] = safe
    groups: dict[str, list[str]] = defaultdict(list)
    for key, safe in cleaned.items():
        groups[safe].append(key)
    taken = {key for key, safe in cleaned.items() if key == safe}
    out = {}
    for key, safe in cleaned.items():
        clash = safe != key and (len(groups[safe]) > 1 or safe in taken)
        if clash or len(safe) > MAX_KEY_LENGTH:
            digest = hashlib.sha1(key.encode()).hexdigest()
            width = 6
            while True:
                suffix = "_" + digest[:width]
                candidate = safe[: MAX_KEY_LENGTH - len(suffix)] + suffix
                if candidate not in taken or width == len(digest):
                    break
                width += 2
            safe = candidate
        out[key] = safe
        taken.add(safe)
    return out


def renamed(mapping: dict[str, str]) -> dict[str, str]:
    """The entries of a `safe_keys` mapping that changed, as safe key -> original key."""
    return {safe: key for key, safe in mapping.items() if safe != key}


# Settings that say where things are, not what was trained: left out of run names.
UNNAMED_SETTINGS = re.compile(
    r"(experiment|preset|paths|tracking|inputs|hydra)(\.|$)|dataset\.path$|model\.weights$"
)


def varied_settings(cfg: DictConfig) -> list[str]:
    """`key=value` for each setting of `cfg` that differs from its preset (or the defaults),
    leaving out where things are (`paths`, `tracking`, `dataset.path`, ...). Under a Hydra
    app they are its command-line overrides; otherwise the preset is composed and compared."""
    from hydra.core.global_hydra import GlobalHydra

    from src.config.compose import compose
    from src.errors import ConfigError

    if GlobalHydra.instance().is_initialized():  # inside `python -m src.train`
        from hydra.core.hydra_config import HydraConfig

        try:
            overrides = list(HydraConfig.get().overrides.task)
        except ValueError:  # initialized, but not by a Hydra app run
            overrides = []
        pairs = [o.lstrip("+~").split("=", 1) for o in overrides if "=" in o]
    else:
        try:
            preset = compose([] if cfg.preset == "default" else [f"experiment={cfg.preset}"])
        except ConfigError:  # a preset this checkout does not have
            return []
        base, mine = flatten(preset), flatten(cfg)
        pairs = [[k, v] for k, v in mine.items() if base.get(k) != v]
    return [f"{k}={v}" for k, v in pairs if not UNNAMED_SETTINGS.match(k)]


def run_name(cfg: DictConfig, run_id: str) -> str:
    """What tells the run apart: its preset, the settings that differ from the preset, and the
    start of its run id, e.g. `dlwp_cats_vs_dogs finetune.layers=8 3f9a1c2e`."""
    return f"{run_identity(cfg)['label']} {run_id[:8]}".strip()


def run_identity(cfg: DictConfig) -> dict:
    """What names and identifies the pipeline run a config belongs to: every setting (logged as
    the run's params), the key that joins the stage processes of one run, its name's start, and
    its tags. A stage's view of the config carries it (`src.stages.stage.reads`), computed from
    the whole config, so that a stage reading only its own keys still logs the whole run."""
    if RUN_NODE in cfg:
        node = OmegaConf.to_container(cfg[RUN_NODE], resolve=True)
        assert isinstance(node, dict)
        return node
    settings = {k: v for k, v in flatten(cfg).items() if k != "tracking.run_id"}
    untracked = {k: v for k, v in settings.items() if not k.startswith("tracking.")}
    text = json.dumps([str(project_root()), os.environ.get("DVC_EXP_NAME", ""), untracked], sort_keys=True)
    varied = " ".join(varied_settings(cfg))
    if len(varied) > 200:
        varied = varied[:199] + "…"
    return {
        "settings": settings,
        "key": hashlib.sha256(text.encode()).hexdigest()[:16],
        "label": " ".join(part for part in (cfg.preset, varied) if part),
        "tags": {"preset": cfg.preset, "dataset": cfg.dataset.name, "model": cfg.model.name},
    }
