"""--ema_decay (issue 16): Keras's weight averaging on every optimizer a stage may use, the averages in
the checkpoints, validation, the stage's evaluation and the export, and a mid-epoch resume with EMA
and mixup that ends exactly where an uninterrupted run does."""

import dataclasses
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tl_keras import config as config_lib
from tl_keras.errors import UserError
from tl_keras.model import classifier
from tl_keras.training import checkpointing
from tl_keras.training import ema
from tl_keras.training import optimizers
from tl_keras.training import run as train
from tl_keras.training import schedule
from tl_keras.training import stages

from helpers import make_examples, make_splits


def _model(fine_tune_at=None):
    keras.utils.set_random_seed(3)
    model = classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,))
    if fine_tune_at:
        classifier.unfreeze_backbone(model, fine_tune_at)
    return model


def _data(n=12, seed=0):
    images, labels = make_examples(n, seed)
    return (images.astype("float32") / 127.5 - 1.0), np.eye(3, dtype="float32")[labels]


def _weights(model):
    return [w.numpy().copy() for w in model.trainable_weights]


def _averages(model):
    return [average.numpy().copy() for _, average in ema.pairs(model.optimizer)]


def test_enable_turns_on_keras_averaging_on_every_optimizer_that_updates_weights():
    plain = keras.optimizers.Adam(1e-3)
    ema.enable(plain, 0.99)
    assert plain.use_ema and plain.ema_momentum == 0.99
    layerwise = optimizers.build_optimizer(_model("block2_conv1"), 1e-3, 0.5)
    ema.enable(layerwise, 0.9)
    leaves = ema.leaf_optimizers(layerwise)
    assert len(leaves) > 1 and all(leaf.use_ema and leaf.ema_momentum == 0.9 for leaf in leaves)
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3))
    ema.enable(scaled, 0.9)
    assert ema.leaf_optimizers(scaled)[0].use_ema and ema.enabled(scaled)
    assert not ema.enabled(keras.optimizers.Adam(1e-3))
    with pytest.raises(UserError, match=r"Received: ema_decay=1\.5$"):
        ema.enable(keras.optimizers.Adam(1e-3), 1.5)


@pytest.mark.parametrize("layerwise", [None, 0.5])
def test_the_average_is_saved_with_the_optimizer_and_restored(make_config, layerwise):
    """The state stores raw weights, and the averages among the optimizer's variables, by name; a
    restored run has both back. With --layerwise_lr_decay each block's Adam keeps its own averages."""
    config = make_config(ema_decay=0.5, layerwise_lr_decay=layerwise)
    model = _model("block2_conv1")
    schedule.compile_classifier(model, 1e-2, config, 3, layerwise=model)
    images, labels = _data()
    model.fit(images, labels, batch_size=4, epochs=1, verbose=0)  # Ends with the averages in the model.
    model.fit(images, labels, batch_size=4, epochs=1, verbose=0,
              callbacks=[keeper := ema.TrainingWeights()])
    keeper.restore()  # The raw weights back, as _fit does when a stage trains on.
    raw, averages = _weights(model), _averages(model)
    assert len(averages) == len(raw) and not all(np.array_equal(a, r) for a, r in zip(averages, raw))
    saved = checkpointing.optimizer_variables(model)
    assert sum(key.endswith("_average") for key in saved) == len(raw)
    state = checkpointing.RunState()
    checkpointing.save_state(config.model_dir, state, model, model)

    restored = _model("block2_conv1")
    schedule.compile_classifier(restored, 1e-2, config, 3, layerwise=restored)
    assert checkpointing.restore(config.model_dir, state, restored, restored)
    for a, b in zip(_weights(restored), raw):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_averages(restored), averages):
        np.testing.assert_array_equal(a, b)


def test_validation_and_checkpoints_see_the_average_and_training_keeps_the_raw_weights(make_config):
    config = make_config(ema_decay=0.5)
    model = _model()
    schedule.compile_classifier(model, 1e-2, config, 3)
    images, labels = _data()
    validation = _data(8, seed=1)
    state = checkpointing.RunState()
    keeper = ema.TrainingWeights()
    callbacks = [ema.SwapForEvaluation(), checkpointing.TrainingCheckpoint(model, config.model_dir, state, 3),
                 keeper]
    history = model.fit(images, labels, batch_size=4, epochs=1, validation_data=validation, verbose=0,
                        callbacks=callbacks)
    averages = _weights(model)  # fit() ended with finalize_variable_values: the averages.
    for a, b in zip(averages, _averages(model)):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, r) for a, r in zip(averages, [v for _, v in keeper.raw]))
    validated = model.evaluate(*validation, verbose=0)[0]
    assert history.history["val_loss"][0] == pytest.approx(validated, rel=1e-6)
    for name in (checkpointing.LATEST, checkpointing.BEST):
        saved = _model()
        saved.load_weights(os.path.join(checkpointing.checkpoint_dir(config.model_dir), name))
        for a, b in zip(_weights(saved), averages):
            np.testing.assert_array_equal(a, b)
    resumable = _model()  # The state keeps the raw weights, which training goes on from.
    checkpointing.restore(config.model_dir, state, resumable)
    for a, (_, b) in zip(_weights(resumable), keeper.raw):
        np.testing.assert_array_equal(a, b)


def test_swapping_in_the_average_is_exact(make_config):
    """keras.callbacks.SwapEMAWeights swaps by addition and subtraction under TensorFlow, which rounds;
    ema.averaged copies, so the raw weights come back bit for bit."""
    model = _model()
    schedule.compile_classifier(model, 1e-2, make_config(ema_decay=0.9), 3)
    model.fit(*_data(), batch_size=4, epochs=1, verbose=0, callbacks=[keeper := ema.TrainingWeights()])
    keeper.restore()
    model.trainable_weights[0].assign(model.trainable_weights[0] + 1e-9)  # Tiny against the average.
    raw, averages = _weights(model), _averages(model)
    with ema.averaged(model.optimizer):
        for a, b in zip(_weights(model), averages):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(_weights(model), raw):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("precision, mirrored", [("mixed_float16", False), ("float32", True)])
def test_averaging_under_loss_scaling_and_mirrored_replicas(make_config, mirrored_strategy, precision,
                                                            mirrored):
    """mixed_float16 wraps the Adam in a LossScaleOptimizer; MirroredStrategy mirrors every variable,
    average included: the swap and the restore of raw weights work on both."""
    strategy = mirrored_strategy if mirrored else tf.distribute.get_strategy()
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        with strategy.scope():
            model = _model()
            schedule.compile_classifier(model, 1e-2, make_config(ema_decay=0.5), 3)
        model.fit(*_data(8), batch_size=4, epochs=1, verbose=0, callbacks=[keeper := ema.TrainingWeights()])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    averages = _weights(model)
    for a, b in zip(averages, _averages(model)):
        np.testing.assert_array_equal(a, b)
    keeper.restore()
    raw = _weights(model)
    assert not all(np.array_equal(a, b) for a, b in zip(raw, averages))
    with ema.averaged(model.optimizer):
        for a, b in zip(_weights(model), averages):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(_weights(model), raw):
        np.testing.assert_array_equal(a, b)
    assert sum(key.endswith("_average") for key in checkpointing.optimizer_variables(model)) == len(raw)


def test_a_short_stage_is_warned_about(caplog):
    with caplog.at_level(logging.INFO, logger="absl"):
        ema.warn_if_short(0.999, 300, "Stage 0 (head)")
        ema.warn_if_short(0.99, 3000, "Stage 1 (finetune)")
    assert "Stage 0 (head) runs 300 steps, fewer than the 1000 that --ema_decay=0.999" in caplog.text
    assert "such as 0.99." in caplog.text and "Stage 1" not in caplog.text


def test_a_head_on_cached_features_ends_with_its_average(make_config):
    """The cached head stage fits a model of its own whose optimizer averages the classifier's head
    weights: the classifier ends the stage holding the averages, and is tested, saved and exported
    with them."""
    from tl_keras.data import pipeline
    from tl_keras.model import backbones
    from tl_keras.reporting import evaluation

    config = make_config(ema_decay=0.5, augment="flip", cache_features="auto", head_epochs=2,
                         finetune_epochs=0, steps_per_epoch=2, head_learning_rate=1e-2)
    splits = make_splits(num_train=16, validation_split=0.25)
    metrics = train.run(config, splits=splits)
    assert os.path.isdir(os.path.join(config.model_dir, "feature_cache"))
    model = _model()
    model.load_weights(os.path.join(checkpointing.checkpoint_dir(config.model_dir), checkpointing.LATEST))
    model.compile(loss=keras.losses.CategoricalCrossentropy())
    test = pipeline.build_eval_dataset(splits.test, backbones.get_preprocessing("tiny", 32), 4, 3)
    result = evaluation.evaluate(model, test)
    assert metrics["stages"]["head"]["test_loss"] == pytest.approx(result.metrics["loss"], abs=1e-5)
    trained = make_config(augment="flip", cache_features="auto", head_epochs=2, finetune_epochs=0,
                          steps_per_epoch=2, head_learning_rate=1e-2, model_dir=config.model_dir + "_raw")
    raw = train.run(trained, splits=splits)
    assert raw["stages"]["head"]["test_loss"] != pytest.approx(result.metrics["loss"], abs=1e-5)


def _weights_file(model_dir):
    model = _model()
    model.load_weights(os.path.join(checkpointing.checkpoint_dir(model_dir), checkpointing.LATEST))
    return model.get_weights()


def test_a_stage_split_into_fits_ends_as_one_fit(make_config):
    """What _fit relies on: fit() over epochs 0-1 equals fit() over epoch 0, the raw weights put back
    (fit() ends by overwriting them with the averages), then fit() over epoch 1: raw weights,
    averages and the weights it ends with."""
    images, labels = _data(16)
    config = make_config(ema_decay=0.5)

    def trained(pieces):
        model = _model()
        schedule.compile_classifier(model, 1e-2, config, 3)
        for first, last in pieces:
            keeper = ema.TrainingWeights()
            model.fit(images, labels, batch_size=4, initial_epoch=first, epochs=last, shuffle=False,
                      verbose=0, callbacks=[keeper])
            if last < 2:
                keeper.restore()
        return _weights(model), _averages(model), [value for _, value in keeper.raw]

    whole, split = trained([(0, 2)]), trained([(0, 1), (1, 2)])
    for a, b in zip(whole, split):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    unrestored = _model()
    schedule.compile_classifier(unrestored, 1e-2, config, 3)
    unrestored.fit(images, labels, batch_size=4, epochs=1, shuffle=False, verbose=0)
    unrestored.fit(images, labels, batch_size=4, initial_epoch=1, epochs=2, shuffle=False, verbose=0)
    assert not all(np.array_equal(a, b) for a, b in zip(_weights(unrestored), whole[0]))


# A real run, stopped and resumed. EMA, mixup, label smoothing and balanced class weights (sample
# weights in the batches), layer-wise rates in fine-tuning (an average per block's Adam), TTA at each
# stage's end; saved every 2 of 4 steps. Head 2 epochs, then fine-tuning 2 epochs.
SETTINGS = dict(
    backbone="tiny", weights="none", image_size=32, batch_size=4, head_units=(8,),
    fine_tune_at="block2_conv1",
    distribution_strategy="default", cache_features="false", mixed_precision="float32", ema_decay=0.5,
    augment="flip,mixup", label_smoothing=0.1, class_weight="balanced", steps_per_epoch=4, save_every_steps=2,
    deterministic=True, tta="flip", head_epochs=2, finetune_epochs=2, layerwise_lr_decay=0.5,
    head_learning_rate=1e-2, finetune_learning_rate=1e-2)


def _splits():
    return make_splits(num_train=24, validation_split=0.25)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    config = config_lib.Config(model_dir=str(tmp_path_factory.mktemp("whole") / "run"), **SETTINGS)
    return {"metrics": train.run(config, splits=_splits()), "weights": _weights_file(config.model_dir)}


def _crash(patch, stage_index: int, epoch: int, step: int):
    """Fail the run right after the save `step` steps into `epoch` (counted across stages) in stage
    `stage_index`: the state on disk is that mid-epoch save."""
    real = checkpointing.save_state

    def save_then_crash(model_dir, state, *args, **kwargs):
        real(model_dir, state, *args, **kwargs)
        if (state.stage, state.epoch, state.step) == (stage_index, epoch, step) and args:
            raise RuntimeError("crash")

    patch.setattr(checkpointing, "save_state", save_then_crash)


def _crash_at_boundary(patch):
    real = stages.train_stage

    def crash(model, data, stage, *args, **kwargs):
        if stage.fine_tunes:
            raise RuntimeError("crash")
        return real(model, data, stage, *args, **kwargs)

    patch.setattr(stages, "train_stage", crash)


CRASHES = {
    # 2 steps into the head's first epoch: the rerun fits the rest of that epoch in one fit() and the
    # second epoch in another, and each fit() ends by overwriting the weights with the averages.
    "head": lambda patch: _crash(patch, 0, 0, 2),
    # As fine-tuning starts: it must start from the head's averages, saved when the head ended.
    "boundary": _crash_at_boundary,
    # 2 steps into fine-tuning, whose MultiOptimizer keeps an average per block.
    "finetune": lambda patch: _crash(patch, 1, 2, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(CRASHES))
def test_a_resume_with_ema_and_mixup_matches_an_uninterrupted_run(point, tmp_path, monkeypatch,
                                                                  uninterrupted):
    config = config_lib.Config(model_dir=str(tmp_path / "run"), **SETTINGS)
    with monkeypatch.context() as patch:
        CRASHES[point](patch)
        with pytest.raises(RuntimeError, match="crash"):
            train.run(config, splits=_splits())
    resumed = train.run(config, splits=_splits())
    for name, expected in uninterrupted["metrics"]["stages"].items():
        for key in ("test_accuracy", "test_loss", "single_view_test_loss", "steps"):
            assert resumed["stages"][name][key] == pytest.approx(expected[key], abs=1e-6), (name, key)
    for a, b in zip(_weights_file(config.model_dir), uninterrupted["weights"]):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_cached_head_is_tested_with_tta_on_images(make_config):
    """A head trained on cached features is still tested on images, so that TTA can mirror them."""
    metrics = train.run(make_config(tta="flip", augment="flip", cache_features="auto", finetune_epochs=0),
                        splits=make_splits(num_train=16, validation_split=0.25))
    assert metrics["stages"]["head"]["tta"] == "flip"


def test_evaluate_mode_uses_tta(make_config):
    splits = make_splits(num_train=16, validation_split=0.25)
    config = make_config(finetune_epochs=0)
    train.run(config, splits=splits)
    metrics = train.run(dataclasses.replace(config, mode="evaluate", tta="flip"), splits=splits)
    assert metrics["test"]["tta"] == "flip" and metrics["report"]["tta"] == "flip"
