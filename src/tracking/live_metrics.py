"""Each epoch's metrics in MLflow as training runs, so a long run can be watched in the UI.

The pipeline's MLflow run is opened by the first training stage and found again by the later
ones, which under `dvc repro` are separate processes: it carries the tag `pipeline_key` (a hash
of the project folder, the DVC experiment name and the whole config but `tracking`) and stays
RUNNING until evaluate logs the rest and finishes it. A sweep job logs into its child run
(`tracking.run_id`) instead.

A stage's epochs are logged as `<phase>.<metric>` (`head.val_loss`, `finetune.accuracy`, ...)
with step = epoch, fine-tune epochs counted on after the head's, and the tag `live.<phase>` tells
evaluate not to log that history again from its CSV. A stage that runs again for the same key
(a rerun after a crash, say) ends the old run as KILLED and opens a new one, so no epoch is
logged twice. If the store cannot be reached, training goes on and evaluate logs the curves.
"""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from src.outputs import running
from src.tracking import store

log = logging.getLogger(__name__)

KEY_TAG = "pipeline_key"
PHASE_TAG = "live.{}"  # set on the run when a phase starts logging its epochs


def pipeline_key(cfg: DictConfig) -> str:
    """What identifies one pipeline run across its stage processes."""
    return store.run_identity(cfg)["key"]


def running_run(cfg: DictConfig):
    """The RUNNING run with this config's `pipeline_key`, or None (the store must be selected)."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    runs = mlflow.MlflowClient().search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.{KEY_TAG} = '{pipeline_key(cfg)}' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def open_run(cfg: DictConfig, phase: str) -> str:
    """The id of the run `phase`'s epochs go to: the sweep job's, the pipeline's open run (if
    this phase has not logged into it yet) or a new one."""
    import mlflow

    experiment_id = store.use_store(cfg)
    client = mlflow.MlflowClient()
    if cfg.tracking.get("run_id"):
        run_id = cfg.tracking.run_id
    else:
        found = running_run(cfg)
        if found is not None and PHASE_TAG.format(phase) not in found.data.tags:
            run_id = found.info.run_id
        else:
            if found is not None:  # this phase ran into it before: start afresh
                client.set_terminated(found.info.run_id, "KILLED")
            identity = store.run_identity(cfg)
            tags = {
                KEY_TAG: identity["key"],
                "preset": identity["tags"]["preset"],
                "model": identity["tags"]["model"],
            }
            run_id = client.create_run(experiment_id, tags=tags).info.run_id
            client.set_tag(run_id, "mlflow.runName", store.run_name(cfg, run_id))
    client.set_tag(run_id, PHASE_TAG.format(phase), "true")
    running.note_run(run_id)  # ended KILLED by the next run if this stage is killed
    return run_id


def callback(cfg: DictConfig, phase: str, first_step: int | None = None):
    """A Keras callback logging each epoch of `phase` to the pipeline's MLflow run; None when
    tracking is off. Steps go on after the head's epochs already in the run."""
    import keras
    import mlflow

    if not cfg.tracking.enabled:
        return None
    try:
        run_id = open_run(cfg, phase)
        client = mlflow.MlflowClient()
        if first_step is None:  # after the head's epochs, when they are in this run
            first_step = 0 if phase == "head" else len(client.get_metric_history(run_id, "head.loss"))
    except Exception as err:  # noqa: BLE001 - tracking must never stop training
        log.warning("no live MLflow metrics (%s: %s); evaluate logs the curves", type(err).__name__, err)
        return None
    log.info("logging %s epochs live to MLflow run %s", phase, run_id)

    class LiveMetrics(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            values = {**(logs or {}), "seconds": time.perf_counter() - self._start}
            metrics = {f"{phase}.{k}": float(v) for k, v in values.items()}
            names = store.safe_keys(metrics)
            step = first_step + epoch + 1
            try:
                client.log_batch(run_id, metrics=[Metric(names[k], v, now, step) for k, v in metrics.items()])
            except Exception as err:  # noqa: BLE001
                log.warning("MLflow did not take epoch %d's metrics: %s", epoch + 1, err)

    return LiveMetrics()
