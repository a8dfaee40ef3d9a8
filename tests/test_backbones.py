"""Every keras.applications backbone: the registry against Keras itself, --backbone=list, the stages that
unfreeze points and layer-wise rates count, BatchNormalization while fine-tuning, each family's own
preprocessing, and the feature cache's cut for backbones that are not a plain chain.

Random weights throughout (weights="none"); the models that take more than a few seconds to build are
under the slow mark."""

import importlib
import inspect

from absl.testing import flagsaver
import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import make_examples, make_splits, one_step_on_images_and_on_stored, run_python
from tl_keras import flags as tl_flags
from tl_keras.errors import UserError
from tl_keras.model import backbones
from tl_keras.model import blocks
from tl_keras.model import classifier
from tl_keras.model import registry
from tl_keras.serving import deploy
from tl_keras.training import datasets
from tl_keras.training import optimizers

# One backbone per family, the smallest; the fast tier builds the quick ones.
SMALLEST = {}
for _name, _spec in sorted(registry.BACKBONES.items(), key=lambda item: item[1].parameters):
    SMALLEST.setdefault(_spec.family, _name)
FAST = ("tiny", "vgg16", "mobilenet", "mobilenet_v3_small", "convnext_tiny", "efficientnet_v2_b0")


def keras_image_models() -> dict:
    """keras.applications' image models: name -> the module that defines it."""
    return {name: fn.__module__ for name, fn in vars(keras.applications).items()
            if inspect.isfunction(fn) and name[:1].isupper() and ".applications." in fn.__module__}


def _build(name: str, size: int | None = None) -> keras.Model:
    return backbones.build_backbone(name, size or registry.BACKBONES[name].min_image_size, "none")


def test_the_registry_has_every_keras_application():
    """A model that a new Keras adds is not silently missing: the failure names it."""
    models = keras_image_models()
    registered = {spec.application: name for name, spec in registry.BACKBONES.items() if spec.application}
    missing = sorted(set(models) - set(registered))
    assert not missing, (f"keras.applications has {len(missing)} image models that "
                         f"tl_keras/model/registry.py lacks: {', '.join(missing)}. Add each with its "
                         "family, preprocess module, sizes and parameter count (this file checks them).")
    assert set(registered) <= set(models), sorted(set(registered) - set(models))
    assert len(registry.BACKBONES) == len(models) + 1  # And tiny.
    for application, name in registered.items():
        spec = registry.BACKBONES[name]
        # The family's own preprocess_input: the very function of the module that defines the model.
        own = importlib.import_module(models[application]).preprocess_input
        assert backbones.get_preprocess_input(name) is own, name
        assert spec.family in registry.FAMILIES and spec.min_image_size <= spec.default_image_size, name
        assert name == name.lower() and " " not in name, name


def test_raw_pixel_families_have_the_identity_as_preprocess_input():
    """EfficientNet, EfficientNetV2, ConvNeXt and MobileNetV3 rescale inside the model."""
    raw = {spec.family for spec in registry.BACKBONES.values() if spec.raw_pixels}
    assert raw == {"efficientnet", "efficientnet_v2", "convnext", "mobilenet_v3"}
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    for name, spec in registry.BACKBONES.items():
        out = np.asarray(backbones.get_preprocess_input(name)(images.copy()))
        assert np.array_equal(out, images) == spec.raw_pixels, name


def test_backbone_list_prints_the_registry_and_builds_nothing():
    """--backbone=list needs no --model_dir, and imports neither Keras nor TensorFlow."""
    code = ("import sys\nfrom tl_keras import flags\ntry:\n    flags.parse(['tl-keras', '--backbone=list'])\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow'))\n"
            "assert not heavy, heavy[:5]\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for name, spec in registry.BACKBONES.items():
        row = next(line for line in lines if line.split()[:1] == [name])
        assert f" {spec.default_image_size} " in row and f" {spec.min_image_size} " in row, row
    assert "convnext_xlarge       convnext                    348.1M      224    32  raw" in lines


def test_list_through_the_parser(capsys):
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        tl_flags.parse(["prog", "--backbone=list"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == registry.describe()


def test_bad_backbone_and_backbone_bn_are_one_line_errors(make_config):
    with pytest.raises(UserError, match=r"did you mean resnet50.*Received: backbone=resnet5$"):
        make_config(backbone="resnet5")
    with pytest.raises(UserError, match="Received: backbone_bn=sometimes$"):
        make_config(backbone_bn="sometimes")
    assert make_config(backbone="convnext_tiny").backbone_bn == registry.BN_FROZEN


@pytest.mark.parametrize("name", FAST)
def test_parameter_counts_of_small_backbones(name):
    assert _build(name).count_params() == registry.BACKBONES[name].parameters


# The stages of the families that the fast tier does not build.
STAGES = {
    "resnet50_v2": ["conv1", "conv2", "conv3", "conv4", "conv5"],
    "densenet121": ["conv1", "conv2", "conv3", "conv4", "conv5"],
    "xception": [f"block{i}" for i in range(1, 15)],
    "inception_v3": ["stem"] + [f"mixed{i}" for i in range(11)],
    "inception_resnet_v2": ["stem", "mixed_5b", "block35", "mixed_6a", "block17", "mixed_7a", "block8",
                            "conv_7b"],
    "nasnet_mobile": ["stem", "stem_1", "stem_2", "normal_0", "reduce_4", "normal_5", "reduce_8", "normal_9"],
}


OTHERS = sorted(set(registry.BACKBONES) - set(FAST))


@pytest.mark.slow
# The slow tier builds the smallest model of each family; the larger variants share their family's rules
# and only add minutes: -m every_backbone builds them too.
@pytest.mark.parametrize("name", [
    name if name in SMALLEST.values() else pytest.param(name, marks=pytest.mark.every_backbone)
    for name in OTHERS])
def test_every_backbone_builds_at_its_minimum_size_with_its_count_and_stages(name):
    """Built once at the smallest size: the stored count, the stages, and the cut analysis."""
    backbone = _build(name)
    try:
        assert backbone.count_params() == registry.BACKBONES[name].parameters
        found = blocks.backbone_blocks(backbone)
        if name in STAGES:
            assert [block.name for block in found] == STAGES[name]
        weighted = [layer.name for layer in backbone.layers if layer.weights]
        assert sorted(n for b in found for n in b.layers if n in weighted) == sorted(weighted)  # Each once.
        points = blocks.unfreeze_points(backbone)
        assert [weighted.index(points[f"top:{n}"]) for n in range(len(found), 0, -1)] == sorted(
            weighted.index(points[f"top:{n}"]) for n in range(1, len(found) + 1))
        assert blocks.boundaries(backbone)
    finally:
        del backbone
        keras.backend.clear_session()


@pytest.mark.parametrize("name", ["vgg16", "xception", "inception_v3"])
def test_below_the_minimum_size_keras_refuses(name):
    with pytest.raises(ValueError):
        _build(name, registry.BACKBONES[name].min_image_size - 1)


@pytest.mark.parametrize("name, names", [
    ("mobilenet", ["conv1", "conv_dw_1", "conv_dw_2", "conv_dw_4", "conv_dw_6", "conv_dw_12"]),
    ("mobilenet_v3_small", ["conv", "expanded_conv", "expanded_conv_1", "expanded_conv_3", "expanded_conv_6",
                            "expanded_conv_8", "conv_1"]),
    ("convnext_tiny", ["stem", "stage0", "stage1", "stage2", "stage3"]),
    ("efficientnet_v2_b0", ["stem"] + [f"block{i}" for i in range(1, 7)] + ["top"]),
])
def test_stages_of_more_families(name, names):
    backbone = _build(name)
    found = blocks.backbone_blocks(backbone)
    assert [block.name for block in found] == names
    assert [n for block in found for n in block.layers] == [layer.name for layer in backbone.layers]


def _classifier(name="tiny", size=None, **kwargs):
    size = size or max(32, registry.BACKBONES[name].min_image_size)
    return classifier.build_classifier(name, size, 3, "none", head_units=(8,), **kwargs)


def _trainable(model) -> list[str]:
    return [layer.name for layer in model.get_layer("backbone").layers if layer.trainable_weights]


def test_fine_tune_at_takes_all_top_n_a_stage_or_a_layer():
    model = _classifier()
    start = {value: classifier.unfreeze_start(model, value)
             for value in ("all", "top:1", "top:2", "top:3", "block2", "block2_conv1")}
    assert start == {"all": 0, "top:1": 2, "top:2": 1, "top:3": 0, "block2": 1, "block2_conv1": 1}
    classifier.unfreeze_backbone(model, "top:2")
    assert _trainable(model) == ["block2_conv1", "block3_conv1"]


@pytest.mark.parametrize("value", ["top:4", "top:0", "block9", "top:x"])
def test_a_bad_unfreeze_point_lists_the_stages(value):
    with pytest.raises(UserError) as error:
        classifier.unfreeze_start(_classifier(), value)
    message = str(error.value)
    assert "top:1=block3, top:2=block2, top:3=block1" in message
    assert message.endswith(f"Received: fine_tune_at={value}") and "\n" not in message


def test_top_n_unfreezes_the_last_n_stages_of_a_convnext():
    model = _classifier("convnext_tiny")
    classifier.unfreeze_backbone(model, "top:2")
    found = {block.name: block.layers for block in blocks.backbone_blocks(model)}
    assert set(_trainable(model)) == {name for stage in ("stage2", "stage3") for name in found[stage]
                                      if model.get_layer("backbone").get_layer(name).weights}
    # The layer-wise rates count the same stages.
    rates = optimizers.block_learning_rates(model, 1.0, 0.5)
    assert list(rates) == ["head", "stage3", "stage2", "stage1", "stage0", "stem"]


# With random weights, EfficientNet's top activations are so small that its top BatchNormalization alone
# barely changes them (its epsilon dominates the batch variance): all of it trains.
BN_BACKBONES = (("resnet50", "top:1"), ("efficientnet_b0", "all"))


def _moving_statistics(model) -> np.ndarray:
    layers = [layer for layer in model.get_layer("backbone").layers
              if isinstance(layer, keras.layers.BatchNormalization)]
    return np.concatenate([np.ravel(v.numpy()) for layer in layers
                           for v in (layer.moving_mean, layer.moving_variance)])


def _bn_step(name: str, mode: str, fine_tune_at: str):
    """One fine-tuning step on a batch of 32x32 images; the moving statistics' largest change, and the
    pooled features' largest gap between fit()'s training mode and inference mode on that batch."""
    keras.utils.set_random_seed(0)
    model = _classifier(name, dropout=0.0, backbone_bn=mode)
    classifier.unfreeze_backbone(model, fine_tune_at)
    # Eagerly, for speed: fit() passes training=True down the same way as in a tf.function.
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="categorical_crossentropy", run_eagerly=True)
    images, labels = make_examples(8, seed=3)
    x = backbones.get_preprocessing(name, 32)(images)
    before = _moving_statistics(model)
    model.fit(x, keras.utils.to_categorical(labels, 3), batch_size=8, epochs=1, verbose=0)
    change = float(np.max(np.abs(_moving_statistics(model) - before)))
    features = classifier.build_feature_extractor(model)
    gap = float(np.max(np.abs(features([x], training=True) - features([x], training=False))))
    return change, gap


@pytest.mark.parametrize("mode", registry.BACKBONE_BN)
@pytest.mark.parametrize("name, fine_tune_at", BN_BACKBONES)
def test_batchnorm_statistics_and_outputs_after_a_fine_tuning_step(name, fine_tune_at, mode):
    """frozen: the moving statistics stay and fit() sees what evaluate() sees (EfficientNet's stochastic
    depth included); train: the statistics move and the two modes differ. Each case fails in the other
    mode."""
    change, gap = _bn_step(name, mode, fine_tune_at)
    print(f"{name} --backbone_bn={mode}: moving statistics changed by up to {change:.3g}; pooled features "
          f"differ between training and inference mode by up to {gap:.3g}")
    if mode == registry.BN_FROZEN:
        assert change == 0.0 and gap < 1e-5
    else:
        assert change > 1e-3 and gap > 1e-3


def test_batchnorm_layers_train_only_with_backbone_bn_train():
    for mode, expected in ((registry.BN_FROZEN, False), (registry.BN_TRAIN, True)):
        model = _classifier("mobilenet_v2", backbone_bn=mode)
        classifier.unfreeze_backbone(model, "top:2")  # block_16 and Conv_1.
        backbone = model.get_layer("backbone")
        norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
        above = [layer.name.startswith(("block_16_", "Conv_1")) for layer in norms]
        assert [layer.trainable for layer in norms] == [expected and top for top in above]
        classifier.freeze_backbone(model)  # The head stage runs the backbone in inference mode either way.
        x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
        features = classifier.build_feature_extractor(model)
        np.testing.assert_allclose(features([x], training=True), features([x], training=False), atol=1e-6)


def test_checkpoints_of_the_plain_functional_backbone_load(tmp_path):
    """Earlier versions called keras.applications' own model 'backbone'; the model that pin_mode pins
    keeps its class and layers, so their checkpoints load."""
    application = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3),
                                           name="backbone")
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(application(inputs, training=False))
    x = keras.layers.BatchNormalization(name="head_batchnorm")(x)
    x = keras.layers.Dense(8, activation="relu", name="head_dense_1")(x)
    x = keras.layers.Dropout(0.3, name="head_dropout")(x)
    logits = keras.layers.Dense(3, name="predictions")(x)
    old = keras.Model(inputs, keras.layers.Softmax(name="probabilities")(logits))
    path = str(tmp_path / "old.weights.h5")
    old.save_weights(path)
    new = _classifier("vgg16")
    new.load_weights(path)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32") * 50
    np.testing.assert_allclose(new(x), old(x), atol=1e-6)


@pytest.mark.parametrize("name", sorted(SMALLEST.values()))
def test_the_pipeline_applies_the_familys_own_preprocessing(name):
    """uint8 in, the family's preprocess_input of the resized image out; raw-pixel families get 0-255."""
    images = make_examples(2, seed=5, size=40)[0]
    size = max(32, registry.BACKBONES[name].min_image_size)
    got = np.asarray(backbones.get_preprocessing(name, size)(images))
    resized = tf.image.resize(images, (size, size)).numpy()
    expected = np.asarray(backbones.get_preprocess_input(name)(resized.copy()))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    if registry.BACKBONES[name].raw_pixels:
        assert got.max() > 200  # Not /255: these models rescale inside.


def test_the_input_pipeline_feeds_raw_pixels_to_efficientnet(make_config):
    """A /255 anywhere on the way would make EfficientNet see near-black images (chance accuracy)."""
    splits = make_splits()
    config = make_config(backbone="efficientnet_b0")
    data = datasets.build_data(config, splits)
    batch = next(iter(data.test))[0].numpy()
    raw = tf.image.resize(np.stack([image for image, _ in splits.test.take(4).as_numpy_iterator()]),
                          (32, 32)).numpy()
    np.testing.assert_allclose(batch, raw, atol=1e-3)
    assert batch.max() > 200


@pytest.mark.parametrize("name", ["efficientnet_b0", "vgg16", "tiny"])
def test_the_export_applies_the_familys_own_preprocessing(name):
    """The deploy model (uint8 in) answers like the classifier on preprocess_input(resize(image))."""
    model = _classifier(name)
    preprocess = backbones.get_preprocessing(name, 32)
    exported = deploy.build_deploy_model(model, preprocess, 32)
    images = make_examples(2, seed=6, size=48)[0]
    expected = model(backbones.get_preprocess_input(name)(tf.image.resize(images, (32, 32)).numpy()))
    np.testing.assert_allclose(exported(images)["probabilities"], expected, atol=1e-5)


def _one_step_cached_and_not(name: str, fine_tune_at: str):
    """The weights after one fine-tuning step on images, and after one on the cached activations at the
    backbone's cut below `fine_tune_at`, from the same start."""
    keras.utils.set_random_seed(1)
    model = _classifier(name, dropout=0.0)
    classifier.unfreeze_backbone(model, fine_tune_at)
    prefix, boundary = classifier.split_at(model, fine_tune_at)
    images, labels = make_examples(4, seed=2)
    x, y = backbones.get_preprocessing(name, 32)(images), keras.utils.to_categorical(labels, 3)
    return boundary, *one_step_on_images_and_on_stored(model, boundary, x, prefix(x, training=False), y)


@pytest.mark.parametrize("name, fine_tune_at, boundary", [
    ("mobilenet_v2", "top:2", "block_15_add"),
    pytest.param("resnet50", "top:1", "conv4_block6_out", marks=pytest.mark.slow),
    # The cut is the output of a `+` (an operation, not a layer): auto-named.
    pytest.param("convnext_tiny", "convnext_tiny_stage_3_block_1_depthwise_conv", None,
                 marks=pytest.mark.slow),
])
def test_cached_and_uncached_fine_tuning_take_the_same_step(name, fine_tune_at, boundary):
    """For backbones with skip connections, cut between two residual blocks."""
    found, start, on_images, on_cache = _one_step_cached_and_not(name, fine_tune_at)
    if boundary:
        assert found == boundary
    moved = [i for i, (a, b) in enumerate(zip(start, on_images)) if not np.array_equal(a, b)]
    assert moved
    for a, b in zip(on_images, on_cache):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _toy_classifier(*layers, skips=()) -> keras.Model:
    """A backbone of 3x3 convolutions named `layers`, in a chain, plus an Add at the end of each (from,
    to) in `skips` that adds the output of `from` (or the input, "input") to that of `to`."""
    inputs = keras.Input((8, 8, 3))
    outputs = {"input": inputs}
    x = inputs
    for name in layers:
        x = outputs[name] = keras.layers.Conv2D(3, 3, padding="same", name=name)(x)
        for source, target in skips:
            if target == name:
                x = outputs[name] = keras.layers.Add(name=f"{source}_to_{target}")([outputs[source], x])
    backbone = backbones.pin_mode(keras.Model(inputs, x, name="backbone"))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(backbone(inputs))
    return keras.Model(inputs, keras.layers.Dense(2, name="predictions")(x))


def test_boundaries_skip_what_a_skip_connection_spans():
    model = _toy_classifier("conv1", "conv2", "conv3", skips=[("conv1", "conv2")])
    backbone = model.get_layer("backbone")
    names = [backbone.operations[i].name for i in blocks.boundaries(backbone)]
    # Not conv2: the add after it still reads conv1.
    assert names == [backbone.operations[0].name, "conv1", "conv1_to_conv2", "conv3"]
    assert classifier.find_split(model, "conv3").boundary == "conv1_to_conv2"
    assert classifier.find_split(model, "conv2").boundary == "conv1"


def test_a_generated_boundary_name_is_stored_with_its_position():
    """ConvNeXt's cuts are `+` operations that Keras names add_N, N depending on what the process built
    before; files name them by their position too. Named layers keep their names."""
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(3, 3, padding="same", name="conv1")(inputs)
    b = keras.layers.Conv2D(3, 3, padding="same", name="conv2")(a)
    c = keras.layers.Conv2D(3, 3, padding="same", name="conv3")(a + b)
    backbone = backbones.pin_mode(keras.Model(inputs, c, name="backbone"))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(backbone(inputs)))
    split = classifier.find_split(model, "conv3")
    assert split.boundary.startswith("add") and split.stored_name == f"{split.boundary}_at_3"
    assert classifier.find_split(model, "conv2").stored_name == "conv1"


def test_where_no_cut_exists_the_split_says_why():
    model = _toy_classifier("conv1", "conv2", "conv3", skips=[("input", "conv3")])
    split = classifier.find_split(model, "conv3")
    assert split.prefix is None and "skip connections or branches cross every point" in split.reason


def test_a_cut_that_would_cache_little_is_refused():
    """NASNet's only cut is above its stem: caching there would save two layers of hundreds."""
    model = _toy_classifier("conv1", "conv2", "conv3", "conv4", skips=[("conv1", "conv4")])
    split = classifier.find_split(model, "conv4")
    assert split.prefix is None
    assert "after conv1, would leave 2 of the 3 frozen weighted layers" in split.reason
    assert classifier.find_split(model, "conv3").boundary == "conv1"  # One layer stored, one rerun.


def test_the_head_stage_on_cached_features_takes_the_step_it_takes_on_images():
    """The pooled-feature cache serves every family: pinned to inference mode, the backbone gives the head
    stage exactly the stored features, EfficientNet's stochastic depth included."""
    keras.utils.set_random_seed(4)
    model = _classifier("efficientnet_b0", dropout=0.0)
    images, labels = make_examples(4, seed=7)
    x, y = backbones.get_preprocessing("efficientnet_b0", 32)(images), keras.utils.to_categorical(labels, 3)
    start, on_images, on_features = one_step_on_images_and_on_stored(
        model, classifier.HEAD_INPUT, x, classifier.build_feature_extractor(model)([x]), y, 1e-2)
    assert any(not np.array_equal(a, b) for a, b in zip(start, on_images))
    for a, b in zip(on_images, on_features):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_backbone_bn_train_cuts_only_where_nothing_below_runs_differently_in_training():
    """Under train, the frozen part below the cut runs in fit()'s mode: EfficientNet's stochastic depth
    there would make stored activations wrong, so it trains on images; MobileNetV2 has no dropout."""
    assert classifier.find_split(_classifier("efficientnet_b0"), "top:1").boundary == "block7a_project_bn"
    split = classifier.find_split(_classifier("efficientnet_b0", backbone_bn="train"), "top:1")
    assert split.prefix is None and "training mode (block2b_drop" in split.reason
    assert classifier.find_split(_classifier("mobilenet_v2", backbone_bn="train"), "top:1").boundary
