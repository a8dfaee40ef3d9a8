"""Backbones, the classifier head, and which layers train in each phase."""

import importlib

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tl_keras import backbones
from tl_keras import matmul_conv
from tl_keras.errors import UserError, first_line

HEAD_INPUT = "gap"  # Everything after this layer is the head; its output is what phase 1 caches.


def get_preprocess_input(backbone: str):
    """The backbone's own keras.applications preprocess_input, which its weights expect."""
    module = backbones.BACKBONES[backbone].preprocess_module
    return importlib.import_module(f"keras.applications.{module}").preprocess_input


def get_preprocessing(backbone: str, image_size: int):
    """uint8 images of any size -> the float input the backbone expects, in graph-friendly ops.

    The same function runs in the training pipeline and inside the exported SavedModel, so serving
    cannot drift from training.
    """
    preprocess_input = get_preprocess_input(backbone)

    def preprocess(images):
        images = tf.image.resize(images, (image_size, image_size))
        return preprocess_input(images)

    return preprocess


def get_inverse_preprocessing(backbone: str):
    """Preprocessed images -> uint8 RGB, so logged inputs look like photos and not like tensors.

    Every keras.applications preprocess_input is affine per pixel (scale, mean, channel order), so
    four probe pixels determine it exactly, whatever the backbone.
    """
    probes = np.array([[[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.float32)
    out = np.asarray(get_preprocess_input(backbone)(probes.copy()), np.float64)[0]
    offset, linear = out[0], (out[1:] - out[0]).T / 255.0  # out = linear @ rgb + offset
    inverse = np.linalg.inv(linear)

    def unpreprocess(images):
        rgb = (np.asarray(images, np.float64) - offset) @ inverse.T
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8)

    return unpreprocess


def build_backbone(name: str, image_size: int, weights: str = "imagenet",
                   matmul_small_convs: bool = False) -> keras.Model:
    """Build a headless backbone named 'backbone', with weights 'imagenet', 'none' or a .h5 path.

    matmul_small_convs computes convolutions on maps of 4x4 or less as matmuls (see matmul_conv):
    the same outputs and weights; on CPU those layers train 1.5-3.3x faster at 32 px.
    """
    spec = backbones.BACKBONES[name]
    input_shape = (image_size, image_size, 3)
    if spec.application is None:
        backbone = _build_tiny_backbone(input_shape)
    else:
        application = getattr(keras.applications, spec.application)
        try:
            backbone = application(
                include_top=False,
                weights="imagenet" if weights == "imagenet" else None,
                input_shape=input_shape,
                name="backbone",
            )
        except Exception as e:  # keras.utils.get_file raises a plain Exception when offline.
            if "fetch failure" not in str(e).lower():
                raise
            raise UserError(
                f"Could not download ImageNet weights for {name} ({first_line(e)}). To run offline, pass "
                f"--weights=PATH to a local .h5 weights file, or --weights=none. Received: weights={weights}"
            ) from None
    if weights not in ("imagenet", "none"):
        try:
            backbone.load_weights(weights)
        except Exception as e:
            raise UserError(
                f"Could not load backbone weights into {name} ({first_line(e)}). Received: weights={weights}"
            ) from None
    if matmul_small_convs and (count := matmul_conv.convert(backbone)):
        logging.info("%d convolutions of %s run on maps of 4x4 or less: computed as matmuls.", count, name)
    return backbone


def _build_tiny_backbone(input_shape) -> keras.Model:
    """For tests only: three small conv blocks with VGG-style layer names, so fine_tune_at works."""
    inputs = keras.Input(input_shape)
    x = inputs
    for block, filters in enumerate((8, 16, 16), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv1")(x)
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="backbone")


def build_classifier(
    backbone_name: str,
    image_size: int,
    num_classes: int,
    weights: str = "imagenet",
    head_units=(256,),
    head_batchnorm: bool = True,
    dropout: float = 0.3,
    matmul_small_convs: bool = False,
) -> keras.Model:
    """Frozen backbone, GAP, then the head; the final Dense stays float32 under mixed precision."""
    backbone = build_backbone(backbone_name, image_size, weights, matmul_small_convs)
    backbone.trainable = False
    inputs = keras.Input((image_size, image_size, 3), name="image")
    # training=False keeps BatchNormalization in inference mode even after unfreezing.
    x = backbone(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D(name=HEAD_INPUT)(x)
    if head_batchnorm:
        x = keras.layers.BatchNormalization(name="head_batchnorm")(x)
    for i, units in enumerate(head_units, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"head_dense_{i}")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"{backbone_name}_classifier")


def head_layers(model: keras.Model) -> list:
    """The layers after pooling, in order: the part phase 1 trains."""
    names = [layer.name for layer in model.layers]
    return model.layers[names.index(HEAD_INPUT) + 1:]


def build_feature_extractor(model: keras.Model) -> keras.Model:
    """Images to pooled backbone features, sharing layers with `model`."""
    return keras.Model(model.inputs, model.get_layer(HEAD_INPUT).output, name="feature_extractor")


def freeze_backbone(model: keras.Model):
    """Phase 1: only the head trains. Recompile afterwards."""
    model.get_layer("backbone").trainable = False


def unfreeze_backbone(model: keras.Model, fine_tune_at: str):
    """Phase 2: unfreeze backbone layers from `fine_tune_at` upward. Recompile afterwards.

    Setting trainable on a model sets it on every sublayer, so the backbone flag goes first and the
    per-layer flags after it. BatchNormalization layers stay frozen: their statistics suit the weights.
    """
    backbone = model.get_layer("backbone")
    layers = [layer for layer in backbone.layers if layer.weights]
    names = [layer.name for layer in layers]
    if fine_tune_at == "all":
        start = 0
    elif fine_tune_at in names:
        start = names.index(fine_tune_at)
    else:
        shown = ", ".join(names[:3] + ["..."] + names[-3:]) if len(names) > 8 else ", ".join(names)
        raise UserError(
            f"--fine_tune_at must be 'all' or a weighted layer of the backbone ({shown}). "
            f"Received: fine_tune_at={fine_tune_at}"
        )
    backbone.trainable = True
    for i, layer in enumerate(layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    logging.info("Unfroze %d of %d weighted backbone layers from %s.",
                 sum(layer.trainable for layer in layers), len(layers), names[start])



def build_extractor(model: keras.Model, boundaries: list, prefix: keras.Model | None = None):
    """Images -> activations at each of `boundaries` (backbone layer names or HEAD_INPUT), one pass.

    `prefix` is split_at's model for the one backbone boundary, if any.
    """
    inputs = keras.Input(model.input.shape[1:], name="image")
    outputs = {}
    if prefix is not None:
        boundary = prefix.layers[-1].name
        outputs[boundary] = prefix(inputs)
        outputs[HEAD_INPUT] = build_model_from(model, boundary, stop_at=HEAD_INPUT)(outputs[boundary])
    else:
        outputs[HEAD_INPUT] = build_feature_extractor(model)(inputs)
    return keras.Model(inputs, [outputs[b] for b in boundaries], name="extractor")


def split_at(model: keras.Model, fine_tune_at: str):
    """(prefix, boundary) for caching the frozen part below `fine_tune_at`, or None.

    prefix maps preprocessed images to the input of `fine_tune_at`. Only a backbone that is a plain
    chain of layers (VGG) can be cut there; with skip connections (ResNet) a cut would lose them.
    """
    backbone = model.get_layer("backbone")
    layers = backbone.layers
    names = [layer.name for layer in layers]
    if fine_tune_at not in names or names.index(fine_tune_at) < 2:
        return None
    for previous, layer in zip(layers, layers[1:]):
        if layer.input is not previous.output:
            return None
    boundary = layers[names.index(fine_tune_at) - 1]
    prefix = keras.Model(backbone.input, boundary.output, name=f"prefix_to_{boundary.name}")
    return prefix, boundary.name


def build_model_from(model: keras.Model, boundary: str, stop_at: str | None = None) -> keras.Model:
    """A model from the output of backbone layer `boundary` (or HEAD_INPUT) onward, sharing weights.

    With stop_at=HEAD_INPUT it ends at the pooled features, which turns cached boundary activations
    into phase 1's features without rerunning the whole backbone.
    """
    backbone = model.get_layer("backbone")
    if boundary == HEAD_INPUT:
        layers, shape = head_layers(model), model.get_layer(HEAD_INPUT).output.shape[1:]
    else:
        names = [layer.name for layer in backbone.layers]
        layers = backbone.layers[names.index(boundary) + 1:] + [model.get_layer(HEAD_INPUT)]
        if stop_at != HEAD_INPUT:
            layers += head_layers(model)
        shape = backbone.get_layer(boundary).output.shape[1:]
    inputs = keras.Input(shape, name=f"{boundary}_activations")
    x = inputs
    for layer in layers:
        # Backbone layers run in inference mode, exactly as inside the classifier.
        x = layer(x, training=False) if layer in backbone.layers else layer(x)
    return keras.Model(inputs, x, name=f"from_{boundary}")
