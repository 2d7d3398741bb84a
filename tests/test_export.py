"""The export stage on the `ci` model: every format written and measured on the test split, and
golden photos classified alike by Keras, the pyfunc, ONNX and LiteRT (float), with the int8
model agreeing on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from src import predict
from src.stages import export, stage
from tests.conftest import CATS_DOGS, make_cfg, require_shared

pytestmark = pytest.mark.slow
GOLDEN = [
    CATS_DOGS / "validation" / c / f"{c[:-1]}.{n}.jpg" for c in ("cats", "dogs") for n in (2000, 2001, 2002)
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tests.test_stages import run_all

    require_shared()
    tmp = tmp_path_factory.mktemp("export")
    cfg = make_cfg(
        tmp, "train.precision=float32", "export.latency_runs=20", "export.representative_images=40"
    )
    run_all(cfg)
    summary = stage.timed_run("export", export.run, cfg)
    return cfg, Path(cfg.paths.models) / "export", summary


def test_every_format_is_written_with_its_classes_and_measured(exported):
    cfg, folder, summary = exported
    assert (folder / "saved_model" / "saved_model.pb").is_file() and (folder / ".pipeline-output").is_file()
    assert json.loads((Path(cfg.paths.reports) / "export.json").read_text())["formats"] == summary["formats"]
    rows = summary["formats"]
    assert set(rows) == {"onnx", "tflite_float", "tflite_int8"} and not [
        r for r in rows.values() if "error" in r
    ]
    for fmt, row in rows.items():
        file = folder / row["file"]
        assert file.stat().st_size == row["size_bytes"]
        sidecar = json.loads(file.with_suffix(".json").read_text())
        assert sidecar["classes"] == ["cats", "dogs"] and sidecar["input"]["dtype"] == "uint8", fmt
        assert row["latency_one_thread"]["median_ms"] > 0 and row["latency_all_threads"]["p95_ms"] > 0
    assert rows["onnx"]["agreement"] == 1.0 and rows["onnx"]["max_probability_difference"] < 1e-4
    assert (
        rows["tflite_float"]["agreement"] == 1.0 and rows["tflite_float"]["max_probability_difference"] < 1e-4
    )
    assert rows["tflite_int8"]["agreement"] >= 0.9
    assert rows["tflite_int8"]["size_bytes"] < 0.35 * rows["tflite_float"]["size_bytes"]
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert json.loads(metadata["classes"]) == ["cats", "dogs"]


def classified(model: str, capsys) -> dict[str, tuple[str, float]]:
    assert predict.main([*map(str, GOLDEN), "--model", model]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    return {path: (name, float(p)) for path, name, p in rows}


def test_golden_photos_get_the_same_class_from_keras_the_pyfunc_onnx_and_litert(exported, tmp_path, capsys):
    import mlflow
    from mlflow.models import Model

    from src.serving import loading, pyfunc_model

    cfg, folder, _ = exported
    keras_file = Path(cfg.paths.models) / "final.keras"
    reference = classified(str(keras_file), capsys)
    for name in ("model.onnx", "model_float.tflite"):
        got = classified(str(folder / name), capsys)
        assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in reference.items()}, name
        np.testing.assert_allclose(
            [v[1] for v in got.values()], [v[1] for v in reference.values()], atol=1e-4
        )
    int8 = classified(str(folder / "model_int8.tflite"), capsys)
    agree = np.mean([int8[k][0] == reference[k][0] for k in reference])
    assert agree >= 5 / 6, (int8, reference)
    keras_model, classes = loading.load_keras_file(str(keras_file))
    pyfunc_model.save_model(str(tmp_path / "pyfunc"), Model(), keras_model=keras_model, classes=classes)
    frame = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc")).predict([str(p) for p in GOLDEN])
    assert list(frame["class"]) == [reference[str(p)][0] for p in GOLDEN]


def test_an_empty_format_list_turns_exporting_off_and_still_writes_the_stage_outputs(exported, tmp_path):
    cfg = exported[0].copy()
    cfg.export.formats = []
    cfg.paths.models, cfg.paths.reports = str(tmp_path / "models"), str(tmp_path / "reports")
    summary = stage.timed_run("export", export.run, cfg)
    assert summary["formats"] == {}
    written = [p.name for p in (tmp_path / "models" / "export").iterdir() if not p.name.startswith(".")]
    assert written == ["classes.json"]  # beside the folder's marker
    assert json.loads((tmp_path / "reports" / "export.json").read_text())["formats"] == {}
