"""Small-map convolutions as matmuls: identical outputs, gradients and checkpoints, only faster."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tl_keras.model import backbones
from tl_keras.model import classifier
from tl_keras.model import matmul_conv
from tl_keras.serving import export
from tl_keras.training import distribute

from helpers import cpu_only_host


def _pair(size, channels=5, filters=7, kernel_size=3):
    conv = keras.layers.Conv2D(filters, kernel_size, padding="same", activation="relu", name="conv")
    conv.build((None, size, size, channels))
    rng = np.random.default_rng(size)
    conv.set_weights([rng.normal(size=w.shape).astype("float32") for w in conv.weights])
    fast = keras.layers.Conv2D.from_config(conv.get_config())
    inputs = keras.Input((size, size, channels))
    model = keras.Model(inputs, fast(inputs))
    fast.set_weights(conv.get_weights())
    assert matmul_conv.convert(model) == 1 and matmul_conv.is_converted(fast)
    return conv, fast


@pytest.mark.parametrize("size,kernel_size", [(1, 3), (2, 3), (4, 3), (4, 1), (3, 5)])
def test_same_outputs_and_gradients_as_conv2d(size, kernel_size):
    conv, fast = _pair(size, kernel_size=kernel_size)
    x = tf.constant(np.random.default_rng(1).normal(size=(3, size, size, 5)).astype("float32"))
    results = []
    for layer in (conv, fast):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.range(1.0, 1.0 + y.shape[-1]))
        results.append([y] + tape.gradient(loss, [x, layer.kernel, layer.bias]))
    for expected, actual in zip(*results):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    assert float(tf.reduce_max(tf.abs(results[0][2]))) > 0  # The kernel gradient is not trivially zero.


def test_only_small_stride1_same_convs_are_eligible():
    def eligible(size, **kwargs):
        inputs = keras.Input((size, size, 4))
        settings = dict(padding="same")
        settings.update(kwargs)
        layer = keras.layers.Conv2D(8, 3, **settings)
        layer(inputs)
        return matmul_conv.eligible(layer)

    assert eligible(4) and eligible(2)
    assert not eligible(8)  # 64 positions: TF's own kernel is faster there.
    assert not eligible(4, strides=2)
    assert not eligible(4, padding="valid")
    assert not eligible(4, dilation_rate=2)


def test_vgg16_at_32px_converts_blocks_4_and_5_and_keeps_predictions():
    plain = classifier.build_classifier("vgg16", 32, 3, "none", head_units=(8,))
    fast = classifier.build_classifier("vgg16", 32, 3, "none", head_units=(8,), matmul_small_convs=True)
    fast.set_weights(plain.get_weights())
    backbone = fast.get_layer("backbone")
    converted = {layer.name for layer in backbone.layers if matmul_conv.is_converted(layer)}
    assert converted == {f"block{b}_conv{c}" for b in (4, 5) for c in (1, 2, 3)}
    assert backbone.name == "backbone" and not backbone.trainable
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32") * 50
    np.testing.assert_allclose(fast(x), plain(x), atol=1e-5)
    # Larger inputs leave every convolution to TF (block 5 runs on 14x14 at 224 px).
    big = backbones.build_backbone("vgg16", 224, "none", matmul_small_convs=True)
    assert not any(matmul_conv.is_converted(layer) for layer in big.layers)


def test_checkpoints_and_exports_interchange(tmp_path):
    """Weights written by the matmul model load into a plain one, and its SavedModel serves the same."""
    fast = classifier.build_classifier("vgg16", 32, 3, "none", head_units=(8,), matmul_small_convs=True)
    path = str(tmp_path / "model.weights.h5")
    fast.save_weights(path)
    plain = classifier.build_classifier("vgg16", 32, 3, "none", head_units=(8,))
    plain.load_weights(path)
    for a, b in zip(plain.weights, fast.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    target = export.export_saved_model(fast, str(tmp_path / "export"),
                                       backbones.get_preprocessing("vgg16", 32),
                                       ["a", "b", "c"])
    images = np.random.default_rng(2).integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    served = tf.saved_model.load(target).signatures["serving_default"](images=tf.constant(images))
    expected = plain.predict(backbones.get_preprocessing("vgg16", 32)(images), verbose=0)
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)


@cpu_only_host
def test_training_on_cpu_uses_matmuls(mirrored_strategy):
    assert distribute.computes_on_cpu(mirrored_strategy)
    assert distribute.computes_on_cpu(tf.distribute.get_strategy())
