"""`mlflow models serve` on the registered champion: a tiny classifier fitted on real cats and
dogs, logged and registered as a pipeline run is, served by real server processes on free
loopback ports (one without and one with IMAGE_CLASSIFIER_ALLOWED_DIRS), and real photos posted
to /invocations as base64-encoded bytes, pixels and paths."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from src.serving import loading
from tests.conftest import CATS_DOGS, free_port, require_shared
from tests.test_registered_model import CLASSES, NAME, log_run, registry_cfg
from tests.test_tracking_keys import SIZE, tiny_model

pytestmark = pytest.mark.slow
START_TIMEOUT = 300  # seconds for the server to import TensorFlow, load the model and answer /ping


def photos(split: str, per_class: int) -> tuple[list[Path], np.ndarray]:
    """The first `per_class` photos of each class in a split of the shared cats vs dogs, and labels."""
    files = [f for c in CLASSES for f in sorted((CATS_DOGS / split / c).iterdir())[:per_class]]
    return files, np.repeat(np.arange(len(CLASSES)), per_class)


def fitted_model() -> tuple[object, float]:
    """The tiny classifier fitted a few epochs on real photos, and its accuracy on others."""
    import keras

    keras.utils.set_random_seed(0)
    model = tiny_model(2)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    files, labels = photos("train", 12)
    _, images, _ = loading.read_images(files, SIZE)
    model.fit(images.astype(np.float32), labels, epochs=5, batch_size=8, verbose=0)
    files, labels = photos("validation", 4)
    _, images, _ = loading.read_images(files, SIZE)
    _, accuracy = model.evaluate(images.astype(np.float32), labels, verbose=0)
    return model, float(accuracy)


def request(url: str, payload: dict | None = None, timeout: float = 60) -> tuple[int, dict | str]:
    """(HTTP status, JSON body or text) of a GET, or of a POST of `payload` as JSON."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read().decode()
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def wait_for_ping(base: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if request(f"{base}/ping")[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(1)
    pytest.fail(f"no answer to /ping after {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """End the server and the workers it started (its own process group)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def check_predictions(predictions: list[dict]) -> np.ndarray:
    """Two rows with a class name and probabilities summing to 1; returns the (2, 2) probabilities."""
    assert len(predictions) == 2
    probs = np.array([[row[f"p_{c}"] for c in CLASSES] for row in predictions])
    for row, p in zip(predictions, probs):
        assert row["class"] in CLASSES and row["class"] == CLASSES[int(p.argmax())]
        assert row["probability"] == pytest.approx(p.max())
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    return probs


def serve(cfg, folder: Path, **env: str) -> tuple[str, subprocess.Popen, Path]:
    """(base URL, process, log) of `mlflow models serve` on the champion, with `env` added, run
    in `folder` (in its own process group: `stop` ends it and its workers)."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion"]
    command += ["--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"]
    environ = {
        **os.environ,
        "MLFLOW_TRACKING_URI": cfg.tracking.uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        **env,
    }
    if "IMAGE_CLASSIFIER_ALLOWED_DIRS" not in env:  # the operator's choice, not the test runner's
        environ.pop("IMAGE_CLASSIFIER_ALLOWED_DIRS", None)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            command, cwd=folder, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return f"http://127.0.0.1:{port}", server, log


def paths_payload(*paths: Path) -> dict:
    return {"dataframe_records": [{"path": str(p)} for p in paths]}


def test_serve_the_champion_and_classify_a_cat_and_a_dog(tmp_path):
    require_shared()
    cfg = registry_cfg(tmp_path)
    model, accuracy = fitted_model()
    logged = log_run(cfg, tmp_path / "run", accuracy=accuracy, model=model)
    assert logged["alias"] == "champion"
    cat, dog = (sorted((CATS_DOGS / "validation" / c).iterdir())[0] for c in CLASSES)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copyfile(cat, allowed / "0.jpg")
    shutil.copyfile(dog, allowed / "1.jpg")
    os.mkfifo(allowed / "2.jpg")
    servers = [
        serve(cfg, tmp_path / "closed"),
        serve(cfg, tmp_path / "open", IMAGE_CLASSIFIER_ALLOWED_DIRS=str(allowed)),
    ]
    try:
        for base, server, log in servers:
            wait_for_ping(base, server, log)
        (closed, *_), (opened, *_) = servers
        # base64-encoded bytes: the same classes and probabilities as the model gives the files
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in (cat, dog)]
        status, body = request(
            f"{closed}/invocations", {"dataframe_records": [{"image": e} for e in encoded]}
        )
        assert status == 200, body
        by_base64 = check_predictions(body["predictions"])
        status, body = request(f"{closed}/invocations", {"inputs": {"image": encoded}})
        assert status == 200, body
        np.testing.assert_allclose(check_predictions(body["predictions"]), by_base64, rtol=1e-5)
        _, images, _ = loading.read_images([cat, dog], SIZE)
        np.testing.assert_allclose(
            loading.class_probabilities(model, images), by_base64, rtol=1e-5, atol=1e-6
        )
        # pixels still work
        status, body = request(f"{closed}/invocations", {"inputs": images.tolist()})
        assert status == 200, body
        np.testing.assert_allclose(check_predictions(body["predictions"]), by_base64, rtol=1e-5)
        status, body = request(
            f"{closed}/invocations", {"dataframe_records": [{"image": encoded[0]}, {"image": "%%"}]}
        )
        assert status == 400 and "image 1: not base64-encoded image bytes" in body["message"]
        # no allow-list: every path refused, the same answer whether the file exists or not
        answers = []
        for path in (allowed / "0.jpg", allowed / "9.jpg", allowed / "2.jpg"):
            status, body = request(f"{closed}/invocations", paths_payload(path), timeout=20)
            assert status == 400 and "path inputs are not allowed for" in body["message"], body
            answers.append(json.dumps(body).replace(str(path), "<path>"))
        assert len(set(answers)) == 1, answers
        # allowed folder: its files are read, all else refused alike, a FIFO at once
        status, body = request(f"{opened}/invocations", paths_payload(allowed / "0.jpg", allowed / "1.jpg"))
        assert status == 200, body
        np.testing.assert_allclose(check_predictions(body["predictions"]), by_base64, rtol=1e-5)
        outside = []
        for path in (cat, tmp_path / "run" / "missing.jpg"):
            status, body = request(f"{opened}/invocations", paths_payload(path), timeout=20)
            assert status == 400, body
            outside.append(body["message"].split("Error: ")[-1])
        assert outside == [
            "path inputs are not allowed for " + str(p) + outside[0].split(str(cat))[1]
            for p in (cat, tmp_path / "run" / "missing.jpg")
        ]
        started = time.monotonic()
        status, body = request(f"{opened}/invocations", paths_payload(allowed / "2.jpg"), timeout=20)
        assert status == 400 and "path inputs are not allowed for" in body["message"], body
        assert time.monotonic() - started < 10
    finally:
        for _, server, _ in servers:
            stop(server)
