"""The training job: strategy, data, phase 1 (head), phase 2 (fine-tune), evaluation and export.

A run is resumable: rerunning the same command with the same --model_dir carries on from the last
saved state (see checkpointing.py), in whichever phase it stopped.
"""

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Callable

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tl_keras import backbones
from tl_keras import callbacks as callbacks_lib
from tl_keras import checkpointing
from tl_keras import config as config_lib
from tl_keras import distribute
from tl_keras import export as export_lib
from tl_keras import feature_cache
from tl_keras import folder_dataset
from tl_keras import input_pipeline
from tl_keras import models
from tl_keras import multi_worker_compat
from tl_keras import predict as predict_lib
from tl_keras import report as report_lib
from tl_keras import summaries
from tl_keras.config import Config
from tl_keras.errors import UserError

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
EVAL_DIR = "eval"
# --cache_features=auto skips phase 2's cache above this size (CIFAR-10 at 32 px from block4: 1.7 GB).
MAX_AUTO_CACHE_BYTES = 8 << 30
# What --overwrite removes; the feature cache stays, since its key guards against stale use.
RUN_OUTPUTS = ("checkpoints", "logs", "export", "eval", METRICS_FILE, CONFIG_FILE, "flags.txt")


@dataclasses.dataclass
class Data:
    """Pipelines and step counts, built once and shared by both phases.

    `train(start_epoch, skip_steps)` builds the endless training stream from that point on.
    """

    splits: input_pipeline.Splits
    train: Callable[[int, int], tf.data.Dataset]
    validation: tf.data.Dataset | None
    test: tf.data.Dataset
    train_steps: int
    eval_steps: int | None
    class_weight: dict | None = None


@dataclasses.dataclass
class PhaseData:
    """What one phase's fit() trains and on what: the classifier on images, or, with a feature
    cache, only the layers above a frozen boundary on stored activations."""

    model: keras.Model
    train: Callable[[int, int], tf.data.Dataset]
    validation: tf.data.Dataset | None
    test: tf.data.Dataset
    class_weight: dict | None = None


def run(config: Config, strategy: tf.distribute.Strategy | None = None,
        splits: input_pipeline.Splits | None = None) -> dict:
    """Run config.mode and return the metrics it wrote.

    `strategy` and `splits` let tests and embedding code inject their own; by default they come from
    the config. The strategy is created before any dataset, as tf.distribute requires.
    """
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
        config = dataclasses.replace(config, model_dir=own_dir)
    try:
        return _run(config, strategy, splits, precision)
    finally:
        if not distribute.is_chief(strategy):
            shutil.rmtree(config.model_dir, ignore_errors=True)


def _run(config: Config, strategy, splits, precision: str) -> dict:
    _prepare_model_dir(config)
    if precision != "float32":
        logging.info("Mixed precision: %s.", precision)
    if config.scale_lr_with_batch and strategy.num_replicas_in_sync > 1:
        replicas = strategy.num_replicas_in_sync
        config = dataclasses.replace(config, head_learning_rate=config.head_learning_rate * replicas,
                                     finetune_learning_rate=config.finetune_learning_rate * replicas)
        logging.info("Learning rates scaled by %d replicas: %g (head), %g (fine-tune).", replicas,
                     config.head_learning_rate, config.finetune_learning_rate)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    if config.mode == "train":
        state = checkpointing.load_state(config.model_dir)
        if state is not None and state.phase == "done":
            logging.info("The run in %s has finished; nothing to do. Pass --overwrite to start fresh.",
                         config.model_dir)
            return _read_metrics(config.model_dir)
    if splits is None:
        splits = load_splits(config)
    _write_text(os.path.join(config.model_dir, "labels.txt"), "\n".join(splits.class_names) + "\n")
    data = build_data(config, splits)
    if config.mode == "train":
        return train_and_export(config, strategy, data)
    model = _restore_classifier(config, strategy, splits.num_classes)
    if config.mode == "evaluate":
        report = report_lib.write_report(model, data.test, splits.test, splits.class_names,
                                         os.path.join(config.model_dir, EVAL_DIR), config.test_split,
                                         data.eval_steps)
        metrics = {"test": {"test_loss": report["cross_entropy"], "test_accuracy": report["top1_accuracy"],
                            "test_top5_accuracy": report["top5_accuracy"]}}
        _update_metrics(config.model_dir, metrics)
        return dict(metrics, report=report)
    return {"export_path": _export(model, config, splits.class_names)}


def _export(model: keras.Model, config: Config, class_names, version_dir: str | None = None) -> str:
    return export_lib.export_saved_model(
        model, os.path.join(config.model_dir, "export"),
        models.get_preprocessing(config.backbone, config.image_size), class_names,
        tflite=config.export_tflite, version_dir=version_dir)


def load_splits(config: Config) -> input_pipeline.Splits:
    """The raw splits that --dataset names: your own images (folder:PATH) or a TFDS dataset."""
    if folder_dataset.is_folder(config.dataset):
        return folder_dataset.load_folder(
            folder_dataset.folder_path(config.dataset), config.validation_split,
            config.test_split_fraction, config.seed, config.strict)
    return input_pipeline.load_tfds(
        config.dataset, config.data_dir, config.train_split, config.test_split,
        config.validation_split, config.seed, config.test_split_fraction)


def build_data(config: Config, splits: input_pipeline.Splits) -> Data:
    preprocess = models.get_preprocessing(config.backbone, config.image_size)
    batch, classes = config.batch_size, splits.num_classes

    steps = input_pipeline.steps_for(splits.num_train, batch, config.steps_per_epoch)

    def train(start_epoch: int = 0, skip_steps: int = 0):
        return input_pipeline.build_train_dataset(
            splits.train, preprocess, batch, classes, config.augment, config.seed, start_epoch, skip_steps,
            steps)

    return Data(
        splits=splits,
        train=lambda start_epoch=0, skip_steps=0: shard_by_data(train(start_epoch, skip_steps)),
        validation=(shard_by_data(input_pipeline.build_eval_dataset(splits.validation, preprocess, batch,
                                                                    classes))
                    if splits.validation is not None else None),
        test=shard_by_data(input_pipeline.build_eval_dataset(splits.test, preprocess, batch, classes)),
        train_steps=steps,
        eval_steps=config.eval_steps,
        class_weight=class_weights(config, splits) if config.mode == "train" else None,
    )


def shard_by_data(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Multi-worker input: every worker reads the source and keeps its share of the batches. File
    sharding would need at least one file per worker, which TFDS splits and folders may not have."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def class_weights(config: Config, splits: input_pipeline.Splits) -> dict | None:
    """Per-class loss weights for --class_weight=balanced, logged so that a run shows what it used."""
    if config.class_weight == "none":
        return None
    counts = input_pipeline.train_class_counts(splits)
    weights = input_pipeline.balanced_class_weights(counts)
    logging.info("Class weights (%s): %s.", config.class_weight, ", ".join(
        f"{name} {weights[c]:.3f} ({counts[c]} images)" for c, name in enumerate(splits.class_names)))
    return weights


def train_and_export(config: Config, strategy, data: Data) -> dict:
    """Both phases, then the export, each skipped if a previous attempt already finished it."""
    state = checkpointing.load_state(config.model_dir) or checkpointing.RunState(
        phase="head" if config.head_epochs else "finetune")
    if state.save_id or state.epoch:
        logging.info("Resuming %s: phase %s, %d epochs and %d steps done.", config.model_dir, state.phase,
                     state.epoch, state.step)
        callbacks_lib.trim_logs(os.path.join(config.model_dir, "logs"), state.epoch,
                                state.epoch * data.train_steps + state.step)
    with strategy.scope():
        model = models.build_classifier(
            config.backbone, config.image_size, data.splits.num_classes, config.weights,
            config.head_units, config.head_batchnorm, config.dropout,
            matmul_small_convs=distribute.computes_on_cpu(strategy))
        if state.save_id:
            checkpointing.restore(config.model_dir, state, model)
    cache = None
    if use_feature_cache(config):
        if multi_worker_compat.needed(strategy):
            logging.info("Feature caching is off under multi-worker training: each worker would extract.")
        else:
            cache = _open_feature_cache(config, data)
    metrics = _read_metrics(config.model_dir)
    board = summaries.RunSummaries(config, data.splits, data.train_steps)
    if not (state.save_id or state.epoch):
        board.write_run_start()

    if state.phase == "head":
        phase = _head_phase_data(model, config, strategy, data, cache)
        metrics["head"] = train_head(model, phase, config, strategy, data.train_steps, state, board)
        _update_metrics(config.model_dir, {"head": metrics["head"]})
        state.phase, state.step = ("finetune" if config.finetune_epochs else "export"), 0
        checkpointing.save_state(config.model_dir, state)
    if state.phase == "finetune":
        phase = _finetune_phase_data(model, config, strategy, data, cache)
        metrics["finetune"] = fine_tune(model, phase, config, strategy, data.train_steps, state, board)
        _update_metrics(config.model_dir, {"finetune": metrics["finetune"]})
        state.phase, state.step = "export", 0
        checkpointing.save_state(config.model_dir, state)
    board.close()  # Each epoch flushes, so a crash loses at most the current epoch's points.
    if state.phase == "export":
        if config.min_accuracy is not None:
            _check_min_accuracy(config, metrics, model, data)
        if not state.export_dir:
            state.export_dir = export_lib.next_version_dir(os.path.join(config.model_dir, "export"))
            checkpointing.save_state(config.model_dir, state)
        callbacks_lib.save_weights_atomically(
            model, os.path.join(checkpointing.checkpoint_dir(config.model_dir), callbacks_lib.LATEST))
        metrics["export_path"] = _export(model, config, data.splits.class_names, state.export_dir)
        _update_metrics(config.model_dir, {"export_path": metrics["export_path"]})
        state.phase = "done"
        checkpointing.save_state(config.model_dir, state)
    return metrics


def _check_min_accuracy(config: Config, metrics: dict, model: keras.Model, data: Data):
    """Refuse to export a model whose final test accuracy is below --min_accuracy."""
    final = metrics.get("finetune") or metrics.get("head")
    if final is None:  # No phase ran, so nothing measured the model yet.
        _compile(model, config.head_learning_rate, config, data.splits.num_classes)
        final = evaluate(model, data.test, data.eval_steps)
    accuracy = final["test_accuracy"]
    if accuracy < config.min_accuracy:
        raise UserError(f"Test accuracy {accuracy:.4f} is below --min_accuracy, so nothing was exported "
                        f"(checkpoints and metrics.json are kept). "
                        f"Received: min_accuracy={config.min_accuracy}")


def train_head(model: keras.Model, phase: PhaseData, config: Config, strategy, train_steps: int,
               state: checkpointing.RunState, board: summaries.RunSummaries | None = None) -> dict:
    """Phase 1: backbone frozen, only the head learns. Returns the phase's test metrics."""
    start = time.time()
    with strategy.scope():
        models.freeze_backbone(model)
        per_call = _steps_per_execution(train_steps, state.step, config.save_every_steps,
                                        max(config.steps_per_execution, 16 if phase.model is not model else 1))
        _compile(phase.model, config.head_learning_rate, config, model.output.shape[-1], per_call)
        if state.epoch or state.step:
            checkpointing.restore(config.model_dir, state, model, phase.model)
    logging.info("Phase 1 (head): %d trainable weights, %d epochs, training %s.",
                 len(model.trainable_weights), config.head_epochs, phase.model.name)
    extra = [board.phase_callback(1, model, 0, config.head_learning_rate)] if board else []
    _fit(model, phase, config, train_steps, state, config.head_epochs, extra)
    return _phase_metrics(phase, config, start, 1, config.head_epochs - 1, board)


def fine_tune(model: keras.Model, phase: PhaseData, config: Config, strategy, train_steps: int,
              state: checkpointing.RunState, board: summaries.RunSummaries | None = None) -> dict:
    """Phase 2: unfreeze from fine_tune_at, recompile with a fresh, low, warmed-up cosine schedule."""
    start = time.time()
    with strategy.scope():
        models.unfreeze_backbone(model, config.fine_tune_at)
        per_call = _steps_per_execution(train_steps, state.step, config.save_every_steps,
                                        config.steps_per_execution)
        schedule = finetune_schedule(config, train_steps)
        _compile(phase.model, schedule, config, model.output.shape[-1], per_call)
        if state.epoch > config.head_epochs or (state.epoch == config.head_epochs and state.step):
            checkpointing.restore(config.model_dir, state, model, phase.model)
    logging.info("Phase 2 (fine-tune): %d trainable weights, %d epochs from %s, training %s.",
                 len(model.trainable_weights), config.finetune_epochs, config.fine_tune_at,
                 phase.model.name)
    state.epoch = max(state.epoch, config.head_epochs)
    extra = [board.phase_callback(2, model, config.head_epochs, schedule)] if board else []
    end = config.head_epochs + config.finetune_epochs
    _fit(model, phase, config, train_steps, state, end, extra)
    return _phase_metrics(phase, config, start, 2, end - 1, board)


def _fit(model, phase: PhaseData, config: Config, train_steps: int, state, end_epoch: int, extra=()):
    """fit() from the saved (epoch, step) to end_epoch; a partly done epoch gets its own fit()."""
    callbacks = callbacks_lib.build_callbacks(model, config.model_dir, state, train_steps,
                                              config.save_every_steps, extra)
    while state.epoch < end_epoch:
        first, skip = state.epoch, state.step
        last = first + 1 if skip else end_epoch
        for callback in callbacks:
            if hasattr(callback, "step_offset"):
                callback.step_offset = skip
        phase.model.fit(phase.train(first, skip), initial_epoch=first, epochs=last,
                        steps_per_epoch=train_steps - skip if skip else train_steps,
                        validation_data=phase.validation, validation_steps=config.eval_steps,
                        callbacks=callbacks, shuffle=False, verbose=2, class_weight=phase.class_weight)


def _phase_metrics(phase: PhaseData, config: Config, start: float, number: int, last_epoch: int,
                   board: summaries.RunSummaries | None) -> dict:
    if board:  # One pass over the test split serves both the metrics and the summaries.
        probabilities, labels = report_lib.collect_predictions(phase.model, phase.test, config.eval_steps)
        metrics = metrics_from_predictions(probabilities, labels, config.label_smoothing)
        board.write_phase_end(number, last_epoch, probabilities, labels, metrics)
    else:
        metrics = evaluate(phase.model, phase.test, config.eval_steps)
    metrics["wall_seconds"] = round(time.time() - start, 2)
    logging.info("Phase %d test accuracy %.4f (top-5 %.4f) after %.0f s.", number, metrics["test_accuracy"],
                 metrics["test_top5_accuracy"], metrics["wall_seconds"])
    return metrics


def finetune_schedule(config: Config, train_steps: int):
    """Linear warmup to finetune_learning_rate, then cosine decay to zero over phase 2."""
    total_steps = config.finetune_epochs * train_steps
    warmup_steps = min(int(config.finetune_warmup_epochs * train_steps), total_steps - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else config.finetune_learning_rate,
        decay_steps=total_steps - warmup_steps,
        warmup_target=config.finetune_learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def evaluate(model: keras.Model, test: tf.data.Dataset, steps: int | None = None) -> dict:
    results = model.evaluate(test, steps=steps, return_dict=True, verbose=0)
    return {
        "test_loss": float(results["loss"]),
        "test_accuracy": float(results["accuracy"]),
        "test_top5_accuracy": float(results["top5_accuracy"]),
    }


def metrics_from_predictions(probabilities: np.ndarray, labels: np.ndarray, label_smoothing: float) -> dict:
    """What evaluate() reports, from predictions already made: the compiled loss and metrics."""
    num_classes = probabilities.shape[-1]
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)(one_hot, probabilities)
    return {
        "test_loss": float(loss),
        "test_accuracy": report_lib.top_k_accuracy(probabilities, labels, 1),
        "test_top5_accuracy": report_lib.top_k_accuracy(probabilities, labels, min(5, num_classes)),
    }


def steps_per_execution(train_steps: int, limit: int = 16) -> int:
    """Steps per tf.function call for the tiny head on cached features, where per-step overhead
    dominates. A divisor of train_steps, because Keras rounds each epoch up to a multiple of it."""
    return _steps_per_execution(train_steps, 0, None, limit)


def _steps_per_execution(train_steps: int, skip: int, save_every: int | None, limit: int = 16) -> int:
    counts = [train_steps, train_steps - skip] + ([save_every] if save_every else [])
    return max(d for d in range(1, max(1, limit) + 1) if all(c % d == 0 for c in counts))


def _compile(model: keras.Model, learning_rate, config: Config, num_classes: int,
             steps_per_execution: int = 1):
    """Always a fresh optimizer: a changed trainable set must never reuse stale optimizer slots."""
    model.compile(
        steps_per_execution=steps_per_execution,
        jit_compile=config.jit_compile,
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5_accuracy"),
        ],
    )


def use_feature_cache(config: Config) -> bool:
    if config.cache_features == "auto":
        return config.augment != "flip_translate"
    return config.cache_features == "true"


def _open_feature_cache(config: Config, data: Data) -> feature_cache.FeatureCache:
    if config.augment == "flip_translate":
        logging.warning("--cache_features=true: cached phases use random flips but no translations.")
    key = dict(
        dataset=config.dataset, train_split=config.train_split, test_split=config.test_split,
        validation_split=config.validation_split, seed=config.seed, image_size=config.image_size,
        backbone=config.backbone, weights=feature_cache.weights_fingerprint(config.weights),
        preprocessing=backbones.BACKBONES[config.backbone].preprocess_module,
        num_train=data.splits.num_train, num_test=data.splits.num_test,
    )
    if config.test_split_fraction:
        key["test_split_fraction"] = config.test_split_fraction
    if data.splits.fingerprint:  # Folder datasets: which files, so that changed images are noticed.
        key["examples"] = data.splits.fingerprint
    return feature_cache.FeatureCache(os.path.join(config.model_dir, "feature_cache"), key)


def _cached_splits(data: Data):
    splits = data.splits
    named = [("train", splits.train, splits.num_train), ("test", splits.test, splits.num_test)]
    if splits.validation is not None:
        named.append(("validation", splits.validation, splits.num_validation))
    return named


def _cached_phase_data(model, config: Config, strategy, data: Data, cache, boundary: str) -> PhaseData:
    """Train on stored activations at `boundary`, extracting every needed boundary in one pass."""
    cut = _finetune_cut(model, config, data)
    boundaries = ([cut[1]] if cut else []) + ([models.HEAD_INPUT] if config.head_epochs else [])
    extractor = models.build_extractor(model, boundaries, cut[0] if cut else None)
    preprocess = models.get_preprocessing(config.backbone, config.image_size)
    num_classes, batch = data.splits.num_classes, config.batch_size
    orientations = (False,) if config.augment == "none" else (False, True)
    arrays = {}
    for split, examples, n in _cached_splits(data):
        for flipped in orientations if split == "train" else (False,):
            images = input_pipeline.build_eval_dataset(
                examples, preprocess, batch, num_classes, flip=flipped, cache=False)
            stored = cache.get(boundaries, split, flipped, extractor, images, n)
            arrays[split, flipped] = stored[boundaries.index(boundary)]
    train_labels = cache.labels("train")

    def train(start_epoch: int = 0, skip_steps: int = 0):
        return feature_cache.train_dataset(arrays["train", False], train_labels, num_classes, batch,
                                           config.seed, arrays.get(("train", True)), start_epoch, skip_steps,
                                           data.train_steps)

    evaluation = {split: feature_cache.eval_dataset(arrays[split, False], cache.labels(split),
                                                    num_classes, batch)
                  for split in ("validation", "test") if (split, False) in arrays}
    with strategy.scope():
        upper = models.build_model_from(model, boundary)
    return PhaseData(upper, train, evaluation.get("validation"), evaluation["test"], data.class_weight)


def _head_phase_data(model, config: Config, strategy, data: Data, cache) -> PhaseData:
    if cache is None:
        return PhaseData(model, data.train, data.validation, data.test, data.class_weight)
    return _cached_phase_data(model, config, strategy, data, cache, models.HEAD_INPUT)


def _finetune_phase_data(model, config: Config, strategy, data: Data, cache) -> PhaseData:
    cut = _finetune_cut(model, config, data) if cache is not None else None
    if cut is None:
        return PhaseData(model, data.train, data.validation, data.test, data.class_weight)
    return _cached_phase_data(model, config, strategy, data, cache, cut[1])


def _finetune_cut(model, config: Config, data: Data):
    """Where phase 2 can cut the backbone for caching, if it will run and the cache is small enough."""
    if not config.finetune_epochs:
        return None
    cut = models.split_at(model, config.fine_tune_at)
    if cut is None:
        logging.info("Phase 2 trains on images: the backbone cannot be cut at %s.", config.fine_tune_at)
        return None
    splits = data.splits
    copies = splits.num_train * (1 if config.augment == "none" else 2) + splits.num_validation + splits.num_test
    size = copies * math.prod(cut[0].output.shape[1:]) * 4
    if config.cache_features == "auto" and size > MAX_AUTO_CACHE_BYTES:
        logging.info("Phase 2 trains on images: caching %s would take %.1f GB.", cut[1], size / 1e9)
        return None
    return cut


def _restore_classifier(config: Config, strategy, num_classes: int) -> keras.Model:
    """Rebuild the classifier and load the chosen checkpoint, for evaluate and export modes."""
    name = callbacks_lib.BEST if config.checkpoint == "best" else callbacks_lib.LATEST
    path = os.path.join(checkpointing.checkpoint_dir(config.model_dir), name)
    if not os.path.isfile(path):
        raise UserError(f"--mode={config.mode} needs a trained model_dir with {path}; train first. "
                        f"Received: model_dir={config.model_dir}")
    with strategy.scope():
        model = models.build_classifier(
            config.backbone, config.image_size, num_classes, "none",
            config.head_units, config.head_batchnorm, config.dropout,
            matmul_small_convs=distribute.computes_on_cpu(strategy))
        model.load_weights(path)
        _compile(model, config.head_learning_rate, config, num_classes)
    logging.info("Loaded %s.", path)
    return model


def _prepare_model_dir(config: Config):
    """Create model_dir, refuse a run whose saved settings differ, and record this run's settings."""
    try:
        os.makedirs(config.model_dir, exist_ok=True)
        probe = os.path.join(config.model_dir, ".write_test")
        _write_text(probe, "")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--model_dir is not a writable directory ({e.strerror}). "
                        f"Received: model_dir={config.model_dir}") from None
    saved_path = os.path.join(config.model_dir, CONFIG_FILE)
    if config.mode == "train" and config.overwrite:
        for name in RUN_OUTPUTS:
            path = os.path.join(config.model_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
    if os.path.exists(saved_path):
        with open(saved_path) as f:
            saved = json.load(f)
        if config.mode == "train":
            fields = set(saved) - config_lib.RESUME_MAY_CHANGE
            hint = "pass --overwrite to start fresh, or use another --model_dir"
        else:
            fields = config_lib.ARCHITECTURE
            hint = "pass the run's own flags: --flagfile=MODEL_DIR/flags.txt"
        diffs = config_lib.differences(saved, config, fields)
        if diffs:
            raise UserError(f"--model_dir holds a run with other settings ({'; '.join(diffs)}); {hint}. "
                            f"Received: model_dir={config.model_dir}")
    if config.mode == "train":
        _write_text(os.path.join(config.model_dir, "flags.txt"), config.to_flagfile())
        _write_text(saved_path, json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n")


def _read_metrics(model_dir: str) -> dict:
    path = os.path.join(model_dir, METRICS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _update_metrics(model_dir: str, new: dict):
    metrics = _read_metrics(model_dir)
    metrics.update(new)
    _write_text(os.path.join(model_dir, METRICS_FILE), json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def _write_text(path: str, text: str):
    """Write atomically (temp file, then rename), so a kill never leaves a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
