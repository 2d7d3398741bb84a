"""`train.strategy` on a CPU: `mirrored` over two logical CPU devices trains what one device
trains, and `multi_worker` with two local worker processes (TF_CONFIG on loopback) trains the
head together and writes one model, from the chief. Strategies must be set up before TensorFlow
starts, so each training run is a fresh process; prepared data and features come from this one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from src.config.paths import REPO_ROOT
from src.data import arrays
from src.fitting import distribute
from src.stages import stage
from src.train import STAGES
from tests.conftest import free_port, make_cfg, require_shared

# Same data, same order, same initial weights, no dropout or augmentation (whose random draws
# differ per replica): the runs differ only in how float32 sums are ordered across replicas.
EXACT = [
    "augment=none",
    "train.precision=float32",
    "head.dropout=0",
    "head.epochs=3",
    "finetune.epochs=2",
    "tracking.enabled=false",
]

WORKER = """
import json, sys
from src.stages import finetune
from src.stages import train_head
from src.config.compose import compose
from src.config.checks import validate
cfg = validate(compose(json.loads(sys.argv[1])))
head = train_head.run(cfg)
tuned = finetune.run(cfg) if cfg.finetune.epochs else None
print("RESULT " + json.dumps({"head": head["best"], "finetune": tuned and tuned["best"],
                              "replicas": head["replicas"]}))
"""


def overrides(cfg, work, *extra: str) -> list[str]:
    """The fixture's config as overrides, with this run's models and reports under `work`."""
    return [
        "experiment=ci",
        f"dataset.path={cfg.dataset.path}",
        f"model.weights={cfg.model.weights}",
        f"paths.prepared={cfg.paths.prepared}",
        f"paths.features={cfg.paths.features}",
        f"paths.models={work / 'models'}",
        f"paths.reports={work / 'reports'}",
        *EXACT,
        *extra,
    ]


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(args)],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {}), "CUDA_VISIBLE_DEVICES": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def result(process: subprocess.Popen, timeout: float = 600) -> dict:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    require_shared()
    tmp = tmp_path_factory.mktemp("distribute")
    cfg = make_cfg(tmp, *EXACT)
    for name, run in STAGES[:3]:  # download, prepare, extract
        stage.timed_run(name, run, cfg)
    return cfg, tmp


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_trains_what_one_device_trains(features):
    cfg, tmp = features
    one = result(start(overrides(cfg, tmp / "one", "train.strategy=one_device",
                                 "head.batch_size=32", "finetune.batch_size=32")))  # fmt: skip
    two = result(start(overrides(cfg, tmp / "two", "train.strategy=mirrored", "train.logical_cpus=2",
                                 "head.batch_size=16", "finetune.batch_size=16")))  # 2 x 16  # fmt: skip
    assert (one["replicas"], two["replicas"]) == (1, 2)
    for phase in ("head", "finetune"):
        assert two[phase]["epoch"] == one[phase]["epoch"]
        assert two[phase]["val_loss"] == pytest.approx(one[phase]["val_loss"], rel=1e-5)
        # 32 validation images: one image whose probability sits at 0.5 may flip
        assert abs(two[phase]["val_accuracy"] - one[phase]["val_accuracy"]) <= 1 / 32 + 1e-9


@pytest.mark.slow
def test_two_local_workers_train_one_head_and_the_chief_writes_it(features):
    import keras

    cfg, tmp = features
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = overrides(cfg, tmp / "multi", "train.strategy=multi_worker", "finetune.epochs=0")
    workers = [
        start(args, {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
        for i in range(2)
    ]
    chief, other = (result(w) for w in workers)
    assert chief["replicas"] == other["replicas"] == 2  # one CPU replica per worker
    assert chief["head"] == other["head"]  # the same synchronised weights, validated on the same images
    models = tmp / "multi" / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == [
        "classes.json", "head.keras",
    ]  # fmt: skip
    head = keras.saving.load_model(models / "head.keras")
    x_val, y_val = arrays.load_features(cfg, "val")
    probabilities = head.predict(x_val, verbose=0)[:, 0]
    accuracy = float(np.mean((probabilities > 0.5) == (y_val == 1)))
    assert accuracy == pytest.approx(chief["head"]["val_accuracy"], abs=1e-6)  # the best epoch's weights


def test_each_worker_gets_its_own_equal_share_of_the_batches():
    x = np.arange(18, dtype=np.float32).reshape(18, 1)
    y = np.zeros(18, np.int64)
    shares = [
        [batch[0].numpy()[:, 0].tolist() for batch in arrays.batches(x, y, 4, shard=(i, 2))] for i in range(2)
    ]
    assert shares == [[[0, 1, 2, 3], [8, 9, 10, 11]], [[4, 5, 6, 7], [12, 13, 14, 15]]]  # 16, 17 left out
    assert [len(arrays.batches(x, y, 4, shard=(i, 2))) for i in range(2)] == [2, 2]


@pytest.mark.parametrize(
    ("tf_config", "expected"),
    [
        (None, (0, 1)),
        ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, (1, 2)),
        ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}, (0, 2)),
        ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, (1, 2)),
    ],
)
def test_the_chief_is_worker_zero_or_the_chief_task(monkeypatch, tf_config, expected):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert distribute.cluster_position() == expected
    assert distribute.shard() == (0, 1) and distribute.is_chief()  # TF_CONFIG alone shards nothing
    monkeypatch.setattr(distribute, "_multi_worker", [True])  # as after joining a multi-worker strategy
    assert distribute.shard() == expected and distribute.is_chief() == (expected[0] == 0)
