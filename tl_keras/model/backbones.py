"""Headless keras.applications backbones, their weights, and their own preprocessing."""

import importlib

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tl_keras.errors import UserError, first_line
from tl_keras.model import matmul_conv
from tl_keras.model import registry


def get_preprocess_input(backbone: str):
    """The backbone's own keras.applications preprocess_input, which its weights expect."""
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
    spec = registry.BACKBONES[name]
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
