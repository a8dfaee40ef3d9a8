"""tf.data pipelines: seeded hold-out, augmentation randomness, train/eval agreement, TFDS loading."""

import socket

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tl_keras.data import pipeline
from tl_keras.data import tfds_dataset
from tl_keras.errors import UserError
from tl_keras.model import backbones

from helpers import make_splits


def _labels(ds):
    return [int(label) for _, label in ds]


def _images(ds):
    return np.stack([image.numpy() for image, _ in ds])


def test_hold_out_is_seeded_disjoint_and_complete():
    a = make_splits(num_train=40, validation_split=0.25, seed=3)
    b = make_splits(num_train=40, validation_split=0.25, seed=3)
    assert (a.num_train, a.num_validation) == (30, 10)
    train, validation = _images(a.train), _images(a.validation)
    np.testing.assert_array_equal(train, _images(b.train))
    np.testing.assert_array_equal(validation, _images(b.validation))
    everything = make_splits(num_train=40, validation_split=0, seed=3)
    keys = {img.tobytes() for img in _images(everything.train)}
    assert {img.tobytes() for img in train} | {img.tobytes() for img in validation} == keys
    assert not {img.tobytes() for img in train} & {img.tobytes() for img in validation}
    assert len(train) == int(a.train.cardinality())


def test_hold_out_depends_on_seed():
    base = make_splits(num_train=40, validation_split=0, seed=0)
    one = pipeline.hold_out_validation(base, 0.25, seed=1)
    two = pipeline.hold_out_validation(base, 0.25, seed=2)
    assert not np.array_equal(_images(one.validation), _images(two.validation))


def test_augmentation_is_random_but_shape_preserving():
    image = tf.random.uniform([32, 32, 3], 0, 255, seed=1)
    outputs = [pipeline.augment_image(image, tf.constant([i, 7], tf.int64)).numpy() for i in range(8)]
    assert all(out.shape == (32, 32, 3) for out in outputs)
    distinct = {out.tobytes() for out in outputs}
    assert len(distinct) > 2


def test_flip_only_augmentation_only_mirrors():
    image = tf.random.uniform([32, 32, 3], 0, 255, seed=2)
    for i in range(6):
        out = pipeline.augment_image(image, tf.constant([i, 1], tf.int64), "flip").numpy()
        assert np.array_equal(out, image.numpy()) or np.array_equal(out, image.numpy()[:, ::-1])


def _first_epoch_images(ds, steps):
    return np.concatenate([x.numpy() for x, _ in ds.take(steps)])


def test_train_pipeline_augments_differently_each_epoch():
    splits = make_splits(num_train=8, validation_split=0)
    preprocess = backbones.get_preprocessing("tiny", 32)
    ds = pipeline.build_train_dataset(splits.train, preprocess, 8, 3, "flip_translate", seed=0)
    first, second = [x.numpy() for x, _ in ds.take(2)]
    # Same examples (one batch is the whole epoch), but augmented differently.
    assert not np.allclose(np.sort(first.reshape(8, -1).sum(1)), np.sort(second.reshape(8, -1).sum(1))) \
        or not np.array_equal(first, second)
    assert not np.array_equal(first, second)


def test_train_and_eval_preprocessing_agree_without_augmentation():
    splits = make_splits(num_train=12, validation_split=0)
    preprocess = backbones.get_preprocessing("vgg16", 48)
    train = pipeline.build_train_dataset(splits.train, preprocess, 4, 3, "none", seed=0)
    evaluation = pipeline.build_eval_dataset(splits.train, preprocess, 4, 3)
    train_images = _first_epoch_images(train, 3)
    eval_images = _first_epoch_images(evaluation, 3)
    assert train_images.shape == eval_images.shape == (12, 48, 48, 3)
    # Training shuffles, so compare as sets of images.
    key = lambda a: sorted(img.tobytes() for img in a)  # noqa: E731
    assert key(train_images) == key(eval_images)


def test_eval_pipeline_matches_backbone_preprocess_input():
    splits = make_splits(num_train=4, validation_split=0)
    images = _images(splits.train)
    batch = next(iter(pipeline.build_eval_dataset(
        splits.train, backbones.get_preprocessing("vgg16", 32), 4, 3)))[0].numpy()
    import keras
    expected = keras.applications.vgg16.preprocess_input(images.astype("float32"))
    np.testing.assert_allclose(batch, expected, atol=1e-4)


def test_labels_are_one_hot():
    splits = make_splits(num_train=4, validation_split=0)
    _, labels = next(iter(pipeline.build_eval_dataset(
        splits.train, backbones.get_preprocessing("tiny", 32), 4, 3)))
    assert labels.shape == (4, 3)
    np.testing.assert_array_equal(labels.numpy().sum(1), np.ones(4))


def test_steps_for_caps():
    assert pipeline.steps_for(10, 4) == 3
    assert pipeline.steps_for(10, 4, cap=1) == 1
    assert pipeline.steps_for(1, 64) == 1


def test_load_tfds_with_mock_data_falls_back_to_counting():
    with tfds.testing.mock_data(num_examples=20):
        splits = tfds_dataset.load_tfds("cifar10", None, "train", "test", 0.25, seed=0)
    assert len(splits.class_names) == 10
    assert (splits.num_train, splits.num_validation, splits.num_test) == (15, 5, 20)
    image, label = next(iter(splits.train))
    assert image.shape == (32, 32, 3) and image.dtype == tf.uint8
    assert 0 <= int(label) < 10


def test_load_tfds_unknown_dataset_is_a_user_error():
    with pytest.raises(UserError, match="Received: dataset=no_such_dataset_xyz"):
        tfds_dataset.load_tfds("no_such_dataset_xyz", None, "train", "test", 0.1, 0)


def test_failed_download_says_how_to_run_offline(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to establish a new connection: network is unreachable")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(UserError) as error:
        tfds_dataset.load_tfds("cifar10", str(tmp_path), "train", "test", 0.1, 0)
    message = str(error.value)
    assert "--data_dir" in message and "\n" not in message


def test_no_network_is_found_in_seconds_without_download_retries(monkeypatch, tmp_path):
    """Offline, an unprepared dataset used to spend minutes in download retries before the one-line
    error. One short connection attempt decides; the download is never started."""
    def no_route(address, timeout=None):
        assert timeout is not None and timeout <= 5, timeout
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "_download_and_prepare",
                        lambda *a, **k: pytest.fail("started a download without a network"))
    with pytest.raises(UserError, match=r"Could not download or prepare TFDS dataset 'cifar10' \(no network: "
                                        r".*www.cs.toronto.edu.*\). To run offline, pass --data_dir"):
        tfds_dataset.load_tfds("cifar10", str(tmp_path), "train", "test", 0.1, 0)
