"""What the pipeline refuses before any work: output folders over what the user owns, values
of the wrong type, weight files of another model, untrained models; folders it did not build
are never replaced; content changes (not just names and sizes) are noticed; temp folders of
killed runs are cleaned, those of live ones never."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from src import errors
from src.config.checks import validate
from src.config.compose import compose
from src.config.paths import PARAMS_FILE, REPO_ROOT
from src.errors import ConfigError
from src.outputs import atomic, folders, hashing
from src.outputs.atomic import atomic_file
from src.stages import download, reuse, stage
from tests import corpus
from tests.conftest import CATS_DOGS, VGG16_WEIGHTS, make_cfg, path_overrides, require_shared, small_images


@pytest.fixture
def weights_copy(tmp_path) -> Path:
    require_shared()
    target = tmp_path / "weights" / "vgg16.weights.h5"
    target.parent.mkdir()
    shutil.copyfile(VGG16_WEIGHTS, target)
    return target


# --- output folders over what the user owns -------------------------------------------------


@pytest.mark.parametrize(
    ("override", "names"),
    [
        (f"paths.prepared={CATS_DOGS}", "dataset.path"),
        (f"paths.features={CATS_DOGS / 'train'}", "dataset.path"),
        (f"paths.cache={CATS_DOGS.parent}", "dataset.path"),
        (f"paths.models={VGG16_WEIGHTS.parent}", "model.weights"),
        (f"paths.reports={REPO_ROOT / 'conf'}", "conf/"),
        (f"paths.raw={REPO_ROOT / 'src' / 'data'}", "src/"),
        (f"paths.prepared={REPO_ROOT}", "the repository root"),
        (f"paths.features={Path.home()}", "the home folder"),
        ("paths.features=data/prepared/inner", "paths.prepared"),
    ],
)
def test_output_folders_over_user_data_are_refused(tmp_path, override, names):
    require_shared()
    key = override.split("=", 1)[0]
    overrides = [o for o in path_overrides(tmp_path) if not o.startswith(f"{key}=")]
    if "data/prepared" in override:
        overrides = [o for o in overrides if not o.startswith("paths.prepared=")] + [
            "paths.prepared=data/prepared"
        ]
    with pytest.raises(ConfigError) as err:  # while composing: before any stage or DVC runs
        compose(
            [
                "experiment=ci",
                f"dataset.path={CATS_DOGS}",
                f"model.weights={VGG16_WEIGHTS}",
                *overrides,
                override,
            ]
        )
    message = str(err.value)
    assert message.startswith("paths.") and key in message and names in message


def test_params_cli_refuses_an_output_on_the_dataset_and_leaves_params_yaml(tmp_path):
    require_shared()
    before = PARAMS_FILE.read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "src.params", "experiment=ci", f"paths.prepared={CATS_DOGS}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "paths.prepared=" in proc.stderr and "dataset.path" in proc.stderr
    assert "Traceback" not in proc.stderr and PARAMS_FILE.read_text() == before


def test_a_folder_the_pipeline_did_not_build_is_never_replaced(tmp_path):
    notes = tmp_path / "notes"
    corpus.text_file(notes / "todo.txt", "my notes\n")
    built = folders.staging_dir(notes)
    (built / "images_train.npy").write_bytes(b"x")
    with pytest.raises(errors.StageError, match="not made by this pipeline"):
        folders.replace_dir(built, notes)
    assert (notes / "todo.txt").read_text() == "my notes\n" and not built.exists()
    # a folder it built (marker inside) is replaced, and so is an empty one
    replaced = folders.replace_dir(folders.staging_dir(tmp_path / "ours"), tmp_path / "ours")
    again = folders.staging_dir(replaced)
    (again / "new").write_text("1")
    assert (folders.replace_dir(again, replaced) / "new").is_file()
    (tmp_path / "empty").mkdir()
    folders.replace_dir(folders.staging_dir(tmp_path / "empty"), tmp_path / "empty")
    assert (tmp_path / "empty" / folders.MARKER).is_file()


def test_prepare_into_a_folder_of_notes_keeps_the_notes(tmp_path):
    from src.stages import prepare

    root = corpus.class_tree(tmp_path / "images", {"a": 6, "b": 6})
    notes = corpus.text_file(tmp_path / "notes" / "todo.txt").parent
    cfg = compose([*small_images(root), *path_overrides(tmp_path / "w")])
    cfg.paths.prepared = str(notes)
    with pytest.raises(ConfigError, match="paths.prepared=.*not made by this pipeline"):
        validate(cfg)  # refused up front
    download.run(cfg)
    with pytest.raises(errors.StageError, match="not made by this pipeline"):
        prepare.run(cfg)  # and, should a config get past the check, by the stage itself
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


# --- values refused up front ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("dataset.image_size=100000", "dataset.image_size", "[8, 1024]"),
        ("head.units=[-5]", "head.units", "positive integers"),
        ("head.units=[64,abc]", "head.units", "Integer"),
        ("seed=abc", "seed", "Integer"),
        ("head.learning_rate=true", "head.learning_rate", "Float"),
        ("dataset.unknown_labels=ignore", "dataset.unknown_labels", "error, drop"),
        ("dataset.max_pixels=10", "dataset.max_pixels", ">= 1000000"),
    ],
)
def test_values_of_the_wrong_type_are_refused(override, key, hint):
    with pytest.raises(ConfigError) as err:
        validate(compose([override]))  # compose refuses it already
    assert str(err.value).startswith(f"{key}=") and hint in str(err.value)


def test_untrained_models_are_refused_one_phase_training_is_not():
    with pytest.raises(ConfigError, match="untrained"):
        validate(compose(["head.epochs=0", "finetune.epochs=0"]))
    with pytest.raises(ConfigError, match="untrained"):
        validate(compose(["head.epochs=0", "finetune=none"]))
    with pytest.raises(ConfigError, match="head.epochs"):
        validate(compose(["experiment=cifar10_baseline", "head.epochs=0"]))
    validate(compose(["head.epochs=0", "finetune.epochs=3"]))  # head and top trained together


def test_weight_files_of_the_wrong_kind_are_refused_before_extract(tmp_path, weights_copy):
    text = corpus.text_file(tmp_path / "weights.h5")
    with pytest.raises(ConfigError, match="not an HDF5 weights file"):
        validate(compose([f"model.weights={text}"]))
    with pytest.raises(ConfigError, match="13 convolution kernels"):
        validate(compose(["model=resnet50", f"model.weights={weights_copy}"]))
    import keras

    other = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3)])
    other.save_weights(tmp_path / "small.weights.h5")
    with pytest.raises(ConfigError, match="not the 13 of vgg16"):
        validate(compose([f"model.weights={tmp_path / 'small.weights.h5'}"]))
    validate(compose([f"model.weights={weights_copy}"]))


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["nosuch.key=1"], "nosuch.key"),
        (["experiment=nosuch"], "experiment/nosuch"),
        (["head.units=["], "head.units"),
    ],
)
def test_params_cli_reports_unknown_keys_and_presets_cleanly(args, shown):
    proc = subprocess.run(
        [sys.executable, "-m", "src.params", *args], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and shown in proc.stderr
    assert "Traceback" not in proc.stderr


# --- content, not names and sizes -----------------------------------------------------------


def _bmp_tree(root: Path, seed: int) -> Path:
    """Two classes of uncompressed BMPs: other pixels, same names, same sizes."""
    for name in ("a", "b"):
        for i in range(6):
            corpus.image(root / name / f"{name}{i}.bmp", 16, seed=seed * 100 + i + (50 if name == "b" else 0))
    return root


def test_same_names_and_sizes_other_pixels_are_not_reused(tmp_path):
    from src.stages import prepare

    one, two = _bmp_tree(tmp_path / "one", 1), _bmp_tree(tmp_path / "two", 2)
    assert [p.stat().st_size for p in sorted(one.rglob("*.bmp"))] == [
        p.stat().st_size for p in sorted(two.rglob("*.bmp"))
    ]
    work = path_overrides(tmp_path / "w")
    results = []
    for root in (one, two, one):
        cfg = validate(compose([*small_images(root), *work]))
        download.run(cfg)
        results.append(reuse.reuse_or_run(cfg, "prepare", prepare.run))
    assert [r["reused"] for r in results] == [False, False, True]
    assert results[0]["fingerprint"] != results[1]["fingerprint"]
    # a file rewritten in place (same size) changes the digest too
    before = download.fingerprint(one, tmp_path / "h.sqlite")
    corpus.image(one / "a" / "a0.bmp", 16, seed=999)
    assert download.fingerprint(one, tmp_path / "h.sqlite") != before


def test_digests_are_remembered_and_follow_content(tmp_path):
    path = corpus.text_file(tmp_path / "f.txt", "one")
    db = tmp_path / "hashes.sqlite"
    first = hashing.file_digest(path, db)
    assert hashing.file_digest(path, db) == first
    time.sleep(0.01)
    path.write_text("two")
    assert hashing.file_digest(path, db) != first


def test_replaced_weights_change_the_feature_key(tmp_path, weights_copy):
    cfg = make_cfg(tmp_path, f"model.weights={weights_copy}")
    download.run(cfg)
    prepared = Path(cfg.paths.prepared)
    prepared.mkdir(parents=True)
    (prepared / "info.json").write_text(json.dumps({"cache_key": "k"}))
    before = reuse.stage_key(cfg, "extract")
    assert reuse.stage_key(cfg, "extract") == before
    with h5py.File(weights_copy, "r+") as f:  # same file, same size, other numbers
        bias = f["layers/conv2d/vars/1"]
        bias[...] = np.asarray(bias) + 1.0
    assert reuse.stage_key(cfg, "extract") != before


# --- leftovers of killed runs ---------------------------------------------------------------


def test_temp_folders_of_killed_runs_are_removed_live_ones_kept(tmp_path):
    models = tmp_path / "models"
    code = (
        "import sys, time; from pathlib import Path; from src.outputs import folders\n"
        "with folders.scratch_dir(Path(sys.argv[1]), 'checkpoint') as d:\n"
        "    (d / 'best.weights.h5').write_bytes(b'x' * 1000); print(d, flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(models)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    left = Path(proc.stdout.readline().strip())
    assert left.is_dir()
    assert folders.clean_stale(models) == [] and left.is_dir()  # its owner still runs
    with folders.scratch_dir(models) as mine:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert folders.clean_stale(models) == [left]
        assert not left.exists() and mine.is_dir()  # ours is live: kept
    staging = folders.staging_dir(tmp_path / "features")
    assert folders.clean_stale(tmp_path) == [] and staging.is_dir()


def test_atomic_writes_leave_the_old_file_whole_on_error_and_no_temp_behind(tmp_path):
    target = tmp_path / "reports" / "head.json"
    atomic.write_json(target, {"epochs": 3})
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text('{"epo')  # half written when the writer fails
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"epochs": 3}
    assert sorted(p.name for p in target.parent.iterdir()) == ["head.json"]
    code = (  # a writer killed mid-file leaves its temp entry; the next clean removes it
        "import sys; from pathlib import Path; from src.outputs.atomic import atomic_file\n"
        "with atomic_file(Path(sys.argv[1])) as tmp:\n"
        "    tmp.write_text('half'); print(tmp, flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(target)],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    left = Path(proc.stdout.readline().strip())
    assert left.parent == target.parent and left.read_text() == "half"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert folders.clean_stale(target.parent) == [left]
    assert sorted(p.name for p in target.parent.iterdir()) == ["head.json"]


def test_timed_run_cleans_what_a_killed_extract_left(tmp_path):
    cfg = compose(path_overrides(tmp_path))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    leftovers = [
        tmp_path / f".features.tmp-{pid}-abc",
        tmp_path / "cache" / "extract" / f".0123.tmp-{pid}-def",
        tmp_path / "models" / f".checkpoint.tmp-{pid}-ghi",
    ]
    for folder in leftovers:
        corpus.text_file(folder / "features_train.npy", "partial")
    user = corpus.text_file(tmp_path / ".my.tmp-notes" / "keep.txt").parent  # not named by the pipeline
    stage.timed_run("noop", lambda cfg: {}, cfg)
    assert not any(p.exists() for p in leftovers) and user.is_dir()
