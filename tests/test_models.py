"""Model structure, the unfreeze rule, and cutting the backbone for cached activations."""

import keras
import numpy as np
import pytest

from tl_keras.errors import UserError
from tl_keras.model import backbones
from tl_keras.model import classifier


def _classifier(backbone="tiny", size=32):
    return classifier.build_classifier(backbone, size, 3, "none", head_units=(8,))


def test_named_layers_and_float32_predictions():
    model = _classifier()
    for name in ("backbone", "gap", "head_batchnorm", "head_dense_1", "head_dropout", "predictions"):
        model.get_layer(name)
    assert model.get_layer("predictions").dtype_policy.name == "float32"
    assert not model.get_layer("backbone").trainable


def test_vgg16_builds_headless_and_cuts_at_block4():
    model = _classifier("vgg16")
    backbone = model.get_layer("backbone")
    assert backbone.output.shape[1:] == (1, 1, 512)
    prefix, boundary = classifier.split_at(model, "block4_conv1")
    assert boundary == "block3_pool"
    upper = classifier.build_model_from(model, boundary)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32") * 50
    np.testing.assert_allclose(upper(prefix(x)), model(x), atol=1e-5)


def test_resnet_is_cut_between_residual_blocks_only():
    """A cut inside a residual block would lose its skip connection: the highest one below the unfreeze
    point is the output of the block before it."""
    model = classifier.build_classifier("resnet50", 32, 3, "none", head_units=(8,))
    for fine_tune_at, boundary in [("conv5_block1_1_conv", "conv4_block6_out"), ("top:1", "conv4_block6_out"),
                                   ("conv5_block2_2_conv", "conv5_block1_out")]:
        prefix, found = classifier.split_at(model, fine_tune_at)
        assert found == boundary, fine_tune_at
    upper = classifier.build_model_from(model, boundary)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32") * 50
    np.testing.assert_allclose(upper(prefix(x)), model(x), atol=1e-5)
    split = classifier.find_split(model, "all")
    assert split.prefix is None and "none to cache" in split.reason


def test_unfreeze_from_layer():
    model = _classifier()
    classifier.unfreeze_backbone(model, "block2_conv1")
    trainable = {layer.name: layer.trainable for layer in model.get_layer("backbone").layers if layer.weights}
    assert trainable == {"block1_conv1": False, "block2_conv1": True, "block3_conv1": True}
    classifier.freeze_backbone(model)
    assert not any(w for w in model.get_layer("backbone").trainable_weights)


def test_unfreeze_all_keeps_batchnorm_frozen():
    model = classifier.build_classifier("resnet50", 32, 3, "none")
    classifier.unfreeze_backbone(model, "all")
    layers = [layer for layer in model.get_layer("backbone").layers if layer.weights]
    assert all(layer.trainable != isinstance(layer, keras.layers.BatchNormalization) for layer in layers)


def test_unknown_fine_tune_at_is_a_user_error():
    with pytest.raises(UserError, match="Received: fine_tune_at=block9_conv1"):
        classifier.unfreeze_backbone(_classifier(), "block9_conv1")


def test_head_model_shares_weights():
    model = _classifier()
    head = classifier.build_model_from(model, classifier.HEAD_INPUT)
    assert {id(w) for w in head.weights} <= {id(w) for w in model.weights}
    features = classifier.build_feature_extractor(model)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(head(features(x)), model(x), atol=1e-6)


def test_bad_weights_file_is_a_user_error(tmp_path):
    path = tmp_path / "broken.weights.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="Could not load backbone weights"):
        backbones.build_backbone("tiny", 32, str(path))


def test_failed_imagenet_download_says_how_to_run_offline(monkeypatch):
    from keras.src.applications import vgg16

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/vgg16.h5: None -- unreachable")

    monkeypatch.setattr(vgg16.file_utils, "get_file", offline)
    with pytest.raises(UserError) as error:
        backbones.build_backbone("vgg16", 32, "imagenet")
    assert "--weights=" in str(error.value) and "\n" not in str(error.value)
