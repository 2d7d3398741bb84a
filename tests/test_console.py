"""What a run prints: no TensorFlow start-up notices, no ANSI codes or carriage returns when
output goes to a file, no known warnings; and `--help` on every entry point prints usage and
changes nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from src.config.paths import REPO_ROOT
from src.outputs import console

# What TensorFlow 2.21 prints on a CPU machine while it starts (process ids and times vary).
STARTUP = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795972849.502214   14512 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1795972849.502547   14512 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1795972849.545611   14512 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1795972852.629562   14512 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
W0000 00:00:1795972852.7   14512 something.cc:10] a real warning
"""  # noqa: E501
NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cuda drivers", "cpu_feature_guard", "cuInit")


def test_retracing_warnings_of_new_models_are_dropped_other_tensorflow_warnings_kept(caplog):
    import logging

    console.quiet_libraries()
    logger = logging.getLogger("tensorflow")
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        logger.warning(
            "5 out of the last 6 calls to <function f> triggered tf.function retracing. Tracing is ..."
        )
        logger.warning("a real warning")
    assert [r.getMessage() for r in caplog.records if r.name == "tensorflow"] == ["a real warning"]


def test_start_up_notices_are_dropped_and_other_lines_kept():
    assert console.kept_lines(STARTUP, nvidia_driver=False) == [STARTUP.splitlines()[-1]]
    # with an NVIDIA driver a failed CUDA start is a real problem: shown
    kept = console.kept_lines(STARTUP, nvidia_driver=True)
    assert len(kept) == 2 and "cuInit" in kept[0]


TRAIN = """
from src.outputs import console
console.setup_logging()
console.start_tensorflow()
import keras, numpy as np, sys
from src.outputs import progress
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
model.compile("adam", "mse")
x = np.zeros((64, 3))
model.fit(x, x[:, :1], validation_data=(x, x[:, :1]), epochs=2, batch_size=8, verbose=2,
          callbacks=[progress.keras_callback()])
model.predict(x)  # verbose "auto": a progress bar on a terminal
print("trained", file=sys.stderr)
"""


def test_training_into_a_file_prints_plain_lines_only(tmp_path):
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-c", TRAIN], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\x1b[" not in text and "\r" not in text, repr(text[-2000:])
    assert not [n for n in NOISE if n in text] or Path("/dev/nvidiactl").exists(), text
    assert re.search(r"epoch 2/2: .*\bloss \d.*\bval_loss \d", text) and text.rstrip().endswith("trained")


ENTRY_POINTS = [
    *(["-m", f"src.stages.{name}"] for name in ("recover", "download", "prepare", "extract")),
    *(["-m", f"src.stages.{name}"] for name in ("train_head", "finetune", "evaluate", "export")),
    ["-m", "src.export"],
    ["-m", "src.train"],
    ["-m", "src.params"],
    ["-m", "src.predict"],
    ["-m", "src.compare"],
    ["-m", "src.tracking.server"],
    ["-m", "src.outputs.codedeps"],
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` but git's own, with its size and mtime."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(root).parts[:1]
    }


@pytest.mark.slow
def test_repro_log_is_plain_and_help_changes_nothing(tmp_path):
    from tests.conftest import require_shared
    from tests.test_dvc_pipeline import copy_repo, sh

    require_shared()
    repo = copy_repo(tmp_path)
    sh(repo, "python", "-m", "src.params", "experiment=ci")
    log = sh(repo, "dvc", "repro")  # output to a pipe, as in `dvc repro > log`
    assert "\x1b[" not in log and "\r" not in log, repr(log[-3000:])
    found = [n for n in (*NOISE, "CloudPickle", "retracing", "categorical units") if n in log]
    assert not found or (Path("/dev/nvidiactl").exists() and found == ["cuInit"]), log[-5000:]
    assert re.search(r"INFO src\.outputs\.progress: epoch 1/1: .*\bloss \d.*\bval_loss \d", log), log[-5000:]

    before = snapshot(repo)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for entry in ENTRY_POINTS:
        done = subprocess.run(
            [sys.executable, *entry, "--help"], cwd=repo, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0 and "usage" in done.stdout.lower(), (
            entry,
            done.stdout,
            done.stderr[-2000:],
        )
    assert snapshot(repo) == before
    assert "up to date" in sh(repo, "dvc", "status")


DOWNLOAD = """
import sys, mlflow
from src.outputs import console
console.setup_logging()
store, folder = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(store)
mlflow.set_experiment("transfers")
with mlflow.start_run() as run:
    mlflow.log_artifacts(folder, "files")
mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="files", dst_path=folder + "-back")
print("downloaded", file=sys.stderr)
"""


def test_mlflow_artifact_transfers_into_a_file_show_no_progress_bar(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (folder / name).write_text(name)
    log = tmp_path / "log.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-c", DOWNLOAD, f"sqlite:///{tmp_path / 'mlflow.db'}", str(folder)],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            env={**env, "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip
    text = log.read_text()
    assert done.returncode == 0 and text.rstrip().endswith("downloaded"), text
    assert "\r" not in text and "Downloading artifacts" not in text, repr(text[-2000:])


def test_a_module_run_with_dash_m_logs_under_its_own_name(tmp_path):
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "__init__.py").write_text("")
    (tmp_path / "tools" / "hello.py").write_text(
        "import logging\nfrom src.outputs import console\n"
        "console.setup_logging()\nlogging.getLogger(__name__).info('hello')\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "tools.hello"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}"},
    )  # fmt: skip
    assert done.returncode == 0 and re.search(r"INFO tools\.hello: hello$", done.stderr.strip()), done.stderr
