"""Backbone blocks and discriminative learning rates: the step each block takes, under a strategy and
mixed precision, and the optimizer state across a resume."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from helpers import make_examples
from tl_keras.errors import UserError
from tl_keras.model import blocks
from tl_keras.model import classifier
from tl_keras.training import checkpointing
from tl_keras.training import optimizers

RATE, DECAY = 1e-2, 0.5


def _model(fine_tune_at="all", dropout=0.3):
    model = classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,), dropout=dropout)
    classifier.unfreeze_backbone(model, fine_tune_at)
    return model


def _compile(model, optimizer):
    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy())


def _batch(seed=0):
    images, labels = make_examples(4, seed)
    return images.astype("float32") / 127.5 - 1.0, keras.utils.to_categorical(labels, 3)


def _weights(model) -> dict:
    return {v.path: np.array(v.numpy()) for v in model.trainable_variables}


def _step_per_block(model, before: dict, trained=None) -> dict:
    """Median |delta w| per block of `model` (head included) over the weights of `trained` (default:
    `model`) that moved: with Adam, one step moves each weight that has a gradient by about its rate."""
    moved = {}
    for v in (model if trained is None else trained).trainable_variables:
        delta = np.abs(np.asarray(v.numpy(), np.float64) - before[v.path]).ravel()
        block = blocks.block_of(model, v.path.split("/")[0])
        moved.setdefault(block, []).append(delta[delta > 0])
    return {block: float(np.median(np.concatenate(deltas))) for block, deltas in moved.items()}


@pytest.mark.parametrize("backbone, names", [
    ("vgg16", ["block1", "block2", "block3", "block4", "block5"]),
    ("resnet50", ["conv1", "conv2", "conv3", "conv4", "conv5"]),
    ("mobilenet_v2", ["Conv1", "expanded_conv", "block_1", "block_3", "block_6", "block_10", "block_13",
                      "block_16", "Conv_1"]),
    ("efficientnet_b0", ["stem"] + [f"block{i}" for i in range(1, 8)] + ["top"]),
    ("tiny", ["block1", "block2", "block3"]),
])
def test_blocks_are_the_natural_stages(backbone, names):
    model = classifier.build_classifier(backbone, 32, 3, "none", head_units=(8,))
    found = blocks.backbone_blocks(model)
    assert [block.name for block in found] == names
    layers = [layer.name for layer in model.get_layer("backbone").layers]
    assert [name for block in found for name in block.layers] == layers  # Each layer once, in order.
    assert all(any(model.get_layer("backbone").get_layer(name).weights for name in block.layers)
               for block in found)


def test_block_of():
    model = classifier.build_classifier("resnet50", 32, 3, "none", head_units=(8,))
    assert blocks.block_of(model, "pool1_pool") == "conv1"  # Unnamed by a rule: the block before.
    assert blocks.block_of(model, "conv4_block6_out") == "conv4"
    assert blocks.block_of(model, "conv5_block1_0_conv") == "conv5"
    assert blocks.block_of(model, "predictions") == blocks.HEAD
    with pytest.raises(UserError, match="Received: layer_name=conv9_block1_0_conv"):
        blocks.block_of(model, "conv9_block1_0_conv")


def test_block_learning_rates():
    rates = optimizers.block_learning_rates(_model(), RATE, DECAY)
    assert list(rates) == ["head", "block3", "block2", "block1"]
    np.testing.assert_allclose(list(rates.values()), [RATE, RATE / 2, RATE / 4, RATE / 8])
    assert set(optimizers.block_learning_rates(_model(), RATE, None).values()) == {RATE}
    with pytest.raises(UserError, match="Received: layerwise_lr_decay=1.5"):
        optimizers.build_optimizer(_model(), RATE, 1.5)


@pytest.mark.parametrize("setting", ["default", "mirrored", "mixed_bfloat16", "from_block2"])
def test_each_block_steps_at_its_rate(setting, mirrored_strategy):
    """Head: the full rate; the top block RATE * DECAY, the next RATE * DECAY^2, ... Frozen blocks stay."""
    strategy = mirrored_strategy if setting == "mirrored" else tf.distribute.get_strategy()
    policy = keras.mixed_precision.global_policy()
    if setting == "mixed_bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        with strategy.scope():
            model = _model("block2_conv1" if setting == "from_block2" else "all")
            _compile(model, optimizers.build_optimizer(model, RATE, DECAY))
        before = _weights(model)
        model.fit(tf.data.Dataset.from_tensor_slices(_batch()).batch(4), epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    assert model.get_layer("head_dense_1").compute_dtype == (
        "bfloat16" if setting == "mixed_bfloat16" else "float32")
    steps = _step_per_block(model, before)
    expected = {"head": RATE, "block3": RATE * DECAY, "block2": RATE * DECAY ** 2,
                "block1": RATE * DECAY ** 3}
    if setting == "from_block2":
        del expected["block1"]
        assert not any(w.trainable for w in model.get_layer("backbone").get_layer("block1_conv1").weights)
    assert set(steps) == set(expected)
    for block, rate in expected.items():
        assert steps[block] == pytest.approx(rate, rel=0.02), block


def test_a_model_on_cached_activations_steps_at_the_classifier_rates():
    """Fine-tuning on cached activations trains a model without the backbone layer: the optimizer is
    built from the classifier, and routes the shared variables by path."""
    model = _model("block2_conv1")
    prefix, boundary = classifier.split_at(model, "block2_conv1")
    upper = classifier.build_model_from(model, boundary)
    with pytest.raises(ValueError, match="pass the classifier"):
        optimizers.build_optimizer(upper, RATE, DECAY)
    _compile(upper, optimizers.build_optimizer(model, RATE, DECAY))
    before = _weights(upper)
    x, y = _batch()
    upper.train_on_batch(prefix(x), y)
    steps = _step_per_block(model, before, upper)
    assert set(steps) == {"head", "block3", "block2"}
    for block, rate in {"head": RATE, "block3": RATE * DECAY, "block2": RATE * DECAY ** 2}.items():
        assert steps[block] == pytest.approx(rate, rel=0.02), block


def test_without_decay_plain_adam():
    model = _model()
    optimizer = optimizers.build_optimizer(model, RATE)
    assert type(optimizer) is keras.optimizers.Adam
    assert optimizers.current_learning_rate(optimizer) == pytest.approx(RATE)
    # A decay of 1 trains every block at the full rate: the same step as plain Adam.
    x, y = _batch()
    results, start = [], _model().get_weights()
    for decay in (None, 1.0):
        model = _model(dropout=0.0)  # Two models draw different dropout masks.
        model.set_weights(start)
        _compile(model, optimizers.build_optimizer(model, RATE, decay))
        model.train_on_batch(x, y)
        results.append(model.get_weights())
    for plain, layerwise in zip(*results):
        np.testing.assert_allclose(plain, layerwise, rtol=0, atol=1e-5)  # Steps are RATE = 1e-2.


def test_current_learning_rate_follows_the_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(RATE, decay_steps=1, decay_rate=0.5)
    x, y = _batch()
    for decay in (None, DECAY):
        model = _model()
        _compile(model, optimizers.build_optimizer(model, schedule, decay))
        assert optimizers.current_learning_rate(model.optimizer) == pytest.approx(RATE)
        for _ in range(2):
            model.train_on_batch(x, y)
        assert optimizers.current_learning_rate(model.optimizer) == pytest.approx(RATE / 4)
    rates = optimizers.block_learning_rates(model, schedule, DECAY, step=2)
    assert rates["head"] == pytest.approx(RATE / 4) and rates["block1"] == pytest.approx(RATE / 32)


def test_config_round_trips():
    schedule = keras.optimizers.schedules.CosineDecay(0.0, 10, warmup_target=RATE, warmup_steps=2)
    optimizer = optimizers.build_optimizer(_model(), schedule, DECAY)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    names = sorted(o.name for o in restored.optimizers)
    assert names == sorted(o.name for o in optimizer.optimizers) == [
        "adam_block1", "adam_block2", "adam_block3", "adam_head"]
    for original in optimizer.optimizers:
        copy = next(o for o in restored.optimizers if o.name == original.name)
        assert float(copy.learning_rate) == pytest.approx(float(original.learning_rate))


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_optimizer_state_resumes_in_a_fresh_process(tmp_path, policy):
    """Save after two steps, restore into a new model and optimizer (made after others, so Keras's
    numbering differs): the next step gives the weights of an uninterrupted run. (mixed_float16 skips
    steps until its loss scale stops overflowing float16.)"""
    saved_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _model("block2_conv1")
        _compile(model, optimizers.build_optimizer(model, RATE, DECAY))
        for seed in range(8):  # Until a step is taken and one more after it.
            model.train_on_batch(*_batch(seed))
            if int(model.optimizer.iterations) >= 2:
                break
        state = checkpointing.RunState()
        checkpointing.save_state(str(tmp_path), state, model, model)
        saved_keys, steps = set(checkpointing.optimizer_variables(model)), int(model.optimizer.iterations)
        model.train_on_batch(*_batch(9))
        uninterrupted = model.get_weights()

        keras.optimizers.Adam(RATE)  # Shift the per-process numbering of optimizers.
        other = _model()
        _compile(other, optimizers.build_optimizer(other, RATE, DECAY))
        other.train_on_batch(*_batch(0))
        resumed = _model("block2_conv1")
        _compile(resumed, optimizers.build_optimizer(resumed, RATE, DECAY))
        assert checkpointing.restore(str(tmp_path), state, resumed, resumed)
        assert set(checkpointing.optimizer_variables(resumed)) == saved_keys
        assert int(resumed.optimizer.iterations) == steps == 2
        resumed.train_on_batch(*_batch(9))
    finally:
        keras.mixed_precision.set_global_policy(saved_policy)
    for expected, actual in zip(uninterrupted, resumed.get_weights()):
        np.testing.assert_array_equal(expected, actual)
