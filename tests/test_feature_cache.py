"""The feature cache: stored activations read back exactly, whether held in memory or memory-mapped."""

import os
import signal
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from tl_keras.data import feature_cache
from tl_keras.errors import Interrupted
from tl_keras.errors import UserError


def _arrays(n=21, shape=(2, 2, 3), seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, *shape)).astype(np.float32)
    flipped = features[:, :, ::-1].copy()
    return features, flipped, rng.integers(0, 4, n)


def _batches(ds, count):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(count)]


@pytest.mark.parametrize("with_flips", [False, True])
def test_memory_mapped_reader_matches_the_in_memory_one(tmp_path, monkeypatch, with_flips):
    """CIFAR-10's block-4 cache (1.7 GB) is read through the memory map; small ones in memory."""
    features, flipped, labels = _arrays()
    paths = {}
    for name, array in (("features", features), ("flipped", flipped)):
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], array)
    mapped = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
    flips = (flipped, mapped["flipped"]) if with_flips else (None, None)

    def read(features, flipped):
        train = feature_cache.train_dataset(features, labels, 4, 5, seed=3, flipped=flipped,
                                            start_epoch=1, skip_steps=1, steps_per_epoch=5)
        return _batches(train, 9), _batches(feature_cache.eval_dataset(features, labels, 4, 5), 5)

    in_memory = read(features, flips[0])
    monkeypatch.setattr(feature_cache, "IN_MEMORY_BYTES", 0)
    memory_mapped = read(mapped["features"], flips[1])
    for ours, theirs in zip(in_memory, memory_mapped):
        assert len(ours) == len(theirs)
        for (x1, y1), (x2, y2) in zip(ours, theirs):
            np.testing.assert_array_equal(x1, x2)
            np.testing.assert_array_equal(y1, y2)
    if with_flips:  # Some examples were read from the mirrored copy.
        seen = np.concatenate([x for x, _ in in_memory[0]])
        assert any(np.array_equal(row, f) for row in seen for f in flipped[:3])


def test_extracted_activations_are_stored_once_and_reused(tmp_path):
    inputs = keras.Input((4, 4, 3))
    extractor = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    images = np.random.default_rng(0).normal(size=(10, 4, 4, 3)).astype(np.float32)
    labels = tf.one_hot(np.arange(10) % 3, 3)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    cache = feature_cache.FeatureCache(str(tmp_path), {"test": 1})
    (stored,) = cache.get(["gap"], "train", False, extractor, batches, 10)
    np.testing.assert_allclose(stored, images.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(cache.labels("train"), np.arange(10) % 3)
    assert not [name for name in os.listdir(cache.directory) if ".tmp" in name]
    failing = keras.Model(inputs, keras.layers.Lambda(lambda x: x[:, 0, 0] / 0.0)(inputs))
    (again,) = cache.get(["gap"], "train", False, failing, batches, 10)  # Read back, not extracted.
    np.testing.assert_array_equal(again, stored)


def test_too_little_free_disk_is_refused_in_one_line_before_writing(tmp_path, monkeypatch):
    """A memory map over a full disk dies with SIGBUS mid-write; the cache checks the space first."""
    inputs = keras.Input((4, 4, 3))
    extractor = keras.Model(inputs, keras.layers.Flatten()(inputs))
    images = np.zeros((10, 4, 4, 3), np.float32)
    batches = tf.data.Dataset.from_tensor_slices((images, tf.one_hot(np.arange(10) % 3, 3))).batch(4)
    cache = feature_cache.FeatureCache(str(tmp_path), {"test": 1})
    free = 10 * 48 * 4  # Exactly the activations' bytes: no margin left.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 0, free))
    with pytest.raises(UserError) as error:
        cache.get(["flat"], "train", False, extractor, batches, 10)
    message = str(error.value)
    assert "\n" not in message and "feature cache" in message and "free" in message
    assert message.endswith(f"Received: feature_cache={cache.directory}")
    assert not [name for name in os.listdir(cache.directory) if name.endswith(".npy")]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
    (stored,) = cache.get(["flat"], "train", False, extractor, batches, 10)
    assert stored.shape == (10, 48)


def test_an_interrupted_extraction_keeps_its_work_and_the_rerun_continues(tmp_path):
    """SIGTERM during a long extraction: what was extracted is kept, and the rerun starts there."""
    inputs = keras.Input((4, 4, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    extractor = keras.Model(inputs, [pooled, keras.layers.Flatten()(inputs)])
    images = np.random.default_rng(1).normal(size=(22, 4, 4, 3)).astype(np.float32)
    labels = tf.one_hot(np.arange(22) % 3, 3)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    cache = feature_cache.FeatureCache(str(tmp_path), {"test": 2})
    asked = []

    def stop_after_three_batches():
        asked.append(1)
        return signal.SIGTERM if len(asked) == 3 else None

    kept = r"SIGTERM during feature extraction \(12 of 22 train examples kept\)"
    with pytest.raises(Interrupted, match=kept):
        cache.get(["gap", "flat"], "train", False, extractor, batches, 22,
                  stop_requested=stop_after_three_batches)
    seen = []
    counting = keras.Model(inputs, [keras.layers.Lambda(lambda x: x)(o) for o in extractor.outputs])
    real_predict = counting.predict_on_batch
    counting.predict_on_batch = lambda x: (seen.append(len(x)), real_predict(x))[1]
    pooled_values, flat_values = cache.get(["gap", "flat"], "train", False, counting, batches, 22)
    assert seen == [4, 4, 2]  # Only the batches after the 12 kept examples.
    np.testing.assert_allclose(pooled_values, images.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(flat_values, images.reshape(22, -1), rtol=1e-6)
    np.testing.assert_array_equal(cache.labels("train"), np.arange(22) % 3)
    assert not [name for name in os.listdir(cache.directory) if "partial" in name or ".tmp" in name]
