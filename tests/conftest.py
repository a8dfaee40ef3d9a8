"""Shared fixtures. Two logical CPU devices are configured here, before TensorFlow initialises,
so that tests can run a real 2-replica MirroredStrategy on a CPU-only machine."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from tl_keras import config as config_lib  # noqa: E402
from tl_keras import input_pipeline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
SHARED_DATA = os.path.join(SHARED, "data", "tensorflow_datasets")
SHARED_WEIGHTS = os.path.join(SHARED, "weights", "vgg16_hed_notop.weights.h5")
CLASS_NAMES = ["cat", "dog", "frog"]


def make_examples(n: int, seed: int, size: int = 32, num_classes: int = 3):
    """Images whose mean brightness depends on the class, so a few steps can learn something."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    base = (labels * (200 // max(1, num_classes - 1)))[:, None, None, None]
    images = np.clip(base + rng.integers(0, 56, (n, size, size, 3)), 0, 255).astype(np.uint8)
    return images, labels


def make_splits(num_train=24, num_test=8, validation_split=0.25, seed=0, size=32):
    images, labels = make_examples(num_train, seed, size)
    test_images, test_labels = make_examples(num_test, seed + 1, size)
    splits = input_pipeline.Splits(
        train=tf.data.Dataset.from_tensor_slices((images, labels)),
        test=tf.data.Dataset.from_tensor_slices((test_images, test_labels)),
        class_names=list(CLASS_NAMES), num_train=num_train, num_test=num_test)
    if validation_split:
        splits = input_pipeline.hold_out_validation(splits, validation_split, seed)
    return splits


@pytest.fixture
def tiny_splits():
    return make_splits()


@pytest.fixture
def make_config(tmp_path):
    """Fast-test settings: tiny backbone, 32x32, global batch 4, one step per phase, no weights."""
    def make(**overrides):
        settings = dict(
            model_dir=str(tmp_path / "run"), backbone="tiny", weights="none", image_size=32,
            batch_size=4, head_epochs=1, finetune_epochs=1, steps_per_epoch=1, eval_steps=None,
            fine_tune_at="block2_conv1", head_units=(8,), distribution_strategy="default",
            augment="none", cache_features="false")
        settings.update(overrides)
        return config_lib.Config(**settings)
    return make


@pytest.fixture(scope="session")
def mirrored_strategy():
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def requires_shared():
    return pytest.mark.skipif(
        not (os.path.isdir(SHARED_DATA) and os.path.isfile(SHARED_WEIGHTS)),
        reason=f"needs the offline CIFAR-10 copy and VGG16 weights under {SHARED} (absent here)")


@pytest.fixture(scope="session")
def tiny_tfds_dir(tmp_path_factory):
    """A real prepared TFDS dataset on disk, so the CLI's TFDS path runs offline."""
    data_dir = tmp_path_factory.mktemp("tfds")

    def split(n, seed):
        images, labels = make_examples(n, seed)
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})

    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_shapes", version="1.0.0", data_dir=str(data_dir),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES)}),
        split_datasets={"train": split(24, 0), "test": split(8, 1)})
    return str(data_dir)
