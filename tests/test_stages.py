"""Each stage in turn on a tiny real input (the `ci` preset: 64 px cats vs dogs, real ImageNet
VGG16 weights), then the from-scratch route and `src.predict` on the saved model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src import predict
from src.outputs import folders
from src.serving import loading
from src.stages import finetune, stage
from src.train import STAGES
from tests.conftest import CATS_DOGS, GTSRB, make_cfg, require_shared


def run_all(cfg) -> dict[str, dict]:
    """Every stage in `dvc.yaml` order, each writing where the config says, as `dvc repro` does."""
    return {name: stage.timed_run(name, run, cfg) for name, run in STAGES}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    require_shared()
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = make_cfg(tmp, "head.epochs=2", "train.precision=float32")
    return cfg, tmp, run_all(cfg)


def test_extract_caches_vgg16_features_equal_to_keras_preprocess_and_predict(pipeline):
    import keras

    cfg, tmp, results = pipeline
    features_dir = tmp / "work" / "features"
    feats = np.load(features_dir / "features_test.npy", mmap_mode="r")
    images = np.load(tmp / "work" / "prepared" / "images_test.npy")
    assert feats.shape == (32, 2, 2, 512) and results["extract"]["splits"]["train"]["images"] == 80
    assert np.array_equal(
        np.load(features_dir / "labels_test.npy"), np.load(tmp / "work" / "prepared" / "labels_test.npy")
    )
    keras.mixed_precision.set_global_policy("float32")
    base = keras.applications.VGG16(weights=cfg.model.weights, include_top=False, input_shape=(64, 64, 3))
    reference = base.predict(
        keras.applications.vgg16.preprocess_input(images[:4].astype("float32")), verbose=0
    )
    np.testing.assert_allclose(feats[:4], reference, rtol=1e-4, atol=1e-3)


def test_bfloat16_features_stay_close_to_float32(pipeline, tmp_path):
    from src.fitting import precision
    from src.models import networks

    cfg, tmp, _ = pipeline
    images = np.load(tmp / "work" / "prepared" / "images_test.npy")[:8]
    features = {}
    for policy in ("float32", "mixed_bfloat16"):
        precision.use(policy)
        base = networks.conv_base(cfg.model, 64)
        path = tmp_path / f"{policy}.npy"
        networks.predict_to_file(base, networks.preprocessing(cfg.model), images, 4, path)
        features[policy] = np.load(path)
    precision.use("float32")
    assert features["mixed_bfloat16"].dtype == np.float32  # stored as float32 whatever the policy
    error = np.linalg.norm(features["mixed_bfloat16"] - features["float32"]) / np.linalg.norm(
        features["float32"]
    )
    assert 0 < error < 0.05


def test_precision_auto_follows_the_hardware():
    from src.fitting import precision

    expected = "mixed_bfloat16" if precision.cpu_flags() & {"amx_bf16", "avx512_bf16"} else "float32"
    if not precision.gpu_has_tensor_cores():
        assert precision.resolve("auto") == expected
    assert precision.resolve("float32") == "float32"


def test_xla_choice_follows_the_measured_rule():
    import tensorflow as tf

    from src.fitting import precision

    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    assert precision.use_xla("auto") is on_gpu  # XLA did not help on the CPUs measured
    assert precision.use_xla(False) is False and precision.use_xla(True) is True


def test_train_head_keeps_best_epoch_and_writes_history(pipeline):
    _, tmp, results = pipeline
    history = pd.read_csv(tmp / "work" / "reports" / "head" / "history.csv")
    assert list(history.columns) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]
    assert (history.seconds > 0).all()
    assert history.epoch.tolist() == [1, 2]
    best = results["train_head"]["best"]
    assert best["val_loss"] == pytest.approx(history.val_loss.min())
    assert (tmp / "work" / "models" / "head.keras").is_file()
    assert json.loads((tmp / "work" / "models" / "classes.json").read_text()) == ["cats", "dogs"]


def test_finetune_unfreezes_exactly_block5(pipeline):
    import keras

    cfg, tmp, results = pipeline
    assert results["finetune"]["unfrozen"] == ["block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"]
    model = keras.saving.load_model(tmp / "work" / "models" / "final.keras")
    base = model.get_layer("vgg16")
    original = keras.applications.VGG16(weights=cfg.model.weights, include_top=False, input_shape=(64, 64, 3))
    for name in ("block4_conv3", "block5_conv3"):
        changed = not np.allclose(
            base.get_layer(name).get_weights()[0], original.get_layer(name).get_weights()[0]
        )
        assert changed == (name == "block5_conv3"), name
    assert len(pd.read_csv(tmp / "work" / "reports" / "finetune" / "history.csv")) == 1


AUGMENT = {"flip": "horizontal", "rotation": 0.1, "zoom": 0.2}
NO_AUGMENT = {"flip": None, "rotation": 0.0, "zoom": 0.0}


def finetune_config(cfg, tmp: Path, out: Path, augment: dict, **finetune_keys):
    """The pipeline's config for a float32 finetune.run with `augment` and `finetune_keys`, its
    models and reports under `out`, starting from the pipeline's head."""
    from omegaconf import OmegaConf

    run_cfg = OmegaConf.merge(
        cfg,
        {
            "augment": augment,
            "train": {"precision": "float32"},
            "finetune": finetune_keys,
            "paths": {"models": str(out / "models"), "reports": str(out / "reports")},
        },
    )
    Path(run_cfg.paths.models).mkdir(parents=True)
    shutil.copy(tmp / "work" / "models" / "head.keras", run_cfg.paths.models)
    return run_cfg


def finetune_both_ways(cfg, tmp: Path, out: Path, augmented: bool) -> dict:
    """finetune.run (2 epochs, float32) from the pipeline's head, with and without activations
    cached at the freeze boundary: cached -> (summary, history, config), after checking what
    the summary says was cached."""
    runs = {}
    for cached in (True, False):
        augment = AUGMENT if augmented else NO_AUGMENT
        run_cfg = finetune_config(cfg, tmp, out / str(cached), augment, cached_activations=cached, epochs=2)
        summary = finetune.run(run_cfg)
        assert summary["cached_activations"] is (cached and not augmented)
        assert summary.get("cached_validation", False) is cached
        history = pd.read_csv(Path(run_cfg.paths.reports) / "finetune" / "history.csv")
        runs[cached] = (summary, history, run_cfg)
    return runs


@pytest.mark.parametrize("augmented", [False, True])
def test_finetune_from_cached_boundary_activations_matches_the_full_model(pipeline, tmp_path, augmented):
    """Training (without augmentation) and validation (always) on activations cached at the
    freeze boundary follow the same curves as running the whole network, and save an image
    model whose validation loss is the one recorded."""
    import keras

    from src.data import arrays
    from src.stages import evaluate

    cfg, tmp, _ = pipeline
    histories = {}
    for cached, (_, history, run_cfg) in finetune_both_ways(cfg, tmp, tmp_path, augmented).items():
        histories[cached] = history
        model = keras.saving.load_model(Path(run_cfg.paths.models) / "final.keras")
        assert model.input_shape == (None, 64, 64, 3)
        # the saved whole-network model scores the validation images as the best epoch did
        images, labels = arrays.load_images(run_cfg, "val")
        scores, _ = evaluate.score(model, images, labels, 2, 16)
        best = history.loc[history.val_loss.idxmin()]
        assert scores["accuracy"] == pytest.approx(best.val_accuracy, abs=1e-6)
    np.testing.assert_allclose(histories[True].val_loss, histories[False].val_loss, rtol=2e-3)
    np.testing.assert_allclose(histories[True].loss, histories[False].loss, rtol=2e-3)


def test_finetune_on_mixed_batches_trains_on_images_and_validates_unmixed(pipeline, tmp_path):
    """`augment.mix` alone makes fine-tuning run on images (mixing needs them), validation still
    uses the cached activations of plain images, and the saved model scores as recorded."""
    import keras

    from src.data import arrays
    from src.stages import evaluate

    cfg, tmp, _ = pipeline
    run_cfg = finetune_config(cfg, tmp, tmp_path, {**NO_AUGMENT, "mix": "cutmix"}, epochs=2)
    summary = finetune.run(run_cfg)
    assert summary["cached_activations"] is False and summary["cached_validation"] is True
    history = pd.read_csv(Path(run_cfg.paths.reports) / "finetune" / "history.csv")
    assert len(history) == 2
    model = keras.saving.load_model(Path(run_cfg.paths.models) / "final.keras")
    images, labels = arrays.load_images(run_cfg, "val")
    scores, _ = evaluate.score(model, images, labels, 2, 16)
    best = history.loc[history.val_loss.idxmin()]
    assert scores["accuracy"] == pytest.approx(best.val_accuracy, abs=1e-6)


@pytest.mark.parametrize("augmented", [False, True])
def test_a_refit_trains_on_train_and_val_and_keeps_the_last_epoch(pipeline, tmp_path, augmented):
    """`finetune.refit`: training runs on train + val (on cached boundary activations without
    augmentation, on images with it), validates on nothing and keeps the last epoch; evaluate
    then reports no validation accuracy, as the final model saw those images."""
    from src.data import arrays
    from src.stages import evaluate

    cfg, tmp, _ = pipeline
    losses = {}
    for refit in (False, True):
        augment = AUGMENT if augmented else NO_AUGMENT
        run_cfg = finetune_config(cfg, tmp, tmp_path / str(refit), augment, epochs=2, refit=refit)
        summary = stage.timed_run("finetune", finetune.run, run_cfg)
        history = pd.read_csv(Path(run_cfg.paths.reports) / "finetune" / "history.csv")
        losses[refit] = history.loss.iloc[0]
    n_train, n_val = (len(arrays.load_images(run_cfg, s)[1]) for s in ("train", "val"))
    assert (summary["refit"], summary["trained_on"]) == (True, n_train + n_val)
    assert summary["cached_activations"] is not augmented and not summary.get("cached_validation")
    assert summary["best"] == {"epoch": 2, "val_loss": None, "val_accuracy": None}
    assert len(history) == 2 and history.val_loss.isna().all()
    assert losses[True] != pytest.approx(losses[False], rel=1e-3)  # other images, same seed
    assert evaluate.val_accuracy(run_cfg) is None  # not the head's: the final model saw val
    if augmented:  # the whole evaluation, curves with empty val columns included, in a store of its own
        from omegaconf import OmegaConf

        store = {"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
        stage.timed_run("evaluate", evaluate.run, OmegaConf.merge(run_cfg, store))
        reports = Path(run_cfg.paths.reports)
        metrics = json.loads((reports / "metrics.json").read_text())
        assert "val" not in metrics and metrics["test"]["accuracy"] > 0.5
        assert (reports / "figures" / "curves.png").stat().st_size > 0


def test_cosine_schedule_decays_the_learning_rate_to_zero_over_all_epochs():
    import keras

    from src.models import networks

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(10, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    steps = networks.decay_steps("cosine", 2, len(x), 4)
    assert steps == 6 and networks.decay_steps("constant", 2, len(x), 4) == 0
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs))
    networks.compile_model(model, 2, "adam", 1e-2, decay_steps=steps)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-2)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # 3 of 6 steps: half way down the cosine
    assert float(model.optimizer.learning_rate) == pytest.approx(5e-3, rel=1e-4)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.0, abs=1e-9)


def test_photometric_augmentation_varies_light_and_contrast_in_training_only(tmp_path):
    from PIL import Image

    from src.models import networks

    require_shared()
    files = sorted((GTSRB / "train" / "14").glob("*.png"))[:8]  # stop signs from four tracks
    images = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype="float32") for f in files])
    cfg = make_cfg(tmp_path, "augment=none", "augment.brightness=0.3", "augment.contrast=0.5")
    layer = networks.augmentation(cfg.augment, seed=3)
    assert [type(x).__name__ for x in layer.layers] == ["RandomBrightness", "RandomContrast"]
    changed = np.asarray(layer(images, training=True))
    assert changed.min() >= 0 and changed.max() <= 255  # still pixels, before preprocessing
    brightness, spread = changed.mean(axis=(1, 2, 3)), changed.std(axis=(1, 2, 3))
    before_brightness, before_spread = images.mean(axis=(1, 2, 3)), images.std(axis=(1, 2, 3))
    assert np.abs(brightness - before_brightness).max() > 5  # some image got lighter or darker
    assert np.abs(spread / before_spread - 1).max() > 0.05  # some image's contrast changed
    np.testing.assert_array_equal(np.asarray(layer(images, training=False)), images)
    assert networks.augmentation(make_cfg(tmp_path, "augment=none").augment, seed=3) is None


def test_evaluate_writes_metrics_plots_and_one_mlflow_run(pipeline):
    from mlflow import MlflowClient

    cfg, tmp, results = pipeline
    reports = tmp / "work" / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(metrics) == {"val", "test", "head_test", "macro_f1"}
    assert metrics["val"]["accuracy"] == pytest.approx(results["finetune"]["best"]["val_accuracy"], abs=1e-6)
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and metrics["test"]["loss"] > 0
    timings = json.loads((reports / "timings.json").read_text())
    assert set(timings) == {"download", "prepare", "extract", "train_head", "finetune"}
    assert set(results["evaluate"]["per_class"]) == {"cats", "dogs"}
    report = pd.read_csv(reports / "classification_report.csv", index_col=0)
    assert {"cats", "dogs", "macro avg"} <= set(report.index)
    confusion = pd.read_csv(reports / "plots" / "confusion.csv")
    assert len(confusion) == 32 and set(confusion.actual) == {"cats", "dogs"}
    assert {p.name for p in (reports / "figures").iterdir()} == {
        "curves.png",
        "confusion_matrix.png",
        "misclassified.png",
        "reliability.png",
    }
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(results["evaluate"]["mlflow"]["run_id"])
    assert run.data.params["finetune.layers"] == "4" and run.data.params["preset"] == "ci"
    assert run.data.metrics["test.accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "head.val_loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "finetune.val_loss")] == [3]
    assert run.data.tags["dataset_fingerprint"] == results["prepare"]["fingerprint"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"figures", "metrics.json", "classes.json", "config.yaml", "counts.csv"} <= artifacts
    versions = client.search_model_versions(f"name='{cfg.tracking.registered_model}'")
    assert [v.run_id for v in versions] == [run.info.run_id]


def test_predict_classifies_validation_images(pipeline, capsys):
    _, tmp, _ = pipeline
    folder = CATS_DOGS / "validation" / "dogs"
    files = sorted(folder.iterdir())[:3]
    model, classes = loading.load_model(str(tmp / "work" / "models" / "final.keras"))
    rows = loading.predict(model, classes, files)
    assert [r["path"] for r in rows] == [str(f) for f in files]
    assert all(r["class"] in ("cats", "dogs") and 0.5 <= r["probability"] <= 1.0 for r in rows)
    assert predict.main([str(files[0]), "--model", str(tmp / "work" / "models" / "final.keras")]) == 0
    out = capsys.readouterr().out.strip().split("\t")
    assert out[0] == str(files[0]) and out[1] in ("cats", "dogs")


def test_predict_from_mlflow_registry(pipeline, monkeypatch):
    cfg, _, results = pipeline
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.uri)
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.tensorflow.load_model(f"models:/{cfg.tracking.registered_model}/1")
    info = mlflow.models.get_model_info(f"models:/{cfg.tracking.registered_model}/1")
    assert info.metadata["classes"] == ["cats", "dogs"]
    assert model.input_shape == (None, 64, 64, 3)


@pytest.mark.parametrize("mix", ["null", "mixup"])
def test_from_scratch_model_flows_through_the_same_stages(tmp_path, mix):
    require_shared()
    cfg = make_cfg(
        tmp_path,
        f"augment.mix={mix}",  # mixed batches: soft targets for the 43-way softmax
        "model=small_cnn",
        "model.weights=null",
        "model.filters=[8,16]",
        "finetune=none",
        f"dataset.path={GTSRB}",
        "dataset.test_labels_csv=Test.csv",
        "dataset.image_size=32",
        "dataset.limit_per_class.train=4",
        "dataset.limit_per_class.val=2",
        "dataset.limit_per_class.test=2",
        "head.epochs=1",
        "tracking.enabled=false",
    )
    results = run_all(cfg)
    assert results["extract"]["pretrained"] is False
    assert sorted(p.name for p in (tmp_path / "work" / "features").iterdir()) == [
        folders.MARKER,
        "info.json",
    ]
    assert results["finetune"]["unfrozen"] == [] and results["finetune"]["epochs"] == 0
    assert results["evaluate"]["head_test"] is None and "mlflow" not in results["evaluate"]
    assert len(results["evaluate"]["per_class"]) == 43
    import keras

    trained = keras.saving.load_model(tmp_path / "work" / "models" / "head.keras")
    soft = "categorical_crossentropy" if mix == "mixup" else "sparse_categorical_crossentropy"
    assert trained.loss == soft  # trained on one-hot blends, or on the integer labels
