"""Keras models of the pipeline: pretrained conv bases, their input preprocessing, the dense
head, the from-scratch CNN, augmentation, and the full image -> class model.

Every model here uses stock Keras layers only, so a saved `.keras` file loads anywhere with
`keras.saving.load_model` (no custom objects to register)."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from src.config.paths import resolve_input
from src.config.schema import BACKBONES
from src.data import arrays

# Channel means that VGG16 and ResNet50 (Keras' "caffe" preprocessing) subtract, in BGR order.
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)


def _keras():
    import keras

    return keras


def output_spec(n_classes: int) -> tuple[int, str, str]:
    """(units, activation, loss): sigmoid + binary CE for 2 classes, softmax + sparse CE for more."""
    if n_classes == 2:
        return 1, "sigmoid", "binary_crossentropy"
    return n_classes, "softmax", "sparse_categorical_crossentropy"


def probabilities(raw: np.ndarray) -> np.ndarray:
    """Model outputs as an (N, n_classes) probability matrix (a sigmoid output becomes 2 columns)."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim == 2 and raw.shape[1] == 1:
        return np.concatenate([1.0 - raw, raw], axis=1)
    return raw


def optimizer(name: str, learning_rate: float, decay_steps: int = 0):
    """A Keras optimizer; with `decay_steps`, its learning rate follows a cosine from
    `learning_rate` down to 0 over that many steps."""
    keras = _keras()
    rate = (
        keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps) if decay_steps else learning_rate
    )
    return {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[
        name
    ](learning_rate=rate)


def decay_steps(schedule: str, epochs: int, examples: int, batch_size: int) -> int:
    """Optimizer steps for the learning-rate schedule: all steps of `epochs` epochs for
    "cosine", 0 (a constant rate) for "constant"."""
    return epochs * -(-examples // batch_size) if schedule == "cosine" else 0


def compile_model(
    model,
    n_classes: int,
    optimizer_name: str,
    learning_rate: float,
    jit_compile: bool = False,
    decay_steps: int = 0,
    soft_labels: bool = False,
) -> None:
    """Compile for integer labels, or with `soft_labels` for the float targets of mixed batches
    (one-hot vectors or blends of them; `src.data.mixing`)."""
    _, _, loss = output_spec(n_classes)
    if soft_labels and n_classes > 2:
        loss = "categorical_crossentropy"
    model.compile(
        optimizer=optimizer(optimizer_name, learning_rate, decay_steps),
        loss=loss,
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )


def preprocessing(model_cfg: DictConfig):
    """The input preprocessing of a model as a frozen layer on RGB 0-255 images.

    VGG16/ResNet50 ("caffe"): RGB -> BGR and ImageNet mean subtraction, done by a fixed 1x1
    convolution (a channel permutation plus bias), which equals `preprocess_input` exactly.
    Xception ("tf"): scale to [-1, 1], as `xception.preprocess_input`. From scratch: [0, 1].
    With `model.standardize`, each image is first normalised for contrast (`standardization`)."""
    keras = _keras()
    if not model_cfg.standardize:
        return _own_preprocessing(model_cfg, "preprocess")
    own = _own_preprocessing(model_cfg, "backbone_preprocess")
    return keras.Sequential([*standardization(), own], name="preprocess")


def standardization() -> list:
    """Per-image contrast normalisation on 0-255 pixels, as two stock layers: every image to zero
    mean and unit variance over all its pixels and channels, then back to the 0-255 scale (mean
    127.5, one standard deviation 64 levels) that a backbone's preprocessing expects. A dark or
    washed-out photo comes out with the contrast of a well-lit one; uniform brightness changes
    vanish. Computed in float32 under any precision policy."""
    keras = _keras()
    return [
        # epsilon in squared grey levels, a tenth of a level's deviation: below 8-bit rounding
        # noise, so a uniform image stays uniform and a dark one is stretched as much as it needs
        keras.layers.LayerNormalization(
            axis=(1, 2, 3), epsilon=0.01, center=False, scale=False, dtype="float32", name="standardize"
        ),
        keras.layers.Rescaling(64.0, offset=127.5, dtype="float32", name="standardize_scale"),
    ]


def _own_preprocessing(model_cfg: DictConfig, name: str):
    """The model's own preprocessing layer (see `preprocessing`)."""
    keras = _keras()
    if model_cfg.name not in BACKBONES:
        return keras.layers.Rescaling(1.0 / 255, name=name)
    if model_cfg.name == "xception":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name=name)
    flip = np.zeros((1, 1, 3, 3), dtype=np.float32)
    for out_channel, in_channel in enumerate((2, 1, 0)):  # output BGR from input RGB
        flip[0, 0, in_channel, out_channel] = 1.0
    bias = -np.array(CAFFE_BGR_MEANS, dtype=np.float32)
    layer = keras.layers.Conv2D(3, 1, name=name, trainable=False)
    layer.build((None, None, None, 3))
    layer.set_weights([flip, bias])
    return layer


def conv_base(model_cfg: DictConfig, image_size: int):
    """The pretrained conv base (no top) with weights `imagenet`, a file path, or random (null)."""
    keras = _keras()
    app = {
        "vgg16": keras.applications.VGG16,
        "resnet50": keras.applications.ResNet50,
        "xception": keras.applications.Xception,
    }[model_cfg.name]
    weights = model_cfg.weights
    if weights not in (None, "imagenet"):
        weights = str(resolve_input(weights))
    try:
        return app(weights=weights, include_top=False, input_shape=(image_size, image_size, 3))
    except Exception as err:
        from src.errors import StageError

        if weights == "imagenet":
            raise StageError(
                f"could not load the ImageNet weights of {model_cfg.name} ({err}). Keras downloads them "
                "once into ~/.keras/models; offline, point model.weights at a local .weights.h5 file "
                "(e.g. model.weights=/path/to/vgg16_imagenet_notop.weights.h5)"
            ) from err
        if weights is not None:
            raise StageError(
                f"model.weights={model_cfg.weights}: could not load it into {model_cfg.name} ({err}); "
                f"use the conv-base (no top) weights of {model_cfg.name}"
            ) from err
        raise


def augmentation(augment_cfg: DictConfig, seed: int):
    """A Sequential of random image layers (identity at inference), or None when all are off."""
    keras = _keras()
    layers = []
    if augment_cfg.flip:
        layers.append(keras.layers.RandomFlip(augment_cfg.flip, seed=seed))
    if augment_cfg.rotation:
        layers.append(keras.layers.RandomRotation(augment_cfg.rotation, seed=seed))
    if augment_cfg.translate:
        layers.append(keras.layers.RandomTranslation(augment_cfg.translate, augment_cfg.translate, seed=seed))
    if augment_cfg.shear:
        # (0, s) rather than s: the layer flips the sign at random, so the shear is as symmetric,
        # and the range is one that its config can be rebuilt from (a number s is stored as
        # (-s, s), which loading a saved model then refuses)
        shear = (0.0, augment_cfg.shear)
        layers.append(keras.layers.RandomShear(shear, shear, seed=seed))
    if augment_cfg.zoom:
        layers.append(keras.layers.RandomZoom(augment_cfg.zoom, seed=seed))
    if augment_cfg.brightness:  # on 0-255 pixels: the layers come before the backbone's preprocessing
        layers.append(keras.layers.RandomBrightness(augment_cfg.brightness, value_range=(0, 255), seed=seed))
    if augment_cfg.contrast:
        layers.append(keras.layers.RandomContrast(augment_cfg.contrast, value_range=(0, 255), seed=seed))
    return keras.Sequential(layers, name="augmentation") if layers else None


def _dense_stack(x, head_cfg: DictConfig, n_classes: int):
    """[BN] -> Dense -> Dropout for each hidden size, then [BN] -> output layer."""
    keras = _keras()
    for i, units in enumerate(head_cfg.units):
        if head_cfg.batchnorm:
            x = keras.layers.BatchNormalization(name=f"head_bn{i}")(x)
        x = keras.layers.Dense(units, activation=head_cfg.activation, name=f"head_dense{i}")(x)
        if head_cfg.dropout:
            x = keras.layers.Dropout(head_cfg.dropout, name=f"head_dropout{i}")(x)
    if head_cfg.batchnorm:
        x = keras.layers.BatchNormalization(name="head_bn_out")(x)
    units, activation, _ = output_spec(n_classes)
    # float32 output: probabilities and the loss stay exact under a mixed precision policy
    return keras.layers.Dense(units, activation=activation, name="predictions", dtype="float32")(x)


def head(head_cfg: DictConfig, feature_shape: tuple[int, ...], n_classes: int):
    """The dense classifier that trains on cached conv features."""
    keras = _keras()
    inputs = keras.Input(shape=feature_shape, name="features")
    pool = keras.layers.Flatten if head_cfg.pooling == "flatten" else keras.layers.GlobalAveragePooling2D
    x = pool(name="head_pool")(inputs)
    return keras.Model(inputs, _dense_stack(x, head_cfg, n_classes), name="head")


def full_model(base, head_model, model_cfg: DictConfig, augment_cfg: DictConfig, seed: int):
    """RGB image (0-255) -> [augmentation] -> preprocessing -> conv base -> head."""
    keras = _keras()
    size = base.input_shape[1]
    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = inputs
    augment = augmentation(augment_cfg, seed)
    if augment is not None:
        x = augment(x)  # random only while training
    x = preprocessing(model_cfg)(x)
    x = base(x, training=False)  # not binding once unfrozen: unfreeze_top keeps BatchNorm frozen or not
    outputs = head_model(x)
    return keras.Model(inputs, outputs, name=f"{model_cfg.name}_classifier")


def scratch_model(
    model_cfg: DictConfig,
    head_cfg: DictConfig,
    augment_cfg: DictConfig,
    image_size: int,
    n_classes: int,
    seed: int,
):
    """A small CNN trained from scratch: conv blocks, then the same dense stack as the head."""
    keras = _keras()
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = inputs
    augment = augmentation(augment_cfg, seed)
    if augment is not None:
        x = augment(x)
    x = preprocessing(model_cfg)(x)
    for block, filters in enumerate(model_cfg.filters):
        for conv in range(model_cfg.convs_per_block):
            x = keras.layers.Conv2D(
                filters,
                3,
                padding="same",
                use_bias=not model_cfg.batchnorm,
                name=f"block{block + 1}_conv{conv + 1}",
            )(x)
            if model_cfg.batchnorm:
                x = keras.layers.BatchNormalization(name=f"block{block + 1}_bn{conv + 1}")(x)
            x = keras.layers.Activation("relu", name=f"block{block + 1}_relu{conv + 1}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block + 1}_pool")(x)
    pool = keras.layers.Flatten if head_cfg.pooling == "flatten" else keras.layers.GlobalAveragePooling2D
    x = pool(name="head_pool")(x)
    if not head_cfg.units and head_cfg.dropout:
        x = keras.layers.Dropout(head_cfg.dropout, name="head_dropout")(x)
    return keras.Model(inputs, _dense_stack(x, head_cfg, n_classes), name=f"{model_cfg.name}_classifier")


def clean_cuts(base) -> list[int]:
    """The counts of top layers after which one tensor alone flows into the rest of the base:
    every layer of the top reads only the boundary tensor or other top layers. Every count for a
    sequential base such as VGG16; for Xception and ResNet50 the ends of their blocks."""
    layers = base.layers[1:]
    position = {id(layer): i for i, layer in enumerate(layers)}
    cuts = []
    for n_top in range(len(layers) + 1):
        start = len(layers) - n_top  # the top is layers[start:], fed by layers[start - 1] (or the input)
        sources = {
            position.get(id(tensor._keras_history.operation), -1)
            for layer in layers[start:]
            for node in layer._inbound_nodes[:1]  # the base's own graph (a split adds nodes)
            for tensor in node.input_tensors
        }
        if all(i >= start or i == start - 1 for i in sources):
            cuts.append(n_top)
    return cuts


def split_at(base, n_top: int):
    """(bottom, top) of a conv base cut before its last `n_top` layers: `bottom` maps images to
    the boundary activations, `top` maps those to the base's output, reusing (sharing weights
    with) the base's own layers. None when the cut is not clean (`clean_cuts`): a side branch
    of a block (ResNet50, Xception) would cross it."""
    keras = _keras()
    if n_top not in clean_cuts(base):
        return None
    layers = base.layers[1:]
    boundary = layers[len(layers) - n_top - 1].output if n_top < len(layers) else base.input
    bottom = keras.Model(base.input, boundary, name="frozen_bottom")
    top = keras.Model(boundary, base.output, name="trainable_top")  # the base's own layers above it
    return bottom, top


def unfreeze_top(base, n_layers: int, batchnorm: str = "frozen") -> list[str]:
    """Make only the last `n_layers` layers of the base trainable, batch normalisation layers
    excepted unless `batchnorm` is "adapt"; return the names of those made trainable.

    Frozen batch normalisation runs in inference mode with its ImageNet statistics (Keras'
    transfer-learning guide): `base(x, training=False)` alone does not keep it there, since a
    functional model passes its own `training` on to every layer it calls. With "adapt" the
    unfrozen top's batch normalisation trains like any layer: batch statistics while fitting,
    moving statistics following the new images, for images far from ImageNet's."""
    keras = _keras()
    layers = base.layers[1:]  # skip the InputLayer: counting starts at the first conv layer
    base.trainable = True
    for layer in layers[: len(layers) - n_layers]:
        layer.trainable = False
    top = layers[len(layers) - n_layers :] if n_layers else []
    for layer in top:
        if isinstance(layer, keras.layers.BatchNormalization) and batchnorm != "adapt":
            layer.trainable = False  # inference mode: moving statistics used, never updated
    return [layer.name for layer in top if layer.trainable]


def predict_to_file(base, preprocess, images: np.ndarray, batch_size: int, out_path) -> tuple[int, ...]:
    """Write base(preprocess(images)) to `out_path` as a float32 .npy, one batch at a time.

    Batches are read from the file behind a memory-mapped array with plain reads and the
    output is appended to the file, so neither stays mapped into the process: its memory
    does not grow with the dataset. Where stdout is not a terminal, a progress line is logged
    every so often (`src.outputs.progress`)."""
    from pathlib import Path

    import tensorflow as tf

    from src.outputs import progress

    @tf.function(reduce_retracing=True)
    def forward(x):
        x = tf.cast(x, tf.float32)
        return tf.cast(base(preprocess(x), training=False), tf.float32)  # stored as float32

    shape = (len(images), *base.output_shape[1:])
    spec = tf.TensorSpec((None, *images.shape[1:]), tf.as_dtype(images.dtype))
    batches = tf.data.Dataset.from_generator(
        lambda: arrays.read_batches(images, batch_size), output_signature=spec
    )
    written = 0
    counter = progress.Progress(Path(out_path).name, len(images), "images")
    with open(out_path, "wb") as out:
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_1_0(out, header)
        for batch in batches.prefetch(2):
            features = forward(batch).numpy()
            out.write(np.ascontiguousarray(features, dtype=np.float32).tobytes())
            written += len(features)
            counter.update(len(features))
    if written != len(images):
        raise RuntimeError(f"{out_path}: wrote {written} rows for {len(images)} images")
    return shape
