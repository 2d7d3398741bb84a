"""Latency of the served image classifier (`mlflow models serve`) per input kind.

    python benchmarks/serving.py [--model models:/image-classifier@champion | --model FOLDER]
                                 [--requests 200] [--parallel 8] [--image PHOTO]

Serves the model (a `models:/...` URI, read from $MLFLOW_TRACKING_URI; or an MLflow model
folder; or, when none is given, a tiny Keras classifier saved as the pipeline saves its pyfunc)
on a free loopback port, then sends `--requests` requests, `--parallel` at a time, of each kind:
one base64-encoded JPEG (`{"dataframe_records": [{"image": ...}]}`) and one uint8 pixel array at
the model's input size (`{"inputs": [...]}`). Prints, per kind, the failures and the p50 and p95
latency, and the time an oversized pixel request (about 4 MB of JSON) takes to be refused.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300


def tiny_model_folder(folder: Path) -> tuple[str, int]:
    """A tiny real Keras classifier of 16 px images saved as the pipeline's pyfunc."""
    import keras
    from mlflow.models import Model

    sys.path.insert(0, str(REPO))
    from src.serving import pyfunc_model

    size = 16
    inputs = keras.Input((size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    pyfunc_model.save_model(str(folder), Model(), keras_model=model, classes=["cats", "dogs"])
    return str(folder), size


def model_size(uri: str) -> int:
    import mlflow

    return int(mlflow.keras.load_model(uri).input_shape[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, float, str]:
    """(HTTP status, seconds, body's start) of a POST of JSON `body`."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    except OSError as err:
        status, text = 0, repr(err)
    return status, time.perf_counter() - started, text[:300]


def wait_for_ping(base: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"no answer to /ping after {START_TIMEOUT} s")


def photo_bytes(path: str | None, seed: int = 0) -> bytes:
    """The JPEG to send: --image, or a 640 x 480 JPEG of smooth random colours."""
    if path:
        return Path(path).read_bytes()
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def run(url: str, body: bytes, requests: int, parallel: int) -> dict:
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(lambda _: post(url, body), range(requests)))
    latencies = sorted(seconds for status, seconds, _ in results if status == 200)
    failures = [(status, text) for status, _, text in results if status != 200]
    p50 = statistics.median(latencies) if latencies else float("nan")
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
    return {"failures": failures, "p50": p50, "p95": p95, "bytes": len(body)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="models:/... URI or an MLflow model folder (default: a tiny model)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--image", help="a JPEG or PNG to send (default: a generated 640x480 JPEG)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            uri, size = args.model, model_size(args.model)
        else:
            uri, size = tiny_model_folder(Path(tmp) / "model")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
        command += ["-h", "127.0.0.1", "-p", str(port)]
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "TF_CPP_MIN_LOG_LEVEL": "3",
        }
        with open(Path(tmp) / "server.log", "w") as log:
            server = subprocess.Popen(
                command, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            started = time.monotonic()
            wait_for_ping(base, server)
            print(f"served {uri} ({size} px) in {time.monotonic() - started:.0f} s")
            data = photo_bytes(args.image)
            encoded = base64.b64encode(data).decode()
            pixels = np.random.default_rng(1).integers(0, 256, (1, size, size, 3)).tolist()
            kinds = {
                "base64": json.dumps({"dataframe_records": [{"image": encoded}]}).encode(),
                "pixels": json.dumps({"inputs": pixels}).encode(),
            }
            url = f"{base}/invocations"
            for kind, body in kinds.items():
                post(url, body)  # warm up
                r = run(url, body, args.requests, args.parallel)
                print(
                    f"{kind:7s} {len(body) / 1e3:8.1f} kB  {args.requests} requests, {args.parallel} in "
                    f"parallel: failures {len(r['failures'])}, p50 {r['p50'] * 1e3:.1f} ms, "
                    f"p95 {r['p95'] * 1e3:.1f} ms"
                )
                for status, text in r["failures"][:3]:
                    print(f"    {status}: {text}")
            side = 504  # 504 x 504 x 3 integers: about 4 MB of JSON, the wrong shape
            big = json.dumps(
                {"inputs": np.random.default_rng(2).integers(0, 256, (1, side, side, 3)).tolist()}
            )
            status, seconds, text = post(url, big.encode())
            print(f"oversized pixels {len(big) / 1e6:.1f} MB: HTTP {status} in {seconds:.2f} s")
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
