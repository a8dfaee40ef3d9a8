"""Resumable state: optimizer and RNG variables are restored by their path, never by position."""

import os

import numpy as np
import tensorflow as tf

from tl_keras import config as config_lib
from tl_keras.model import backbones
from tl_keras.model import classifier
from tl_keras.training import checkpointing
from tl_keras.training import schedule

from helpers import make_examples


def _trained_model(seed: int):
    config = config_lib.Config(model_dir="unused", backbone="tiny", weights="none")
    model = classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,))
    schedule.compile_classifier(model, 1e-2, config, 3)
    images, labels = make_examples(8, seed=seed)
    inputs = backbones.get_preprocessing("tiny", 32)(images)
    model.fit(inputs, tf.one_hot(labels, 3), batch_size=4, epochs=1, verbose=0)
    return model


def _values(keyed: dict):
    return {key: v.numpy().copy() for key, v in keyed.items()}


def test_restore_assigns_by_path_whatever_the_order(tmp_path):
    model = _trained_model(seed=0)
    saved = _values(checkpointing.optimizer_variables(model))
    # Adam's two moments of a layer have the same shape: a positional restore could swap them.
    moments = [p for p in saved if p.endswith("_momentum") or p.endswith("_velocity")]
    assert moments and not all(np.array_equal(saved[p], 0) for p in moments)
    state = checkpointing.RunState(epoch=1)
    checkpointing.save_state(str(tmp_path), state, model, model)

    fresh = _trained_model(seed=1)  # Its optimizer is adam_1 in this process, the saved one adam.
    assert fresh.optimizer.name != model.optimizer.name
    reordered = dict(reversed(list(checkpointing.optimizer_variables(fresh).items())))
    path = os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), "state-000001",
                        checkpointing.OPTIMIZER_FILE)
    assert checkpointing.assign_by_path(reordered, path) is None
    restored = _values(checkpointing.optimizer_variables(fresh))
    assert restored.keys() == saved.keys()
    for name, value in saved.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_restore_refuses_state_of_other_variables(tmp_path):
    model = _trained_model(seed=0)
    checkpointing.save_state(str(tmp_path), checkpointing.RunState(epoch=1), model, model)
    path = os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), "state-000001",
                        checkpointing.OPTIMIZER_FILE)
    other = _trained_model(seed=1)
    before = _values(checkpointing.optimizer_variables(other))
    fewer = {k: v for k, v in checkpointing.optimizer_variables(other).items() if "head_dense_1" not in k}
    problem = checkpointing.assign_by_path(fewer, path)
    assert problem is not None and "not in this model" in problem and "head_dense_1" in problem
    after = _values(checkpointing.optimizer_variables(other))  # All or nothing: nothing was assigned.
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_state_round_trips_weights_optimizer_and_rng(tmp_path):
    model = _trained_model(seed=0)
    checkpointing.save_state(str(tmp_path), checkpointing.RunState(epoch=1, step=2), model, model)
    state = checkpointing.load_state(str(tmp_path))
    assert (state.epoch, state.step, state.save_id) == (1, 2, 1)
    fresh = _trained_model(seed=1)
    # Seed generators are numbered per process (seed_generator, seed_generator_1); their keys are not.
    assert checkpointing.rng_variables(model).keys() == checkpointing.rng_variables(fresh).keys()
    assert [v.path for v in checkpointing.rng_variables(model).values()] != [
        v.path for v in checkpointing.rng_variables(fresh).values()]
    assert checkpointing.restore(str(tmp_path), state, fresh, fresh)
    for a, b in zip(model.variables, fresh.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert sorted(os.listdir(checkpointing.checkpoint_dir(str(tmp_path)))) == ["state-000001", "state.json"]


def test_a_state_newer_than_the_pointer_does_not_block_the_next_save(tmp_path):
    """A kill between the rename of state-N and the write of state.json leaves state-N behind, with
    the pointer at N-1. The next save writes state-N again and must replace that leftover."""
    model = _trained_model(seed=0)
    model_dir = str(tmp_path)
    checkpointing.save_state(model_dir, checkpointing.RunState(epoch=1), model, model)
    leftover = os.path.join(checkpointing.checkpoint_dir(model_dir), "state-000002")
    os.makedirs(leftover)
    with open(os.path.join(leftover, checkpointing.MODEL_FILE), "wb") as f:
        f.write(b"half of an older attempt")
    state = checkpointing.load_state(model_dir)
    state.epoch = 2
    checkpointing.save_state(model_dir, state, model, model)
    assert checkpointing.load_state(model_dir).save_id == 2
    fresh = _trained_model(seed=1)
    assert checkpointing.restore(model_dir, checkpointing.load_state(model_dir), fresh, fresh)
    assert sorted(os.listdir(checkpointing.checkpoint_dir(model_dir))) == ["state-000002", "state.json"]
