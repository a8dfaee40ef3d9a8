"""A narrow fix that lets Keras 3's `model.fit` run under MultiWorkerMirroredStrategy.

Keras 3.15's TensorFlow trainer fails in two places when the strategy runs collectively across
workers (upstream: tensorflow/tensorflow#72388, closed as stale with Keras 2 as the only workaround):

1. `_maybe_symbolic_build` calls `strategy.reduce("MEAN", batch, axis=None)` on the whole (x, y)
   batch just to learn its shapes, and MultiWorkerMirroredStrategy raises "Attempt to convert a value
   (PerReplica...) to a Tensor". One replica's local batch has the shapes it needs.
2. `reduce_per_replica` reduces each step's logs with `strategy.reduce("MEAN", v, axis=0)`, which
   fails on the scalar losses and metrics with "Invalid reduction dimension 0 for input with 0
   dimensions". The mean across replicas is `axis=None`.

`install()` patches only those two points, only under multi-worker training, and says so in the log.
tests/test_distribute.py shows that a 2-worker run fails without it.
"""

import os

from absl import logging
import keras
import tensorflow as tf

TESTED_KERAS = "3.15"
_installed = False


def needed(strategy) -> bool:
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def install(strategy):
    """Patch Keras's TF trainer for a multi-worker `strategy`; a no-op for every other strategy."""
    global _installed
    if _installed or not needed(strategy):
        return
    if os.environ.get("TL_KERAS_DISABLE_MULTI_WORKER_COMPAT"):  # For the test that proves it is needed.
        logging.warning("Multi-worker compatibility fix disabled by TL_KERAS_DISABLE_MULTI_WORKER_COMPAT.")
        return
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    version = ".".join(keras.__version__.split(".")[:2])
    if version != TESTED_KERAS:
        logging.warning("multi_worker_compat was written for Keras %s, found %s: if multi-worker fit() "
                        "works without it, remove this module.", TESTED_KERAS, keras.__version__)
    original_reduce = tf_trainer.reduce_per_replica
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original_reduce(values, strategy, reduction)

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and tf_trainer._collective_all_reduce_multi_worker(self.distribute_strategy):
            for _, _, it in iterator:
                data_batch = tree.map_structure(_first_local_value(self.distribute_strategy), next(it))
                break
            with self.distribute_strategy.scope():
                self._symbolic_build(data_batch=data_batch)
            return
        return original_build(self, iterator=iterator, data_batch=data_batch)

    tf_trainer.reduce_per_replica = reduce_per_replica
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    _installed = True
    logging.info("Installed the Keras multi-worker compatibility fix (see tl_keras/multi_worker_compat.py).")


def _first_local_value(strategy):
    def first(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value
    return first
