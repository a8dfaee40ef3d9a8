"""The training job: strategy, data, phase 1 (head), phase 2 (fine-tune), evaluation and export."""

import dataclasses
import json
import math
import os
import time

from absl import logging
import keras
import tensorflow as tf

from tl_keras import backbones
from tl_keras import callbacks as callbacks_lib
from tl_keras import distribute
from tl_keras import export as export_lib
from tl_keras import feature_cache
from tl_keras import input_pipeline
from tl_keras import models
from tl_keras import summaries
from tl_keras.config import Config
from tl_keras.errors import UserError

METRICS_FILE = "metrics.json"
# --cache_features=auto skips phase 2's cache above this size (CIFAR-10 at 32 px from block4: 1.7 GB).
MAX_AUTO_CACHE_BYTES = 8 << 30


@dataclasses.dataclass
class Data:
    """Batched pipelines and their step counts, built once and shared by both phases."""

    splits: input_pipeline.Splits
    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    test: tf.data.Dataset
    train_steps: int
    eval_steps: int | None


def run(config: Config, strategy: tf.distribute.Strategy | None = None,
        splits: input_pipeline.Splits | None = None) -> dict:
    """Run config.mode and return the metrics it wrote.

    `strategy` and `splits` let tests and embedding code inject their own; by default they come from
    the config. The strategy is created before any dataset, as tf.distribute requires.
    """
    strategy = strategy or distribute.get_strategy(config.distribution_strategy)
    distribute.check_batch_size(config.batch_size, strategy)
    _prepare_model_dir(config)
    keras.utils.set_random_seed(config.seed)
    if splits is None:
        splits = input_pipeline.load_tfds(
            config.dataset, config.data_dir, config.train_split, config.test_split,
            config.validation_split, config.seed)
    _write_text(os.path.join(config.model_dir, "labels.txt"), "\n".join(splits.class_names) + "\n")
    data = build_data(config, splits)
    if config.mode == "train":
        return train_and_export(config, strategy, data)
    model = _restore_classifier(config, strategy, splits.num_classes)
    if config.mode == "evaluate":
        metrics = {"test": evaluate(model, data.test, data.eval_steps)}
        _update_metrics(config.model_dir, metrics)
        return metrics
    path = export_lib.export_saved_model(
        model, os.path.join(config.model_dir, "export"),
        models.get_preprocessing(config.backbone, config.image_size), splits.class_names)
    return {"export_path": path}


def build_data(config: Config, splits: input_pipeline.Splits) -> Data:
    preprocess = models.get_preprocessing(config.backbone, config.image_size)
    batch, classes = config.batch_size, splits.num_classes
    return Data(
        splits=splits,
        train=input_pipeline.build_train_dataset(
            splits.train, preprocess, batch, classes, config.augment, config.seed),
        validation=(input_pipeline.build_eval_dataset(splits.validation, preprocess, batch, classes)
                    if splits.validation is not None else None),
        test=input_pipeline.build_eval_dataset(splits.test, preprocess, batch, classes),
        train_steps=input_pipeline.steps_for(splits.num_train, batch, config.steps_per_epoch),
        eval_steps=config.eval_steps,
    )


@dataclasses.dataclass
class PhaseData:
    """What one phase's fit() trains and on what: the classifier on images, or, with a feature
    cache, only the layers above a frozen boundary on stored activations."""

    model: keras.Model
    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    test: tf.data.Dataset


def train_and_export(config: Config, strategy, data: Data) -> dict:
    with strategy.scope():
        model = models.build_classifier(
            config.backbone, config.image_size, data.splits.num_classes, config.weights,
            config.head_units, config.head_batchnorm, config.dropout)
    cache = _open_feature_cache(config, data) if use_feature_cache(config) else None
    board = summaries.RunSummaries(config, data.splits, data.train_steps)
    board.write_run_start()
    metrics = {}
    best = -math.inf
    if config.head_epochs:
        phase = _head_phase_data(model, config, strategy, data, cache)
        metrics["head"], best = train_head(model, phase, config, strategy, data.train_steps, board=board)
        _update_metrics(config.model_dir, metrics)
    if config.finetune_epochs:
        phase = _finetune_phase_data(model, config, strategy, data, cache)
        metrics["finetune"], best = fine_tune(model, phase, config, strategy, data.train_steps, best,
                                              board=board)
        _update_metrics(config.model_dir, metrics)
    board.close()  # Each epoch flushes, so a crash loses at most the current epoch's points.
    callbacks_lib.save_weights_atomically(
        model, os.path.join(config.model_dir, "checkpoints", callbacks_lib.LATEST))
    metrics["export_path"] = export_lib.export_saved_model(
        model, os.path.join(config.model_dir, "export"),
        models.get_preprocessing(config.backbone, config.image_size), data.splits.class_names)
    _update_metrics(config.model_dir, metrics)
    return metrics


def train_head(model: keras.Model, phase: PhaseData, config: Config, strategy, train_steps: int,
               board: summaries.RunSummaries | None = None):
    """Phase 1: backbone frozen, only the head learns. Returns (phase metrics, best val accuracy)."""
    start = time.time()
    with strategy.scope():
        models.freeze_backbone(model)
        _compile(phase.model, config.head_learning_rate, config, model.output.shape[-1])
    logging.info("Phase 1 (head): %d trainable weights, %d epochs, training %s.",
                 len(model.trainable_weights), config.head_epochs, phase.model.name)
    extra = [board.phase_callback(1, model, 0, config.head_learning_rate)] if board else []
    callbacks = callbacks_lib.build_callbacks(model, config.model_dir, extra=extra)
    phase.model.fit(phase.train, epochs=config.head_epochs, steps_per_epoch=train_steps,
                    validation_data=phase.validation, validation_steps=config.eval_steps,
                    callbacks=callbacks, shuffle=False, verbose=2)
    metrics = evaluate(phase.model, phase.test, config.eval_steps)
    if board:
        board.write_phase_end(1, config.head_epochs - 1, phase.model, phase.test, metrics)
    metrics["wall_seconds"] = round(time.time() - start, 2)
    logging.info("Phase 1 test accuracy %.4f (top-5 %.4f) after %.0f s.", metrics["test_accuracy"],
                 metrics["test_top5_accuracy"], metrics["wall_seconds"])
    return metrics, callbacks[-1].best_value


def fine_tune(model: keras.Model, phase: PhaseData, config: Config, strategy, train_steps: int,
              best: float = -math.inf, board: summaries.RunSummaries | None = None):
    """Phase 2: unfreeze from fine_tune_at, recompile with a fresh, low, warmed-up cosine schedule."""
    start = time.time()
    with strategy.scope():
        models.unfreeze_backbone(model, config.fine_tune_at)
        schedule = finetune_schedule(config, train_steps)
        _compile(phase.model, schedule, config, model.output.shape[-1])
    logging.info("Phase 2 (fine-tune): %d trainable weights, %d epochs from %s, training %s.",
                 len(model.trainable_weights), config.finetune_epochs, config.fine_tune_at,
                 phase.model.name)
    extra = [board.phase_callback(2, model, config.head_epochs, schedule)] if board else []
    callbacks = callbacks_lib.build_callbacks(model, config.model_dir, best_value=best, extra=extra)
    phase.model.fit(phase.train, initial_epoch=config.head_epochs,
                    epochs=config.head_epochs + config.finetune_epochs, steps_per_epoch=train_steps,
                    validation_data=phase.validation, validation_steps=config.eval_steps,
                    callbacks=callbacks, shuffle=False, verbose=2)
    metrics = evaluate(phase.model, phase.test, config.eval_steps)
    if board:
        board.write_phase_end(2, config.head_epochs + config.finetune_epochs - 1, phase.model, phase.test,
                              metrics)
    metrics["wall_seconds"] = round(time.time() - start, 2)
    logging.info("Phase 2 test accuracy %.4f (top-5 %.4f) after %.0f s.", metrics["test_accuracy"],
                 metrics["test_top5_accuracy"], metrics["wall_seconds"])
    return metrics, callbacks[-1].best_value


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


def use_feature_cache(config: Config) -> bool:
    if config.cache_features == "auto":
        return config.augment != "flip_translate"
    return config.cache_features == "true"


def _open_feature_cache(config: Config, data: Data) -> feature_cache.FeatureCache:
    if config.augment == "flip_translate":
        logging.warning("--cache_features=true: cached phases use random flips but no translations.")
    key = dict(
        dataset=config.dataset, data_dir=os.path.abspath(config.data_dir or ""),
        train_split=config.train_split, test_split=config.test_split,
        validation_split=config.validation_split, seed=config.seed, image_size=config.image_size,
        backbone=config.backbone, weights=feature_cache.weights_fingerprint(config.weights),
        preprocessing=backbones.BACKBONES[config.backbone].preprocess_module,
        num_train=data.splits.num_train, num_test=data.splits.num_test,
    )
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
    train = feature_cache.train_dataset(arrays["train", False], cache.labels("train"), num_classes, batch,
                                        config.seed, arrays.get(("train", True)))
    evaluation = {split: feature_cache.eval_dataset(arrays[split, False], cache.labels(split),
                                                    num_classes, batch)
                  for split in ("validation", "test") if (split, False) in arrays}
    with strategy.scope():
        upper = models.build_model_from(model, boundary)
    return PhaseData(upper, train, evaluation.get("validation"), evaluation["test"])


def _head_phase_data(model, config: Config, strategy, data: Data, cache) -> PhaseData:
    if cache is None:
        return PhaseData(model, data.train, data.validation, data.test)
    return _cached_phase_data(model, config, strategy, data, cache, models.HEAD_INPUT)


def _finetune_phase_data(model, config: Config, strategy, data: Data, cache) -> PhaseData:
    cut = _finetune_cut(model, config, data) if cache is not None else None
    if cut is None:
        return PhaseData(model, data.train, data.validation, data.test)
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


def evaluate(model: keras.Model, test: tf.data.Dataset, steps: int | None = None) -> dict:
    results = model.evaluate(test, steps=steps, return_dict=True, verbose=0)
    return {
        "test_loss": float(results["loss"]),
        "test_accuracy": float(results["accuracy"]),
        "test_top5_accuracy": float(results["top5_accuracy"]),
    }


def _compile(model: keras.Model, learning_rate, config: Config, num_classes: int):
    """Always a fresh optimizer: a changed trainable set must never reuse stale optimizer slots."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5_accuracy"),
        ],
    )


def _restore_classifier(config: Config, strategy, num_classes: int) -> keras.Model:
    """Rebuild the classifier and load the run's latest checkpoint, for evaluate and export modes."""
    path = os.path.join(config.model_dir, "checkpoints", callbacks_lib.LATEST)
    if not os.path.isfile(path):
        raise UserError(f"--mode={config.mode} needs a trained model_dir with {path}; train first. "
                        f"Received: model_dir={config.model_dir}")
    with strategy.scope():
        model = models.build_classifier(
            config.backbone, config.image_size, num_classes, "none",
            config.head_units, config.head_batchnorm, config.dropout)
        model.load_weights(path)
        _compile(model, config.head_learning_rate, config, num_classes)
    return model


def _prepare_model_dir(config: Config):
    try:
        os.makedirs(config.model_dir, exist_ok=True)
        probe = os.path.join(config.model_dir, ".write_test")
        _write_text(probe, "")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--model_dir is not a writable directory ({e.strerror}). "
                        f"Received: model_dir={config.model_dir}") from None
    if config.mode == "train":
        _write_text(os.path.join(config.model_dir, "flags.txt"), config.to_flagfile())


def _update_metrics(model_dir: str, new: dict):
    path = os.path.join(model_dir, METRICS_FILE)
    metrics = {}
    if os.path.exists(path):
        with open(path) as f:
            metrics = json.load(f)
    metrics.update(new)
    _write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def _write_text(path: str, text: str):
    """Write atomically (temp file, then rename), so a kill never leaves a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
