"""The config: params.yaml in sync with conf/, presets compose, bad values are refused early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.config.checks import validate
from src.config.compose import compose, load_params, to_yaml
from src.config.paths import PARAMS_FILE, REPO_ROOT
from src.errors import ConfigError
from src.params import drift, params_text, record_line, recorded_overrides

PRESETS = sorted(p.stem for p in (REPO_ROOT / "conf" / "experiment").glob("*.yaml"))


def test_params_yaml_matches_conf():
    """params.yaml must be exactly what conf/ composes with the overrides its first line records
    (regenerate: python -m src.params [overrides])."""
    problem = drift()
    assert problem is None, problem
    overrides = recorded_overrides(PARAMS_FILE.read_text()) or []
    assert OmegaConf.to_container(load_params()) == OmegaConf.to_container(compose(overrides))


def test_params_check_cli_says_what_the_drift_check_says():
    proc = subprocess.run(
        [sys.executable, "-m", "src.params", "--check"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is what conf/ composes with its recorded overrides" in proc.stdout


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["experiment=ci"],
        ["experiment=ci", "head.dropout=0.3", "head.units=[128,64]", "tracking.experiment=cats and dogs"],
        ["experiment=gtsrb_finetune", "finetune.layers=4"],
    ],
)
def test_a_params_yaml_composed_from_any_valid_overrides_passes_the_drift_check(tmp_path, overrides):
    path = tmp_path / "params.yaml"
    path.write_text(params_text(overrides))
    assert recorded_overrides(path.read_text()) == overrides
    assert drift(path) is None
    assert OmegaConf.to_container(load_params(path)) == OmegaConf.to_container(compose(overrides))


def test_a_hand_edited_params_yaml_fails_the_drift_check_naming_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    text = params_text(["experiment=ci", "head.dropout=0.3"])
    assert "  dropout: 0.3\n" in text
    path.write_text(text.replace("  dropout: 0.3\n", "  dropout: 0.4\n"))
    problem = drift(path)
    assert problem is not None and "values differ at head.dropout" in problem
    assert "python -m src.params experiment=ci head.dropout=0.3" in problem

    path.write_text(text.replace("  epochs: 1\n", "  epochs: 1  # one is enough\n", 1))  # same values
    problem = drift(path)
    assert problem is not None and "same values, different text" in problem


def test_a_params_yaml_composed_from_a_conf_that_changed_since_fails(tmp_path):
    """As if the ci preset had trained the head for 2 epochs when params.yaml was composed."""
    path = tmp_path / "params.yaml"
    stale = record_line(["experiment=ci"]) + to_yaml(compose(["experiment=ci", "head.epochs=2"]))
    path.write_text(stale)
    problem = drift(path)
    assert problem is not None and "values differ at head.epochs" in problem


def test_a_params_yaml_without_the_record_line_is_checked_against_the_defaults(tmp_path):
    """What `dvc exp run -S` writes: the composed YAML alone."""
    path = tmp_path / "params.yaml"
    path.write_text(to_yaml(compose()))
    assert drift(path) is None
    path.write_text(to_yaml(compose(["experiment=ci"])))
    problem = drift(path)
    assert problem is not None and "records no overrides" in problem and "values differ at" in problem


def test_a_record_line_that_no_longer_composes_is_reported(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(record_line(["experiment=no_such_preset"]) + to_yaml(compose()))
    problem = drift(path)
    assert problem is not None and "no longer compose" in problem and "no_such_preset" in problem


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    cfg = compose([f"experiment={preset}"])
    assert cfg.preset == preset
    if cfg.dataset.path is None or Path(REPO_ROOT / cfg.dataset.path).is_dir():
        validate(cfg)


@pytest.mark.parametrize(
    "overrides, size",
    [
        ([], 224),  # VGG16's own
        (["model=xception", "model.weights=null"], 299),  # Xception's own
        (["dataset=folder", "dataset.path={photos}", "model=xception", "model.weights=null"], 299),
        (["dataset=flowers", "model=resnet50", "model.weights=null"], 224),
        (["model=small_cnn"], 180),
        (["dataset=gtsrb"], 64),  # the dataset's own size wins over VGG16's
        (["model=xception", "model.weights=null", "dataset.image_size=160"], 160),  # and the user's
        (["experiment=xception_gtsrb"], 128),  # and a preset's
    ],
)
def test_the_image_size_is_the_models_own_unless_the_dataset_preset_or_user_sets_one(
    overrides, size, tmp_path
):
    cfg = compose([o.format(photos=tmp_path) for o in overrides])
    assert cfg.dataset.image_size == size
    assert f"image_size: {size}" in to_yaml(cfg)  # resolved in params.yaml: DVC sees the number


@pytest.mark.parametrize(
    "overrides, backbone, top_block",
    [
        (["dataset=folder", "dataset.path={photos}"], "xception", 6),  # your images: Xception, block 14
        (["dataset=folder", "dataset.path={photos}", "model=vgg16"], "vgg16", 4),  # one override away
        (["dataset=folder", "dataset.path={photos}", "model=resnet50"], "resnet50", 10),
        ([], "vgg16", 4),  # the chapter's cats vs dogs keeps VGG16 and its block 5
        (["dataset=gtsrb"], "vgg16", 4),
    ],
)
def test_your_own_images_default_to_xception_and_top_block_follows_the_backbone(
    overrides, backbone, top_block, tmp_path
):
    cfg = compose([o.format(photos=tmp_path) for o in overrides])
    assert (cfg.model.name, cfg.finetune.layers) == (backbone, top_block)
    assert f"layers: {top_block}" in to_yaml(cfg)  # resolved in params.yaml: DVC sees the number


@pytest.mark.parametrize(
    "name, boundary", [("vgg16", "block4_pool"), ("xception", "add_11"), ("resnet50", "conv5_block2_out")]
)
def test_each_backbones_top_block_starts_after_a_block_boundary(name, boundary):
    from src.config.compose import top_block
    from src.models.networks import conv_base

    base = conv_base(OmegaConf.create({"name": name, "weights": None}), 71)
    assert base.layers[-top_block(name) - 1].name == boundary  # the layer below the unfrozen top


def test_a_preset_with_your_images_keeps_the_backbone_it_names(tmp_path):
    preset = compose(["experiment=gtsrb_finetune", "dataset=folder", f"dataset.path={tmp_path}"])
    assert (preset.model.name, preset.finetune.layers) == ("vgg16", 8)


def test_presets_encode_their_recipes():
    dlwp = compose(["experiment=dlwp_cats_vs_dogs"])
    assert (dlwp.dataset.image_size, list(dlwp.head.units), dlwp.head.pooling) == (224, [256], "avg")
    assert (dlwp.finetune.layers, dlwp.finetune.learning_rate, dlwp.augment.flip) == (4, 1e-5, "horizontal")
    gtsrb = compose(["experiment=gtsrb_finetune"])
    assert gtsrb.finetune.layers == 8 and gtsrb.dataset.test_labels_csv == "Test.csv"
    assert (gtsrb.dataset.image_size, gtsrb.head.epochs, gtsrb.finetune.epochs) == (128, 30, 60)
    assert (gtsrb.finetune.optimizer, gtsrb.finetune.learning_rate, gtsrb.augment.flip) == (
        "adam",
        1e-4,
        None,
    )
    assert dict(gtsrb.dataset.limit_per_class) == {"train": 28, "val": 12, "test": None}
    flowers = compose(["experiment=flowers_resnet50"])
    assert (flowers.model.name, list(flowers.head.units), flowers.head.batchnorm) == (
        "resnet50",
        [2048, 1024],
        True,
    )
    signs = compose(["experiment=xception_gtsrb"])
    assert (signs.finetune.layers, signs.finetune.batchnorm, signs.augment.flip) == (131, "adapt", None)
    assert (signs.finetune.epochs, signs.finetune.schedule, signs.finetune.learning_rate) == (
        40,
        "cosine",
        2e-4,
    )
    cats = compose(["experiment=xception_cats_vs_dogs"])
    assert (cats.dataset.image_size, cats.finetune.layers, cats.finetune.batchnorm) == (299, 16, "frozen")
    cifar = compose(["experiment=cifar10_baseline"])
    assert (cifar.model.name, cifar.head.dropout, cifar.head.epochs) == ("small_cnn", 0.4, 15)


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("head.dropout=1.0", "head.dropout", "[0, 1)"),
        ("head.dropout=-0.1", "head.dropout", "[0, 1)"),
        ("finetune.layers=19", "finetune.layers", "vgg16 has 18 layers"),
        ("dataset.name=imagenet", "dataset.name", "cats_vs_dogs"),
        ("model.name=vgg19", "model.name", "resnet50"),
        ("dataset.image_size=24", "dataset.image_size", "at least 32 px"),
        ("dataset.path=/no/such/folder", "dataset.path", "existing folder"),
        ("model.weights=/no/such.weights.h5", "model.weights", "imagenet"),
        ("head.optimizer=adagrad", "head.optimizer", "rmsprop"),
        ("head.activation=swish", "head.activation", "relu"),
        ("finetune.schedule=step", "finetune.schedule", "cosine"),
        ("augment.mix=blend", "augment.mix", "cutmix"),
        ("augment.mix_alpha=0", "augment.mix_alpha", "0"),
    ],
)
def test_bad_values_are_refused_naming_key_value_and_allowed(override, key, hint):
    with pytest.raises(ConfigError) as err:
        validate(compose([override]))
    message = str(err.value)
    assert message.startswith(f"{key}=") and hint in message and override.split("=", 1)[1] in message


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        (["evaluate.temperature_scaling=true"], "evaluate.temperature_scaling"),
        (["+optuna_trial_id=3"], "Optuna study"),
    ],
)
def test_a_refit_is_refused_where_validation_must_stay_held_out(overrides, hint):
    with pytest.raises(ConfigError) as err:
        validate(compose(["finetune.refit=true", *overrides]))
    assert str(err.value).startswith("finetune.refit=True") and hint in str(err.value)
    validate(compose(["finetune.refit=true"]))  # alone it is fine


def test_folder_dataset_needs_a_path():
    with pytest.raises(ConfigError, match="dataset.path is required"):
        validate(compose(["dataset=folder"]))


def test_params_cli_refuses_bad_value_and_leaves_params_yaml_alone():
    before = PARAMS_FILE.read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "src.params", "finetune.layers=40"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "finetune.layers=40" in proc.stderr and "0..18" in proc.stderr
    assert PARAMS_FILE.read_text() == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+head.dropuot=0.3", "head.dropuot is not a known key"),
        ("+newkey=1", "newkey is not a known key"),
        ("head.pooling=max", "head.pooling='max' is not allowed: choose one of flatten, avg"),
        ("head.dropout=1.5", "head.dropout=1.5 is not allowed: must be in [0, 1)"),
        ("paths.prepared=mlruns", "paths.prepared='mlruns' is not allowed"),
    ],
)
def test_the_schema_refuses_unknown_keys_and_values_while_composing(override, message):
    with pytest.raises(ConfigError) as err:
        compose(["experiment=ci", override])
    assert str(err.value).startswith(message.split(" is not")[0]) and message in str(err.value)


def test_a_loaded_params_yaml_is_checked_against_the_schema_too(tmp_path):
    text = PARAMS_FILE.read_text().replace("  dropout: 0.5\n", "  dropout: 0.5\n  dropuot: 0.3\n")
    assert "dropuot" in text
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match="head.dropuot is not a known key"):
        validate(load_params(tmp_path / "params.yaml"))


def test_an_output_folder_the_pipeline_made_or_a_new_one_is_accepted(tmp_path):
    from src.outputs import folders

    made = folders.claim(tmp_path / "made")
    (made / "x.json").write_text("{}")
    validate(compose(["experiment=ci", f"paths.reports={made}", f"paths.models={tmp_path / 'new'}"]))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"paths.reports=.*not made by this pipeline"):
        compose(["experiment=ci", f"paths.reports={notes}"])
    beside_weights = Path(compose(["experiment=ci"]).model.weights).parent / "not-there-yet"
    validate(compose(["experiment=ci", f"paths.features={beside_weights}"]))  # a new folder is fine


def test_src_train_refuses_an_unknown_key_in_one_line_before_any_stage(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.train",
            "experiment=ci",
            "+head.dropuot=0.3",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "head.dropuot is not a known key" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr and not (tmp_path / "reports").exists()


@pytest.mark.parametrize(
    ("uri", "home"),
    [
        ("http://alice:s3cr3t-TOKEN@tracking-host:5000", "MLFLOW_TRACKING_PASSWORD"),
        ("https://s3cr3t-TOKEN@tracking-host", "MLFLOW_TRACKING_TOKEN"),
        ("'https://tracking-host/api?token=s3cr3t-TOKEN'", "MLFLOW_TRACKING_TOKEN"),
        ("postgresql://mlflow:s3cr3t-TOKEN@db-host/mlflow", "PGPASSWORD"),
    ],
)
def test_credentials_in_the_tracking_uri_are_refused_without_being_repeated(uri, home):
    before = PARAMS_FILE.read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "src.params", f"tracking.uri={uri}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "tracking.uri carries credentials" in output and home in output
    assert "s3cr3t" not in output and PARAMS_FILE.read_text() == before


def test_a_database_user_name_alone_is_no_secret():
    cfg = compose(["tracking.uri=postgresql://mlflow@db-host/mlflow"])
    assert validate(cfg).tracking.uri == "postgresql://mlflow@db-host/mlflow"


def test_an_optuna_storage_with_a_password_stops_the_sweep_before_any_job(tmp_path):
    command = [
        "-m", "src.train", "-m", "experiment=ci", "hparams_search=finetune_optuna",
        "hydra.sweeper.storage=postgresql://optuna:s3cr3t-TOKEN@127.0.0.1:9/optuna",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert (
        proc.returncode != 0
        and "hydra.sweeper.storage carries credentials" in output
        and "PGPASSWORD" in output
    )
    assert "s3cr3t" not in output and not list((tmp_path / "sweep").glob("*/.hydra"))  # no job ran


def test_a_multirun_with_credentials_in_the_tracking_uri_starts_no_parent_run(tmp_path):
    command = [
        "-m", "src.train", "-m", "experiment=ci", "finetune.layers=0,2",
        "tracking.uri=http://me:s3cr3t-TOKEN@127.0.0.1:9", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "tracking.uri carries credentials" in output
    assert "s3cr3t" not in output and not (tmp_path / "sweep" / "0").exists()
