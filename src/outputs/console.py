"""What a run prints: the project's log lines in one format, TensorFlow's start-up notices left
out (its warnings and real errors kept), MLflow's lines in the same format, and, when output
goes to a file or a pipe (`dvc repro > log`), no ANSI codes or carriage returns: Keras' progress
bars give way to one log line per epoch (`src.outputs.progress`)."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from src.outputs.progress import is_terminal

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Lines TensorFlow's C++ runtime prints while it starts that tell a user nothing: absl's note
# that it is not initialised, oneDNN's notice, "no CUDA drivers" on a CPU machine, the CPU
# instructions it was not compiled for.
STARTUP_NOISE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|^I\d{4} [\d:. ]+\d+ (port|cudart_stub|cpu_feature_guard)\.cc:\d+\]"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
)
# A failed CUDA start: noise without an NVIDIA driver, a real problem with one.
CUDA_INIT_FAILED = re.compile(r"^E\d{4} .*failed call to cuInit")
NVIDIA_DEVICE = Path("/dev/nvidiactl")
QUIET_LIBRARIES = ("mlflow", "absl", "alembic", "urllib3", "h5py", "matplotlib", "PIL")  # their INFO is noise


def setup_logging() -> None:
    """One format for every log line of the process (the project's and its libraries'); INFO for
    the project, WARNING for chatty libraries. A process that set up logging already (a test
    runner, an application calling `main`) keeps its own handlers."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt=DATE_FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _ModuleName) for f in handler.filters):
            handler.addFilter(_ModuleName())
    quiet_libraries()


class _ModuleName(logging.Filter):
    """Names the module run with `python -m` by its own name (`src.stages.evaluate`), as its
    lines read when it is imported, rather than `__main__`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "__main__":
            spec = getattr(sys.modules.get("__main__"), "__spec__", None)
            record.name = spec.name if spec is not None else record.name
        return True


def quiet_libraries() -> None:
    """Chatty libraries log WARNING and up, through the process's own handlers (MLflow would
    otherwise add a handler and format of its own); TensorFlow's C++ INFO lines off."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # for an MLflow imported later
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # warnings and errors stay
    if not is_terminal():  # MLflow's artifact progress bars: carriage returns in a log file
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow_logger = logging.getLogger("mlflow")
    for handler in list(mlflow_logger.handlers):  # from an MLflow imported already
        mlflow_logger.removeHandler(handler)
    mlflow_logger.propagate = True
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    tensorflow_logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _NewModelRetracing) for f in tensorflow_logger.filters):
        tensorflow_logger.addFilter(_NewModelRetracing())


class _NewModelRetracing(logging.Filter):
    """Drops TensorFlow's "N out of the last M calls to <function> triggered tf.function
    retracing" warning. TensorFlow counts traces per Python function, not per model, so a
    process that builds several models (a sweep's jobs, the splits of extract, each fine-tuning
    phase) traces the same function once per model and gets warned, though nothing retraces
    needlessly: every model is traced once per input shape."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def kept_lines(text: str, nvidia_driver: bool | None = None) -> list[str]:
    """The lines of TensorFlow's start-up output worth showing (see `STARTUP_NOISE`)."""
    nvidia_driver = NVIDIA_DEVICE.exists() if nvidia_driver is None else nvidia_driver
    return [
        line
        for line in text.splitlines()
        if not STARTUP_NOISE.search(line) and (nvidia_driver or not CUDA_INIT_FAILED.search(line))
    ]


def start_tensorflow() -> None:
    """Import TensorFlow and let it find its devices with its start-up lines filtered out of
    stderr (they are written by C++ code straight to file descriptor 2, before any setting of
    theirs applies); every other line is passed on. With output that is not a terminal, Keras
    prints no progress bars. Does nothing when TensorFlow is imported already."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # CUDA's start happens here
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    for line in kept_lines(text):
        print(line, file=sys.stderr)
    if not is_terminal():
        import keras

        keras.config.disable_interactive_logging()  # progress bars, with their ANSI codes
