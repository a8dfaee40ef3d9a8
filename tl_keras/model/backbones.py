"""Headless backbones (keras.applications, or KerasHub presets through model/hub.py), their weights, and
their own preprocessing."""

import importlib

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tl_keras.errors import UserError, first_line
from tl_keras.model import hub
from tl_keras.model import matmul_conv
from tl_keras.model import pooling
from tl_keras.model import registry


def get_preprocess_input(backbone: str):
    """The backbone's own keras.applications preprocess_input, which its weights expect; for hub:PRESET,
    the preset's image converter (hub.get_preprocess_input)."""
    if registry.is_hub(backbone):
        return hub.get_preprocess_input(registry.hub_preset(backbone))
    module = registry.BACKBONES[backbone].preprocess_module
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

    Every keras.applications preprocess_input, and every KerasHub image converter's scale and offset, is
    affine per pixel (scale, mean, channel order), so four probe pixels determine it exactly, whatever
    the backbone.
    """
    probes = np.array([[[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.float32)
    out = np.asarray(get_preprocess_input(backbone)(probes.copy()), np.float64)[0]
    offset, linear = out[0], (out[1:] - out[0]).T / 255.0  # out = linear @ rgb + offset
    inverse = np.linalg.inv(linear)

    def unpreprocess(images):
        rgb = (np.asarray(images, np.float64) - offset) @ inverse.T
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8)

    return unpreprocess


def pin_mode(model: keras.Model, batchnorm: str = registry.BN_FROZEN) -> keras.Model:
    """Make `model` (a backbone, or the part of one above a cut) decide its own mode, whatever fit() says.

    Why: in Keras 3.15 a functional model passes the outer call's training flag down to every nested
    call (functional.operation_fn), overriding a `backbone(x, training=False)` given when the classifier
    was built. So `training=False` alone would leave the backbone's dropout (EfficientNet's stochastic
    depth) active in fit(), and any trainable BatchNormalization on batch statistics.

    batchnorm=frozen (the default): always inference mode. batchnorm=train: while the backbone is
    trainable (a fine-tuning stage), it follows fit(): its unfrozen BatchNormalization layers use and
    update batch statistics, frozen ones keep their moving statistics (Keras runs a non-trainable
    BatchNormalization in inference mode), and its dropout is active. A frozen backbone (the head
    stage) runs in inference mode either way.

    Only the instance's call changes (as matmul_conv changes a layer's convolution_op): the class and
    the weight paths stay Functional's, so checkpoints and exports do not know the difference.
    """
    if batchnorm not in registry.BACKBONE_BN:
        raise ValueError(f"batchnorm must be one of {', '.join(registry.BACKBONE_BN)}. "
                         f"Received: batchnorm={batchnorm}")
    unpinned = type(model).call.__get__(model)

    def call(inputs, training=None, mask=None):
        follows_fit = model.batchnorm == registry.BN_TRAIN and model.trainable
        return unpinned(inputs, training=training if follows_fit else False, mask=mask)

    model.batchnorm = batchnorm
    model.call = call
    return model


def batchnorm_mode(model: keras.Model) -> str:
    """The --backbone_bn mode that pin_mode gave a backbone (frozen for one it never saw)."""
    return getattr(model, "batchnorm", registry.BN_FROZEN)


def build_backbone(name: str, image_size: int, weights: str = "imagenet",
                   matmul_small_convs: bool = False, batchnorm: str = registry.BN_FROZEN) -> keras.Model:
    """Build a headless backbone named 'backbone', with weights 'imagenet', 'none' or a .h5 path, in
    the --backbone_bn mode `batchnorm` (pin_mode). For hub:PRESET, 'imagenet' means the preset's own
    weights, whatever they were trained on.

    Its `pooling` attribute (model/pooling.py) says how the classifier pools its output: the average of
    a feature map, or a transformer's class token.

    matmul_small_convs computes convolutions on maps of 4x4 or less as matmuls (see matmul_conv):
    the same outputs and weights; on CPU those layers train 1.5-3.3x faster at 32 px.
    """
    input_shape = (image_size, image_size, 3)
    pooled_by = pooling.AVERAGE
    if registry.is_hub(name):
        preset = registry.hub_preset(name)
        inputs, outputs, pooled_by = hub.build_backbone(preset, image_size, weights == "imagenet")
    elif (spec := registry.BACKBONES[name]).application is None:
        inputs, outputs = _tiny_graph(input_shape)
    else:
        application = getattr(keras.applications, spec.application)
        try:
            # Under its own name: EfficientNetV2 looks its configuration up by it, and ConvNeXt prefixes
            # its layer names with it. Only its graph is kept, as the backbone's.
            built = application(
                include_top=False,
                weights="imagenet" if weights == "imagenet" else None,
                input_shape=input_shape,
            )
        except Exception as e:  # keras.utils.get_file raises a plain Exception when offline.
            if "fetch failure" not in str(e).lower():
                raise
            raise UserError(
                f"Could not download ImageNet weights for {name} ({first_line(e)}). To run offline, pass "
                f"--weights=PATH to a local .h5 weights file, or --weights=none. Received: weights={weights}"
            ) from None
        inputs, outputs = built.input, built.output
    backbone = pin_mode(keras.Model(inputs, outputs, name="backbone"), batchnorm)
    backbone.pooling = pooled_by
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


def _tiny_graph(input_shape):
    """For tests only: three small conv blocks with VGG-style layer names, so fine_tune_at works."""
    inputs = keras.Input(input_shape)
    x = inputs
    for block, filters in enumerate((8, 16, 16), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv1")(x)
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    return inputs, x
