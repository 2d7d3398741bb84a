"""MLflow tracking: where runs go, and logging one pipeline run (params, per-epoch curves,
test metrics, artifacts, tags and the models).

Each run logs the final Keras model twice: `keras_model`, the Keras 3 flavor with a signature
and a uint8 input example, and `model`, the image classifier of `src.serving.pyfunc_model` (paths or
pixels in, class names and probabilities out), which is registered as `tracking.registered_model`.
The new version gets the alias `champion` when no champion was trained on the same data (dataset
fingerprint) or when its test accuracy beats the champion's; else `candidate`.

Default store: SQLite at `<repo>/mlruns/mlflow.db` with artifacts under `<repo>/mlruns/artifacts`,
no server needed, wherever the process was started. `MLFLOW_TRACKING_URI` or
`tracking.uri` (e.g. http://127.0.0.1:5000) point it at a server instead.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from src.config.paths import REPO_ROOT
from src.outputs import running
from src.tracking import store

log = logging.getLogger(__name__)


CHAMPION, CANDIDATE = "champion", "candidate"  # registered model aliases
ACCURACY_KEY = "test.accuracy"  # the metric that decides the champion
FINGERPRINT_TAG = "dataset_fingerprint"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log_history(history_csv: Path, prefix: str, offset: int = 0) -> int:
    """Log a history CSV as per-epoch metrics `<prefix>.<name>`; return the number of epochs."""
    import mlflow

    if not history_csv.is_file():
        return 0
    frame = pd.read_csv(history_csv)
    for row in frame.to_dict("records"):
        step = offset + int(row.pop("epoch"))
        metrics = {f"{prefix}.{k}": float(v) for k, v in row.items() if pd.notna(v)}
        names = store.safe_keys(metrics)
        mlflow.log_metrics({names[k]: v for k, v in metrics.items()}, step=step)
    return len(frame)


class KerasFlavor:
    """`mlflow.keras` as a `Model.log` flavor that creates the model folder first: its
    `save_model` writes the input example before it creates that folder."""

    @staticmethod
    def save_model(path: str, **kwargs) -> None:
        import mlflow

        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)


# What the logged models import (TensorFlow, the `src` code they ship, its image decoding): given
# with their installed versions, so MLflow does not infer them by loading the model (slow).
# What the served model imports (src/serving, src/images, src/evaluation): no Hydra, no data pipeline.
MODEL_PACKAGES = ("tensorflow", "keras", "mlflow", "numpy", "pandas", "pillow")


# MLflow tag -> the environment variable `dvc exp run` sets
DVC_TAGS = {"dvc.exp_name": "DVC_EXP_NAME", "dvc.baseline_rev": "DVC_EXP_BASELINE_REV"}


def model_requirements() -> list[str]:
    """`name==version` of each of `MODEL_PACKAGES` installed here."""
    from importlib import metadata

    found = []
    for name in MODEL_PACKAGES:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def assign_alias(name: str, version: str | int, fingerprint: str, accuracy: float | None) -> str:
    """Give version `version` of registered model `name` the alias `champion` when the current
    champion was trained on other data (another fingerprint, or its run is gone), there is none, or
    `accuracy` beats its test accuracy; else `candidate`. Returns the alias set (and logs why)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    champion = client.get_registered_model(name).aliases.get(CHAMPION)
    if champion is None:
        alias, why = CHAMPION, "no champion yet"
    else:
        champion = client.get_model_version(name, champion)
        theirs, data = None, "unknown"  # when the version has no run, or it was deleted for good
        try:
            if champion.run_id:
                run = client.get_run(champion.run_id).data
                theirs, data = run.metrics.get(ACCURACY_KEY), run.tags.get(FINGERPRINT_TAG)
        except MlflowException:
            pass
        shown = "none" if theirs is None else f"{theirs:.4f}"
        mine = "none" if accuracy is None else f"{accuracy:.4f}"
        if data != fingerprint:
            alias, why = CHAMPION, f"champion version {champion.version} was trained on other data ({data})"
        elif accuracy is not None and (theirs is None or accuracy > theirs):
            alias, why = CHAMPION, f"test accuracy {mine} beats champion version {champion.version}'s {shown}"
        else:
            alias = CANDIDATE
            why = f"test accuracy {mine} does not beat champion version {champion.version}'s {shown}"
    client.set_registered_model_alias(name, alias, str(version))
    log.info("%s version %s is the %s: %s (data %s)", name, version, alias, why, fingerprint)
    return alias


CRASH_TAG = "finished_after_crash"


def finish_crashed_runs(cfg: DictConfig, run_ids: list[str]) -> dict[str, str]:
    """Finish the MLflow runs of killed stage processes, as the stage would have: a run whose model
    version was registered gets the version's alias (`assign_alias`, from the run's own test
    accuracy and data fingerprint) and ends FINISHED; one that got no further ends KILLED. Runs
    that have ended or are gone are left alone. Returns run id -> what was done."""
    import mlflow
    from mlflow.exceptions import MlflowException

    store.reach_store(cfg)
    client = mlflow.MlflowClient()
    name = cfg.tracking.registered_model
    done = {}
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            done[run_id] = "not in this store"
            continue
        if run.info.status != "RUNNING":
            done[run_id] = f"already {run.info.status}"
            continue
        versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == name]
        if versions:  # killed after registering: only the alias and the run's end were missing
            version = versions[0]
            alias = next(iter(version.aliases), None) or assign_alias(
                name,
                version.version,
                run.data.tags.get(FINGERPRINT_TAG, "unknown"),
                run.data.metrics.get(ACCURACY_KEY),
            )
            status, what = "FINISHED", f"FINISHED, {name} version {version.version} is the {alias}"
        else:
            status, what = "KILLED", "KILLED (its stage was killed before the model was registered)"
        client.set_tag(run_id, CRASH_TAG, "true")
        client.set_terminated(run_id, status)
        log.info("MLflow run %s of a killed stage: %s", run_id, what)
        done[run_id] = what
    return done


def log_pipeline_run(
    cfg: DictConfig,
    *,
    model,
    classes: list[str],
    metrics: dict[str, float],
    histories: dict[str, Path],
    artifacts: list[Path],
    fingerprint: str,
    image_size: int,
) -> dict:
    """Log one pipeline run to MLflow; return its run id, experiment id, model URIs and, when
    `tracking.registered_model` is set, the registered version and the alias it got (see
    `assign_alias`; `metrics["test.accuracy"]` decides).

    The classifier takes the temperature from the `temperature.json` among `artifacts`, if any.

    Metric and param keys MLflow would refuse (class names with commas, brackets, ...) are
    logged under safe names (`safe_keys`); `metric_names.json` and `param_names.json` map
    each renamed key back to the original."""
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    from src.serving import loading, pyfunc_model
    from src.tracking import live_metrics

    experiment_id = store.reach_store(cfg)  # tried again while it is locked; else one line
    tags = {
        "git_commit": git_commit(),
        FINGERPRINT_TAG: fingerprint,
        **store.run_identity(cfg)["tags"],
    }
    for tag, variable in DVC_TAGS.items():  # set by `dvc exp run`
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    if cfg.tracking.get("run_id"):  # a sweep job: its child run exists already, named by the sweep
        active = mlflow.start_run(run_id=cfg.tracking.run_id)
        mlflow.set_tags(tags)
    elif (opened := live_metrics.running_run(cfg)) is not None:  # training logged its epochs into it
        active = mlflow.start_run(run_id=opened.info.run_id)
        mlflow.set_tags(tags)
    else:
        active = mlflow.start_run(experiment_id=experiment_id, tags=tags)
        mlflow.set_tag("mlflow.runName", store.run_name(cfg, active.info.run_id))
    with active as run:
        running.note_run(run.info.run_id)  # a killed evaluate's run is finished by the next run
        params = store.run_identity(cfg)["settings"]
        param_names = store.safe_keys(params)
        items = [(param_names[k], v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(items[i : i + 100]))
        logged_live = mlflow.get_run(run.info.run_id).data.tags
        offset = 0
        for prefix, path in histories.items():
            if live_metrics.PHASE_TAG.format(prefix) in logged_live:  # each epoch was logged as it ended
                offset += len(pd.read_csv(path)) if path.is_file() else 0
            else:  # fine-tune epochs continue after the head's
                offset += log_history(path, prefix, offset)
        metric_names = store.safe_keys(metrics)
        mlflow.log_metrics({metric_names[k]: v for k, v in metrics.items()})
        for mapping, name in ((metric_names, "metric_names.json"), (param_names, "param_names.json")):
            if changed := store.renamed(mapping):
                log.warning("%d MLflow keys renamed (%s maps them back)", len(changed), name)
                mlflow.log_text(json.dumps(changed, indent=1, ensure_ascii=False) + "\n", name)
        for path in artifacts:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            elif path.is_file():
                mlflow.log_artifact(str(path))
        mlflow.log_text(OmegaConf.to_yaml(cfg), "config.yaml")
        temperature_file = next(
            (p for p in artifacts if p.name == loading.TEMPERATURE_FILE and p.is_file()), None
        )
        metadata = {"classes": list(classes)}
        if temperature_file is not None:
            metadata["temperature"] = loading.read_temperature_file(temperature_file)
        example = np.full((1, image_size, image_size, 3), 128, np.uint8)  # one mid-grey image
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))]),
            outputs=Schema(
                [TensorSpec(np.dtype(np.float32), (-1, 1 if len(classes) == 2 else len(classes)))]
            ),
        )
        shared = {"metadata": metadata, "input_example": example, "pip_requirements": model_requirements()}
        keras_info = Model.log(
            None, name="keras_model", flavor=KerasFlavor, flavor_name="mlflow.keras", model=model,
            signature=signature, **shared,
        )  # fmt: skip
        name = cfg.tracking.registered_model
        info = Model.log(
            None, name="model", flavor=pyfunc_model, flavor_name="mlflow.pyfunc", registered_model_name=name,
            keras_model=model, classes=list(classes), temperature_file=temperature_file,
            signature=pyfunc_model.signature(list(classes)), **shared,
        )  # fmt: skip
        logged = {
            "run_id": run.info.run_id,
            "experiment_id": experiment_id,
            "model_uri": info.model_uri,
            "keras_model_uri": keras_info.model_uri,
            "tracking_uri": store.tracking_uri(cfg),
        }
        if name:
            version = info.registered_model_version
            logged["registered_version"] = str(version)
            logged["alias"] = assign_alias(name, version, fingerprint, metrics.get(ACCURACY_KEY))
        log.info("MLflow run %s in %s", run.info.run_id, store.tracking_uri(cfg))
        return logged
