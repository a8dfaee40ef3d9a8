"""Shared fixtures. Two logical CPU devices are configured here, before TensorFlow initialises,
so that tests can run a real 2-replica MirroredStrategy on a CPU-only machine."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import socket  # noqa: E402

import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from tl_keras import config as config_lib  # noqa: E402
from tl_keras.training import run  # noqa: E402

from helpers import CLASS_NAMES, make_examples, make_splits  # noqa: E402


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never touch the network: an in-process connection to anything but this machine fails,
    as it would offline (the TensorBoard server test talks to localhost)."""
    connect = socket.create_connection

    def loopback_only(address, *args, **kwargs):
        if address[0] not in _LOOPBACK:
            raise OSError(f"tests do not use the network (asked for {address[0]})")
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", loopback_only)


@pytest.fixture(autouse=True)
def fresh_seeds():
    """Each test starts from the same global seeds, whatever the one before it set (a global seed of 0
    would also break the pipeline's tensor-seeded shuffles: see training/run.py's set_seeds)."""
    run.set_seeds(1234)
    yield


@pytest.fixture
def tiny_splits():
    return make_splits()


@pytest.fixture
def make_config(tmp_path):
    """Fast-test settings: tiny backbone, 32x32, global batch 4, one step per phase, no weights.
    float32, since auto would pick bf16 on a CPU with AMX; tests of bf16 ask for it."""
    def make(**overrides):
        settings = dict(
            model_dir=str(tmp_path / "run"), backbone="tiny", weights="none", image_size=32,
            batch_size=4, head_epochs=1, finetune_epochs=1, steps_per_epoch=1, eval_steps=None,
            fine_tune_at="block2_conv1", head_units=(8,), distribution_strategy="default",
            augment="none", cache_features="false", mixed_precision="float32")
        if overrides.get("unfreeze_schedule"):  # It replaces both; the fixture's values would conflict.
            del settings["finetune_epochs"], settings["fine_tune_at"]
        settings.update(overrides)
        return config_lib.Config(**settings)
    return make


@pytest.fixture(scope="session")
def mirrored_strategy():
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


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
