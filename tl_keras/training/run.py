"""The library's entry point: one Config in, the mode it names run, its metrics out.

The strategy comes first, then the data, then the model inside the strategy's scope, as
tf.distribute requires. `strategy` and `splits` can be injected by tests and embedding code.
"""

import dataclasses
import os
import shutil
import time

from absl import logging
import keras
import tensorflow as tf

from tl_keras import config as config_lib
from tl_keras.config import Config
from tl_keras.data import pipeline
from tl_keras.errors import UserError
from tl_keras.model import classifier
from tl_keras.reporting import evaluation
from tl_keras.serving import predict as predict_lib
from tl_keras.training import checkpointing
from tl_keras.training import datasets
from tl_keras.training import distribute
from tl_keras.training import exporting
from tl_keras.training import guards
from tl_keras.training import multi_worker_compat
from tl_keras.training import run_dir
from tl_keras.training import schedule
from tl_keras.training import stages


def run(config: Config, strategy: tf.distribute.Strategy | None = None,
        splits: pipeline.Splits | None = None) -> dict:
    """Run config.mode and return the metrics it wrote."""
    started = time.monotonic()
    run_dir.check_paths(config)
    if config.mode == "predict":
        return predict_lib.run(config)  # The exported SavedModel alone: no strategy, data or model code.
    strategy = strategy or distribute.get_strategy(config.distribution_strategy, config.num_gpus, config.tpu)
    distribute.check_batch_size(config.batch_size, strategy)
    multi_worker_compat.install(strategy)
    precision = distribute.resolve_precision(config.mixed_precision, strategy)
    distribute.check_combination(precision, config.jit_compile, strategy)
    keras.mixed_precision.set_global_policy(precision)
    own_dir = distribute.worker_model_dir(config.model_dir, strategy)
    if own_dir != config.model_dir:
        logging.info("Not the chief: writing to %s instead of %s.", own_dir, config.model_dir)
        checkpointing.copy_state(config.model_dir, own_dir)
        config = dataclasses.replace(config, model_dir=own_dir)
    try:
        with run_dir.lock(config.model_dir), guards.Signals() as signals:
            return _run(config, strategy, splits, precision, signals, started)
    finally:
        if not distribute.is_chief(strategy):
            shutil.rmtree(config.model_dir, ignore_errors=True)


def _run(config: Config, strategy, splits, precision: str, signals: guards.Signals, started: float) -> dict:
    run_dir.prepare(config)
    if precision != "float32":
        logging.info("Mixed precision: %s.", precision)
    if config.scale_lr_with_batch and strategy.num_replicas_in_sync > 1:
        replicas = strategy.num_replicas_in_sync
        scaled = {name: getattr(config, name) * replicas
                  for name in ("head_learning_rate", "finetune_learning_rate")
                  if getattr(config, name) != config_lib.AUTO}  # auto finds its rate at this batch size.
        config = dataclasses.replace(config, **scaled)
        logging.info("Learning rates scaled by %d replicas: %s.", replicas,
                     ", ".join(f"{name} {value:g}" for name, value in scaled.items()) or "none (auto)")
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    set_seeds(config.seed)
    if config.mode == "train":
        state = checkpointing.load_state(config.model_dir)
        if state is not None and "done" in (state.status, state.phase):
            logging.info("The run in %s has finished; nothing to do. Pass --overwrite to start fresh.",
                         config.model_dir)
            return run_dir.read_metrics(config.model_dir)
    if splits is None:
        splits = datasets.load_splits(config)
    run_dir.check_dataset(config, splits.class_names, splits.fingerprint)
    if config.mode in ("train", "export"):  # A missing package fails now, not after training.
        exporting.check_before_training(config, splits)
    data = datasets.build_data(config, splits)
    if config.mode == "train":
        return stages.train_and_export(config, strategy, data, signals, started)
    if config.mode == "lr_find":
        return stages.run_lr_find(config, strategy, data)
    model = restore_classifier(config, strategy, splits.num_classes)
    if config.mode == "evaluate":
        result = evaluation.evaluate(model, data.test, data.eval_steps, config.label_smoothing, config.tta)
        report = evaluation.write_report(result, splits.test, splits.class_names,
                                         os.path.join(config.model_dir, run_dir.EVAL_DIR), config.test_split)
        metrics = {"test": evaluation.split_metrics(result, "test")}
        run_dir.update_metrics(config.model_dir, metrics)
        return dict(metrics, report=report)
    return exporting.calibrate_and_export(model, config, splits)


def set_seeds(seed: int):
    """Python's, numpy's and TensorFlow's seeds. TensorFlow's get_seed compares (global, op) seeds
    with (0, 0) in Python: with a global seed of 0 and the pipeline's tensor op seeds that is a tensor's
    truth value in graph mode, an error. Another fixed global seed keeps --seed=0 reproducible."""
    keras.utils.set_random_seed(seed)
    if seed % (2**31 - 1) == 0:  # What TensorFlow truncates to 0.
        tf.random.set_seed(2**31 - 2)


def restore_classifier(config: Config, strategy, num_classes: int) -> keras.Model:
    """Rebuild the classifier and load the chosen checkpoint, for evaluate and export modes."""
    name = checkpointing.BEST if config.checkpoint == "best" else checkpointing.LATEST
    path = os.path.join(checkpointing.checkpoint_dir(config.model_dir), name)
    if not os.path.isfile(path):
        raise UserError(f"--mode={config.mode} needs a trained model_dir with {path}; train first. "
                        f"Received: model_dir={config.model_dir}")
    with strategy.scope():
        model = classifier.build_classifier(
            config.backbone, config.image_size, num_classes, "none",
            config.head_units, config.head_batchnorm, config.dropout,
            matmul_small_convs=distribute.computes_on_cpu(strategy))
        model.load_weights(path)
        schedule.compile_classifier(model, 1e-3, config, num_classes)  # Evaluation reads no rate.
    logging.info("Loaded %s.", path)
    return model
