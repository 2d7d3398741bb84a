"""`src.predict` on folders mixing good and bad files, and on model arguments that are not models:
a tiny real Keras model saved as .keras with its classes.json, real image files, a real
(empty) MLflow SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src import predict
from src.config.paths import REPO_ROOT
from src.serving import loading
from tests.corpus import appledouble, image, text_file, truncated_jpeg

SIZE = 16


def tiny_model(folder: Path, classes: list[str]) -> Path:
    """A real (untrained) Keras classifier of SIZE px images, saved with classes.json beside it."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    two = len(classes) == 2
    outputs = keras.layers.Dense(1 if two else len(classes), activation="sigmoid" if two else "softmax")(x)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "final.keras"
    keras.Model(inputs, outputs).save(path)
    (folder / "classes.json").write_text(json.dumps(classes))
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model"), ["cats", "dogs"])


def mixed_folder(root: Path) -> tuple[list[Path], Path]:
    """Three good images (one in a subfolder), a truncated JPEG, an AppleDouble file, a text file."""
    good = [image(root / "cat1.jpg", 40, seed=1), image(root / "cat2.png", 30, "RGBA", seed=2)]
    good.append(image(root / "more" / "dog1.jpg", 20, seed=3))
    broken = truncated_jpeg(root / "broken.jpg")
    appledouble(root / "._dog1.jpg")
    text_file(root / "notes.txt")
    return good, broken


def lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_one_bad_file_is_listed_and_the_readable_images_are_classified(tmp_path, model_path, capsys):
    good, broken = mixed_folder(tmp_path / "photos")
    assert predict.main([str(tmp_path / "photos"), "--model", str(model_path)]) == 0
    out, err = capsys.readouterr()
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == [str(p) for p in good]
    assert all(r[1] in ("cats", "dogs") and 0.5 <= float(r[2]) <= 1.0 for r in rows)
    skipped = lines(err, "skipped ")
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {broken}: ")
    assert "truncated" in skipped[0]
    assert lines(err, "note: ") == [f"note: left out 2 hidden or non-image files under {tmp_path / 'photos'}"]
    assert "Traceback" not in err and not lines(err, "error:")


def test_predict_function_reports_unreadable_files_beside_its_rows(tmp_path, model_path):
    good, broken = mixed_folder(tmp_path / "photos")
    model, classes = loading.load_model(str(model_path))
    skipped: list = []
    files = [*good, broken, tmp_path / "photos" / "._dog1.jpg"]
    rows = loading.predict(model, classes, files, batch_size=2, skipped=skipped)
    assert [r["path"] for r in rows] == [str(p) for p in good]
    assert [p for p, _ in skipped] == [broken, tmp_path / "photos" / "._dog1.jpg"]
    assert skipped[1][1].startswith("UnidentifiedImageError")


@pytest.mark.parametrize("kind", ["text file", "text file named .keras", "missing file", "no classes.json"])
def test_a_model_argument_that_is_not_a_model_is_one_error_line(tmp_path, model_path, capsys, kind):
    photo = image(tmp_path / "cat.png")
    if kind == "text file":
        spec = text_file(tmp_path / "weights.txt")
    elif kind == "text file named .keras":
        spec = text_file(tmp_path / "fake" / "final.keras")
        (tmp_path / "fake" / "classes.json").write_text('["cats", "dogs"]')
    elif kind == "missing file":
        spec = tmp_path / "nowhere" / "final.keras"
    else:
        spec = tmp_path / "alone" / "final.keras"
        spec.parent.mkdir()
        spec.write_bytes(model_path.read_bytes())
    assert predict.main([str(photo), "--model", str(spec)]) == 2
    out, err = capsys.readouterr()
    errors = lines(err, "error: ")
    assert out == "" and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"error: --model {spec}: ")
    assert ".keras" in errors[0] or "classes.json" in errors[0]  # says what to pass instead


def test_an_unknown_registry_model_is_one_error_line(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    photo = image(tmp_path / "cat.png")
    assert predict.main([str(photo), "--model", "models:/no-such-model/1"]) == 2
    out, err = capsys.readouterr()
    errors = lines(err, "error: ")
    assert out == "" and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: --model models:/no-such-model/1: ") and uri in errors[0]


def test_exit_status_of_the_command(tmp_path, model_path):
    """1 when no image can be read, 2 for a model that is not there (0: see the tests above)."""
    good, broken = mixed_folder(tmp_path / "photos")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "src.predict", *args]
        return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)

    unreadable = run(str(broken), "--model", str(model_path))
    assert unreadable.returncode == 1 and unreadable.stdout == ""
    assert lines(unreadable.stderr, f"skipped {broken}: ")
    assert lines(unreadable.stderr, "error: no image could be read")
    missing = run(str(good[0]), "--model", str(tmp_path / "nowhere.keras"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert lines(missing.stderr, f"error: --model {tmp_path / 'nowhere.keras'}: no such file")
