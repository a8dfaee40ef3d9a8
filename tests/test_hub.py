"""KerasHub backbones, --backbone=hub:PRESET: the errors without the extra, offline and for a wrong name;
ViT and DINOv2 laid out as transformer blocks (pooling, stages, preprocessing, the feature cache's cut);
both stages and the export on a tiny ViT.

No test downloads a preset: the tiny_presets fixture replaces hub.load_backbone and
hub.load_image_converter with small random configurations (hub:tiny_vit, hub:tiny_dinov2), the offline
test makes kagglehub fail as it fails without a network, and the local-preset test writes its preset.
Tests that need keras_hub skip without it."""

import os
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import make_examples, one_step_on_images_and_on_stored, run_python
from tl_keras.errors import UserError
from tl_keras.model import backbones
from tl_keras.model import blocks
from tl_keras.model import classifier
from tl_keras.model import hub
from tl_keras.model import pooling
from tl_keras.serving import deploy
from tl_keras.serving import formats
from tl_keras.serving import parity
from tl_keras.training import datasets
from tl_keras.training import optimizers
from tl_keras.training import run as train

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def keras_hub():
    return pytest.importorskip("keras_hub", reason='KerasHub is an optional extra: pip install -e ".[hub]"')


def _tiny_vit(keras_hub, image_size):
    return keras_hub.models.ViTBackbone(image_shape=(image_size, image_size, 3), patch_size=8, num_layers=2,
                                        num_heads=2, hidden_dim=16, mlp_dim=32)


def _tiny_dinov2(keras_hub, image_size):
    # Position embeddings for 16x16 images, interpolated to image_size as for a real preset.
    return keras_hub.models.DINOV2Backbone(patch_size=8, num_layers=2, hidden_dim=16, num_heads=2,
                                           intermediate_dim=32, image_shape=(image_size, image_size, 3),
                                           position_embedding_shape=(16, 16, 3))


def _vit_converter(keras_hub):
    return keras_hub.layers.ViTImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0)


def _dinov2_converter(keras_hub):
    return keras_hub.layers.DINOV2ImageConverter(scale=[1 / (255 * s) for s in IMAGENET_STD],
                                                 offset=[-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])


TINY = {"tiny_vit": (_tiny_vit, _vit_converter), "tiny_dinov2": (_tiny_dinov2, _dinov2_converter)}


@pytest.fixture
def tiny_presets(keras_hub, monkeypatch):
    """hub:tiny_vit and hub:tiny_dinov2 build small random configurations instead of fetching a preset.
    Returns the (preset, load_weights, keras_hub backbone) of each backbone built."""
    built = []

    def load_backbone(preset, image_size, load_weights):
        backbone = TINY[preset][0](keras_hub, image_size)
        built.append((preset, load_weights, backbone))
        return backbone

    monkeypatch.setattr(hub, "load_backbone", load_backbone)
    monkeypatch.setattr(hub, "load_image_converter", lambda preset: TINY[preset][1](keras_hub))
    return built


def _classifier(name, **kwargs):
    return classifier.build_classifier(name, 32, 3, "none", head_units=(8,), **kwargs)


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# Without the extra, offline, a wrong name.

def test_without_keras_hub_hub_is_a_one_line_error_that_says_what_to_install(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # What find_spec and import see when not installed.
    with pytest.raises(UserError) as error:
        make_config(backbone="hub:dinov2_small")
    message = _one_line(error)
    assert 'pip install -e ".[hub]"' in message and message.endswith("Received: backbone=hub:dinov2_small")
    make_config(backbone="hub:dinov2_small", mode="predict", images="*.jpg")  # Reads the export alone.
    with pytest.raises(UserError, match=r'pip install -e "\.\[hub\]".*Received: backbone=hub:x$'):
        hub.load_image_converter("x")  # What a build that skipped the config check would meet.
    with pytest.raises(UserError, match="needs a KerasHub preset, such as hub:dinov2_small"):
        make_config(backbone="hub:")


def test_without_keras_hub_the_cli_exits_with_one_line():
    code = ("import sys\nsys.modules['keras_hub'] = None\n"
            "sys.argv = ['tl-keras', '--model_dir=/tmp/unused', '--backbone=hub:dinov2_small']\n"
            "from tl_keras import main\nmain.run()\n")
    result = run_python(code)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'tl_keras: error: --backbone=hub:PRESET needs KerasHub, an optional extra: pip install -e ".[hub]" '
        '(or pip install "keras-hub>=0.32"). Received: backbone=hub:dinov2_small']


def test_backbone_list_mentions_hub_and_imports_no_keras_hub():
    code = ("import sys\nfrom tl_keras import flags\ntry:\n    flags.parse(['tl-keras', '--backbone=list'])\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'keras_hub' not in sys.modules\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    hub_lines = [line for line in result.stdout.splitlines() if "hub:PRESET" in line]
    assert len(hub_lines) == 1 and "hub:dinov2_small" in hub_lines[0], hub_lines


def test_an_offline_preset_is_a_one_line_error(keras_hub, monkeypatch):
    """keras_hub fetches built-in presets with kagglehub; offline, kagglehub raises requests'
    ConnectionError (as on this machine). The download fails here without touching the network."""
    import kagglehub
    import requests

    def offline(handle, path=None, *args, **kwargs):
        raise requests.exceptions.ConnectionError(
            "HTTPSConnectionPool(host='api.kaggle.com', port=443): Max retries exceeded (Caused by "
            "NameResolutionError: Failed to resolve 'api.kaggle.com')")

    monkeypatch.setattr(kagglehub, "model_download", offline)
    for build in (lambda: backbones.build_backbone("hub:dinov2_small", 224, "imagenet"),
                  lambda: backbones.get_preprocessing("hub:dinov2_small", 224)):
        with pytest.raises(UserError) as error:
            build()
        message = _one_line(error)
        assert message.startswith("Could not download KerasHub preset dinov2_small (HTTPSConnectionPool")
        assert "--backbone=hub:DIR" in message and message.endswith("Received: backbone=hub:dinov2_small")


@pytest.mark.parametrize("preset, words", [
    ("dinov2_smal", "did you mean dinov2_small"),
    ("bert_base_en", "needs a KerasHub image preset"),  # A text model: no image converter.
    ("/no/such/preset_dir", "a preset directory"),
])
def test_a_wrong_preset_is_a_one_line_error_before_any_download(keras_hub, preset, words):
    with pytest.raises(UserError) as error:
        backbones.build_backbone(f"hub:{preset}", 224, "imagenet")
    message = _one_line(error)
    assert words in message and message.endswith(f"Received: backbone=hub:{preset}")


# ViT and DINOv2 as transformer blocks.

STAGES = {
    "tiny_vit": (["embeddings", "transformer_block_1", "transformer_block_2"],
                 ["images", "vit_patching_and_embedding", "dropout", "transformer_block_1",
                  "transformer_block_2", "ln"]),
    "tiny_dinov2": (["embeddings", "layers_0", "layers_1"],
                    ["images", "embeddings", "layers_0", "layers_1", "layernorm"]),
}


@pytest.mark.parametrize("preset", sorted(TINY))
def test_transformer_blocks_compute_what_keras_hub_computes(tiny_presets, preset):
    """The flat backbone: keras_hub's layers in its call order, each transformer layer a block of its own;
    the final norm joins the last, so top:2 unfreezes the last two and the norm."""
    model = _classifier(f"hub:{preset}")
    backbone = model.get_layer("backbone")
    stages, layers = STAGES[preset]
    assert [layer.name for layer in backbone.layers] == layers
    (_, load_weights, hub_backbone), = tiny_presets
    assert load_weights is False  # --weights=none: the preset's architecture alone.
    assert not [w.path for w in backbone.weights if "mask_token" in w.path]  # Images never use it.
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    tokens = hub_backbone({"images": x} if isinstance(hub_backbone.input, dict) else x)
    np.testing.assert_allclose(backbone(x), tokens, atol=1e-5)
    # Pooled by the class token, token 0.
    assert isinstance(model.get_layer(classifier.HEAD_INPUT), pooling.TokenPooling)
    np.testing.assert_allclose(classifier.build_feature_extractor(model)([x]), tokens[:, 0], atol=1e-5)
    assert [block.name for block in blocks.backbone_blocks(model)] == stages
    classifier.unfreeze_backbone(model, "top:2")
    assert [layer.name for layer in backbone.layers if layer.trainable_weights] == layers[-3:]
    assert list(optimizers.block_learning_rates(model, 1.0, 0.5)) == ["head"] + stages[::-1]


@pytest.mark.parametrize("preset", sorted(TINY))
def test_a_bad_unfreeze_point_lists_the_transformer_blocks(tiny_presets, preset):
    stages = STAGES[preset][0]
    with pytest.raises(UserError) as error:
        classifier.unfreeze_start(_classifier(f"hub:{preset}"), "block4_conv1")  # --fine_tune_at's default.
    message = _one_line(error)
    assert f"top:1={stages[2]}, top:2={stages[1]}, top:3={stages[0]}" in message
    assert message.endswith("Received: fine_tune_at=block4_conv1")


def test_backbone_bn_is_accepted_and_changes_nothing_in_a_vit(tiny_presets, make_config):
    """LayerNormalization only, and no dropout in the preset: training mode is inference mode."""
    make_config(backbone="hub:tiny_vit", backbone_bn="train", fine_tune_at="top:1")
    model = _classifier("hub:tiny_vit", backbone_bn="train")
    classifier.unfreeze_backbone(model, "top:1")
    features = classifier.build_feature_extractor(model)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(features([x], training=True), features([x], training=False), atol=1e-6)


@pytest.mark.parametrize("preset", sorted(TINY))
def test_the_pipeline_and_the_export_apply_the_presets_converter(tiny_presets, keras_hub, preset):
    """Resize (the pipeline's), then the converter's scale and offset; the deploy model answers uint8
    images like the classifier on them, through a float32 copy (which clones every hub layer)."""
    converter = TINY[preset][1](keras_hub)
    images = make_examples(2, seed=5, size=40)[0]
    resized = tf.image.resize(images, (32, 32)).numpy()
    got = backbones.get_preprocessing(f"hub:{preset}", 32)(images)
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(converter(resized)), atol=1e-5)
    undone = backbones.get_inverse_preprocessing(f"hub:{preset}")(got)  # Rounded to uint8.
    assert np.max(np.abs(undone - resized)) <= 0.501
    model = _classifier(f"hub:{preset}")
    exported = deploy.build_deploy_model(deploy.float32_copy(model), backbones.get_preprocessing(
        f"hub:{preset}", 32), 32)
    np.testing.assert_allclose(exported(images)["probabilities"], model(got), atol=1e-5)


def test_a_bf16_vit_exports_a_float32_copy_with_its_weights(tiny_presets):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = _classifier("hub:tiny_vit")
        copy = deploy.float32_copy(model)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert {layer.compute_dtype for layer in model.get_layer("backbone").layers} == {"bfloat16"}
    assert {layer.compute_dtype for layer in copy.get_layer("backbone").layers} == {"float32"}
    assert [w.path for w in copy.weights] == [w.path for w in model.weights]
    for a, b in zip(copy.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_the_feature_cache_cuts_a_vit_between_transformer_blocks(tiny_presets):
    """One fine-tuning step on stored activations after transformer_block_1 is the step on images."""
    keras.utils.set_random_seed(1)
    model = _classifier("hub:tiny_vit", dropout=0.0)
    classifier.unfreeze_backbone(model, "top:1")
    split = classifier.find_split(model, "top:1")
    assert split.boundary == split.stored_name == "transformer_block_1"
    images, labels = make_examples(4, seed=2)
    x, y = backbones.get_preprocessing("hub:tiny_vit", 32)(images), keras.utils.to_categorical(labels, 3)
    start, on_images, on_stored = one_step_on_images_and_on_stored(
        model, split.boundary, x, split.prefix(x), y, 1e-2)
    assert any(not np.array_equal(a, b) for a, b in zip(start, on_images))
    for a, b in zip(on_images, on_stored):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_keras_hub_resnet_keeps_average_pooling_and_its_stacks(keras_hub, monkeypatch):
    def load_backbone(preset, image_size, load_weights):
        return keras_hub.models.ResNetBackbone(
            input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 8],
            stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
            image_shape=(image_size, image_size, 3))

    monkeypatch.setattr(hub, "load_backbone", load_backbone)
    model = _classifier("hub:resnet_18_imagenet")
    assert isinstance(model.get_layer(classifier.HEAD_INPUT), keras.layers.GlobalAveragePooling2D)
    assert [block.name for block in blocks.backbone_blocks(model)] == ["stem", "stack0", "stack1"]
    assert classifier.find_split(model, "top:1").boundary == "stack0_block0_out"


def test_a_local_preset_directory_loads_with_keras_hubs_own_loader(keras_hub, tmp_path):
    """--backbone=hub:DIR, a preset saved (or downloaded) before: how to run offline."""
    directory = str(tmp_path / "my_vit")
    saved = _tiny_vit(keras_hub, 32)
    saved.save_to_preset(directory)
    _vit_converter(keras_hub).save_to_preset(directory)
    backbone = backbones.build_backbone(f"hub:{directory}", 32, "imagenet")
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(backbone(x), saved(x), atol=1e-5)
    images = make_examples(2, seed=1)[0]
    np.testing.assert_allclose(backbones.get_preprocessing(f"hub:{directory}", 32)(images),
                               images / 127.5 - 1.0, atol=1e-5)
    model = _classifier(f"hub:{directory}")
    assert "/" not in model.name
    # A ViT's position embeddings fit its own size only.
    with pytest.raises(UserError) as error:
        backbones.build_backbone(f"hub:{directory}", 48, "imagenet")
    message = _one_line(error)
    assert message.startswith(f"Could not build the backbone of KerasHub preset {directory} for 48x48 images")
    assert message.endswith(f"its image converter resizes to 32x32: try --image_size=32. "
                            f"Received: backbone=hub:{directory}")


def test_a_changed_local_preset_gets_a_new_feature_cache(keras_hub, make_config, tmp_path):
    """hub:DIR is named by its path: stored activations of the old weights must not serve new ones."""
    directory = str(tmp_path / "my_vit")
    _tiny_vit(keras_hub, 32).save_to_preset(directory)
    data = types.SimpleNamespace(splits=types.SimpleNamespace(num_train=8, num_test=4, fingerprint=None))
    config = make_config(backbone=f"hub:{directory}", weights="imagenet")

    def cache_dir():
        return datasets.open_feature_cache(config, data).directory

    first = cache_dir()
    assert cache_dir() == first
    _tiny_vit(keras_hub, 32).save_to_preset(directory)  # Other random weights, same path.
    assert cache_dir() != first


# Both stages and the export.

@pytest.mark.slow
def test_both_stages_on_cached_activations_then_the_export_of_a_tiny_vit(
        tiny_presets, make_config, tiny_splits):
    """The head stage on cached class tokens, fine-tuning on cached activations after transformer_block_1;
    the SavedModel takes uint8 images of any size and answers as the trained model does."""
    config = make_config(backbone="hub:tiny_vit", fine_tune_at="top:1", cache_features="true",
                         calibrate="false", finetune_learning_rate=1e-2, finetune_warmup_epochs=0)
    metrics = train.run(config, splits=tiny_splits)
    for name in ("head", "finetune"):
        assert 0.0 <= metrics["stages"][name]["test_accuracy"] <= 1.0
    cache_dir = os.path.join(config.model_dir, "feature_cache")
    cached = [name for _, _, names in os.walk(cache_dir) for name in names]
    assert "gap.train.npy" in cached and "transformer_block_1.train.npy" in cached, cached
    images = make_examples(3, seed=9, size=45)[0]
    served = tf.saved_model.load(metrics["export_path"]).signatures["serving_default"](
        images=tf.constant(images))
    model = train.restore_classifier(config, tf.distribute.get_strategy(), 3)
    expected = model(backbones.get_preprocessing("hub:tiny_vit", 32)(images))
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny_vit", "tiny_dinov2"])
def test_a_keras_hub_backbone_exports_to_every_format_that_agrees(tiny_presets, make_config, tiny_splits, preset):
    """Attention, GELU, LayerNormalization and the class token through every converter: each artifact,
    loaded by its own runtime, answers as the Keras model does."""
    names = tuple(n for n in (formats.TFLITE, formats.ONNX, formats.OPENVINO) if not formats.missing_packages([n]))
    if not names:
        pytest.skip(f"no format beyond the SavedModel is installed ({formats.INSTALL_HINT})")
    config = make_config(backbone=f"hub:{preset}", fine_tune_at="top:1", export_formats=names, calibrate="false")
    parity_rows = train.run(config, splits=tiny_splits)["parity"]
    assert set(parity_rows) == {parity.KERAS, formats.SAVED_MODEL, *names}
    for name, row in parity_rows.items():
        assert row["agreement"] == 1.0, (name, row)
        assert row["max_probability_difference"] < 1e-4, (name, row)
