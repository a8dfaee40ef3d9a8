"""Choosing a tf.distribute strategy. Training code only ever sees the strategy object."""

from absl import logging
import tensorflow as tf

from tl_keras.errors import UserError


def get_strategy(name: str = "auto", devices=None) -> tf.distribute.Strategy:
    """Return the strategy for `name`; call it before building any dataset or model.

    auto picks MirroredStrategy only with more than one GPU, since one replica gains nothing from it.
    `devices` restricts mirrored to those devices (tests mirror over logical CPUs).
    """
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "one_device":
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    else:
        raise UserError(f"Unknown distribution strategy. Received: distribution_strategy={name}")
    logging.info("Strategy %s with %d replica(s).", type(strategy).__name__,
                 strategy.num_replicas_in_sync)
    return strategy


def check_batch_size(batch_size: int, strategy: tf.distribute.Strategy):
    """The global batch must split evenly, or replicas would see different batch sizes."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise UserError(
            f"--batch_size is global and must be divisible by the {replicas} replicas. "
            f"Received: batch_size={batch_size}"
        )
