"""Xception as the conv base: its weights file recognised, fine-tuning cut only between blocks,
the cached-boundary split of a functional graph agreeing with the whole network, and batch
normalisation kept in inference mode while fine-tuning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from src.config.checks import check_weights_file, validate
from src.config.compose import compose
from src.config.schema import BACKBONES
from src.errors import ConfigError
from tests.conftest import VGG16_WEIGHTS, make_cfg, require_shared, require_xception_weights


def test_xception_weights_are_recognised_and_other_models_weights_refused():
    require_shared()
    weights = require_xception_weights()
    check_weights_file("xception", weights)
    with pytest.raises(ConfigError, match=r"holds 13 convolution kernels .* not the 74 of xception"):
        check_weights_file("xception", VGG16_WEIGHTS)
    with pytest.raises(ConfigError, match=r"holds 74 convolution kernels .* not the 13 of vgg16"):
        check_weights_file("vgg16", weights)


@pytest.mark.parametrize("layers, nearest", [(10, "6 and 16"), (7, "6 and 16"), (117, "116 and 125")])
def test_cuts_inside_a_block_are_refused_naming_the_nearest_whole_blocks(layers, nearest):
    with pytest.raises(ConfigError, match=f"finetune.layers.*inside a block of xception.*{nearest}"):
        validate(compose(["model=xception", "model.weights=null", f"finetune.layers={layers}"]))
    for clean in (6, 16, 26, 116):
        validate(compose(["model=xception", "model.weights=null", f"finetune.layers={clean}"]))


def test_inputs_below_71_px_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="dataset.image_size.*xception needs at least 71 px"):
        validate(compose(["model=xception", "model.weights=null", "dataset.image_size=64"]))


def test_the_listed_cuts_are_the_graphs_clean_cuts_and_each_split_gives_the_base_output():
    import keras

    from src.models import networks

    keras.utils.set_random_seed(0)
    base = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3))
    assert tuple(networks.clean_cuts(base)) == BACKBONES["xception"]["cuts"]
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    assert networks.clean_cuts(vgg) == list(range(19))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 71, 71, 3)).astype("float32")
    whole = base(images, training=False)
    for n_top in (6, 16, 116):
        bottom, top = networks.split_at(base, n_top)
        np.testing.assert_allclose(top(bottom(images), training=False), whole, rtol=1e-5, atol=1e-5)
        assert {w.path for w in top.weights} <= {w.path for w in base.weights}  # the base's own layers
    assert networks.split_at(base, 10) is None  # inside block 13


@pytest.fixture(scope="module")
def xception_pipeline(tmp_path_factory):
    """The `ci` data through every stage with an Xception base at 71 px."""
    from tests.test_stages import run_all

    require_shared()
    weights = require_xception_weights()
    tmp = tmp_path_factory.mktemp("xception")
    cfg = make_cfg(
        tmp,
        "model=xception",
        f"model.weights={weights}",
        "dataset.image_size=71",
        "finetune.layers=6",
        "head.epochs=2",
        "train.precision=float32",
    )
    return cfg, tmp, run_all(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("augmented", [False, True])
def test_fine_tuning_on_cached_boundary_activations_matches_the_whole_network(
    xception_pipeline, tmp_path, augmented
):
    """At an Xception cut (block 14), training without augmentation and validation always run on
    activations cached at the boundary, and follow the whole network's curves; batch
    normalisation statistics of the unfrozen block do not move."""
    import keras

    from tests.test_stages import finetune_both_ways

    cfg, tmp, results = xception_pipeline
    assert results["extract"]["splits"]["train"]["images"] == 80
    base = keras.applications.Xception(include_top=False, weights=cfg.model.weights, input_shape=(71, 71, 3))
    statistics = {
        "/".join(w.path.split("/")[-2:]): np.array(w)
        for w in base.non_trainable_weights
        if "block14" in w.path
    }
    assert statistics
    histories = {}
    for cached, (summary, history, run_cfg) in finetune_both_ways(cfg, tmp, tmp_path, augmented).items():
        histories[cached] = history
        assert summary["unfrozen"] == [
            "block14_sepconv1",
            "block14_sepconv1_act",
            "block14_sepconv2",
            "block14_sepconv2_act",
        ]
        model = keras.saving.load_model(Path(run_cfg.paths.models) / "final.keras", compile=False)
        for weight in model.get_layer("xception").non_trainable_weights:  # moving means and variances
            name = "/".join(weight.path.split("/")[-2:])
            if name in statistics:
                np.testing.assert_array_equal(np.array(weight), statistics[name])
    np.testing.assert_allclose(histories[True].val_loss, histories[False].val_loss, rtol=2e-3)
    np.testing.assert_allclose(histories[True].loss, histories[False].loss, rtol=2e-3)


@pytest.mark.parametrize("batchnorm, moves", [("frozen", False), ("adapt", True)])
def test_batch_normalisation_of_the_unfrozen_top_trains_only_when_asked_to_adapt(batchnorm, moves):
    """`finetune.batchnorm=adapt`: the unfrozen block's batch normalisation trains (scale, offset
    and moving statistics change in a fit step); frozen (the default), none of it moves."""
    import keras

    from src.models import networks

    keras.utils.set_random_seed(0)
    cfg = compose(["model=xception", "model.weights=null", "augment=none", f"finetune.batchnorm={batchnorm}"])
    base = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3))
    head = networks.head(cfg.head, base.output_shape[1:], 2)
    model = networks.full_model(base, head, cfg.model, cfg.augment, cfg.seed)
    unfrozen = networks.unfreeze_top(base, 6, cfg.finetune.batchnorm)
    assert ("block14_sepconv1_bn" in unfrozen) == moves
    assert base.get_layer("block13_sepconv1_bn").trainable is False  # below the cut: frozen either way
    bn = base.get_layer("block14_sepconv2_bn")
    before = [np.array(w) for w in bn.weights]  # gamma, beta, moving mean, moving variance
    networks.compile_model(model, 2, "adam", 1e-2)
    images = np.random.default_rng(0).uniform(0, 255, (8, 71, 71, 3)).astype("float32")
    model.fit(images, np.array([0, 1] * 4), batch_size=8, epochs=1, verbose=0)
    changed = [not np.allclose(np.array(w), b) for w, b in zip(bn.weights, before)]
    assert changed == [moves] * 4, [w.path for w in bn.weights]
