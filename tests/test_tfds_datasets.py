"""Any TFDS image-classification dataset: other feature names and shapes, missing splits, slices."""

import logging
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tl_keras.data import tfds_dataset
from tl_keras.errors import UserError
from tl_keras.training import run as train


def _store(data_dir, name, features, splits):
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version="1.0.0", data_dir=data_dir, features=tfds.features.FeaturesDict(features),
        split_datasets={split: tf.data.Dataset.from_generator(
            make, output_signature={k: tf.TensorSpec(s, d) for k, (s, d) in spec.items()})
            for split, (make, spec) in splits.items()})


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """Built offline: a pets-like set (variable-size grayscale 'picture', label 'breed', no supervised
    keys, only a train split), one with its own validation split and RGBA images, and one without
    class labels."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    rng = np.random.default_rng(0)

    def pets():
        for i in range(30):
            h, w = rng.integers(20, 48, 2)
            yield {"picture": np.full((h, w, 1), 40 + 80 * (i % 3), np.uint8), "breed": i % 3, "id": i}

    _store(data_dir, "pets_like", {
        "picture": tfds.features.Image(shape=(None, None, 1)),
        "breed": tfds.features.ClassLabel(names=["beagle", "pug", "husky"]), "id": tf.int64},
        {"train": (pets, {"picture": ([None, None, 1], tf.uint8), "breed": ([], tf.int64),
                          "id": ([], tf.int64)})})

    def rgba(n):
        return lambda: ({"image": rng.integers(0, 255, (16, 16, 4), dtype=np.uint8), "label": i % 2}
                        for i in range(n))

    spec = {"image": ([16, 16, 4], tf.uint8), "label": ([], tf.int64)}
    _store(data_dir, "own_validation", {
        "image": tfds.features.Image(shape=(16, 16, 4)), "label": tfds.features.ClassLabel(num_classes=2)},
        {"train": (rgba(20), spec), "validation": (rgba(6), spec), "test": (rgba(5), spec)})
    _store(data_dir, "no_labels", {"image": tfds.features.Image(shape=(16, 16, 3)), "score": tf.int64},
           {"train": (lambda: ({"image": np.zeros((16, 16, 3), np.uint8), "score": 1} for _ in range(2)),
                      {"image": ([16, 16, 3], tf.uint8), "score": ([], tf.int64)})})
    return data_dir


def _load(tfds_dir, name, train_split="train", test_split="test", validation_split=0.2,
          test_split_fraction=0.0):
    return tfds_dataset.load_tfds(name, tfds_dir, train_split, test_split, validation_split, 0,
                                  test_split_fraction)


def _count(ds):
    return sum(1 for _ in ds)


def test_other_feature_names_grayscale_and_any_size(tfds_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="absl"):
        splits = _load(tfds_dir, "pets_like", validation_split=0.2, test_split_fraction=0.2)
    assert "pets_like has no 'test' split" in caplog.text
    assert splits.class_names == ["beagle", "pug", "husky"]
    # Both fractions are of the whole train split.
    assert (splits.num_train, splits.num_validation, splits.num_test) == (18, 6, 6)
    assert (_count(splits.train), _count(splits.validation), _count(splits.test)) == (18, 6, 6)
    shapes = set()
    for image, label in splits.train:
        assert image.dtype == tf.uint8 and image.shape[-1] == 3
        # Gray became RGB: every channel the same, brightness by breed.
        assert int(image[0, 0, 0]) == int(image[0, 0, 2]) == 40 + 80 * int(label)
        shapes.add(tuple(image.shape))
    assert len(shapes) > 1


def test_split_strings_carve_test_from_a_train_only_dataset(tfds_dir):
    splits = _load(tfds_dir, "pets_like", "train[:80%]", "train[80%:]", validation_split=0.25)
    assert (splits.num_train, splits.num_validation, splits.num_test) == (18, 6, 6)
    assert _count(splits.test) == 6


def test_without_a_test_split_validation_is_scored(tfds_dir):
    splits = _load(tfds_dir, "pets_like", validation_split=0.2)
    assert splits.test is splits.validation and splits.num_test == 6
    with pytest.raises(UserError, match="no 'test' split, and no validation split"):
        _load(tfds_dir, "pets_like", validation_split=0.0)


def test_own_validation_split_is_used_unless_already_in_use(tfds_dir, caplog):
    with caplog.at_level(logging.INFO, logger="absl"):
        splits = _load(tfds_dir, "own_validation", validation_split=0.1)
    assert "own 'validation' split" in caplog.text
    assert (splits.num_train, splits.num_validation, splits.num_test) == (20, 6, 5)
    image, _ = next(iter(splits.validation))
    assert image.shape == (16, 16, 3)  # RGBA lost its alpha.
    merged = _load(tfds_dir, "own_validation", "train+validation", validation_split=0.5)
    assert (merged.num_train, merged.num_validation) == (13, 13)


def test_dataset_without_class_labels_is_a_user_error(tfds_dir):
    with pytest.raises(UserError, match="not an image-classification dataset.*Received: dataset=no_labels"):
        _load(tfds_dir, "no_labels")


def test_training_on_a_variable_size_grayscale_dataset(make_config, tfds_dir, caplog):
    config = make_config(dataset="pets_like", data_dir=tfds_dir, test_split_fraction=0.2,
                         validation_split=0.2, class_weight="balanced", eval_steps=1)
    with caplog.at_level(logging.INFO, logger="absl"):
        metrics = train.run(config)
    assert {"head", "finetune"} <= set(metrics["stages"])
    # Without counts from the loader, they are counted from the 18 training labels.
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Class weights"))
    assert sum(int(n) for n in re.findall(r"\((\d+) images\)", line)) == 18
