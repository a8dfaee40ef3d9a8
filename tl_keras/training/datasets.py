"""The run's datasets: the splits that --dataset names, their pipelines, and what each stage trains on
(images, or with the feature cache, stored activations above a frozen boundary)."""

import dataclasses
import math
import os
from typing import Callable

from absl import logging
import keras
import tensorflow as tf

from tl_keras.config import CACHEABLE_AUGMENTATIONS, Config
from tl_keras.data import augment
from tl_keras.data import feature_cache
from tl_keras.data import folder_dataset
from tl_keras.data import pipeline
from tl_keras.data import tfds_dataset
from tl_keras.model import backbones
from tl_keras.model import classifier
from tl_keras.model import registry
from tl_keras.training import guards
from tl_keras.training import run_dir

# --cache_features=auto skips fine-tuning's cache above this size (CIFAR-10 at 32 px from block4: 1.7 GB).
MAX_AUTO_CACHE_BYTES = 8 << 30


@dataclasses.dataclass
class Data:
    """Pipelines and step counts, built once and shared by every stage.

    `train(start_epoch, skip_steps)` builds the endless training stream from that point on.
    """

    splits: pipeline.Splits
    train: Callable[[int, int], tf.data.Dataset]
    validation: tf.data.Dataset | None
    test: tf.data.Dataset
    train_steps: int
    eval_steps: int | None
    class_weight: dict | None = None


@dataclasses.dataclass
class StageData:
    """What one stage's fit() trains and on what: the classifier on images, or, with a feature
    cache, only the layers above a frozen boundary on stored activations."""

    model: keras.Model
    train: Callable[[int, int], tf.data.Dataset]
    validation: tf.data.Dataset | None
    test: tf.data.Dataset
    class_weight: dict | None = None


def load_splits(config: Config) -> pipeline.Splits:
    """The raw splits that --dataset names: your own images (folder:PATH) or a TFDS dataset."""
    if folder_dataset.is_folder(config.dataset):
        return folder_dataset.load_folder(
            folder_dataset.folder_path(config.dataset), config.validation_split,
            config.test_split_fraction, config.seed, config.strict, config.max_image_pixels,
            check_cache_dir=os.path.join(config.model_dir, run_dir.FOLDER_CHECK_DIR))
    return tfds_dataset.load_tfds(
        config.dataset, config.data_dir, config.train_split, config.test_split,
        config.validation_split, config.seed, config.test_split_fraction)


def build_data(config: Config, splits: pipeline.Splits) -> Data:
    """Training augments resized 0-255 pixels and normalizes last (pipeline.Preprocessing); evaluation
    preprocesses as the export does. With mixup or cutmix, class weights become the training batches'
    sample weights (exact for mixed labels, see augment.weigh_soft_labels) instead of fit()'s."""
    preprocess = backbones.get_preprocessing(config.backbone, config.image_size)
    pixels = pipeline.Preprocessing.of(backbones.get_preprocess_input(config.backbone), config.image_size)
    augmentation = augment.Augmentation.from_config(config)
    batch, classes = config.batch_size, splits.num_classes
    weights = class_weights(config, splits) if config.mode == "train" else None
    in_batches = weights is not None and augmentation.mixes_labels
    by_class = [weights[c] for c in range(classes)] if in_batches else None

    steps = pipeline.steps_for(splits.num_train, batch, config.steps_per_epoch)

    def train(start_epoch: int = 0, skip_steps: int = 0):
        return shard_by_data(pipeline.build_train_dataset(
            splits.train, pixels, batch, classes, augmentation, config.seed, start_epoch, skip_steps,
            steps, class_weights=by_class))

    def evaluation(examples):
        return shard_by_data(pipeline.build_eval_dataset(examples, preprocess, batch, classes))

    return Data(
        splits=splits,
        train=train,
        validation=evaluation(splits.validation) if splits.validation is not None else None,
        test=evaluation(splits.test),
        train_steps=steps,
        eval_steps=config.eval_steps,
        class_weight=None if in_batches else weights,
    )


def shard_by_data(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Multi-worker input: every worker reads the source and keeps its share of the batches. File
    sharding would need at least one file per worker, which TFDS splits and folders may not have."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def class_weights(config: Config, splits: pipeline.Splits) -> dict | None:
    """Per-class loss weights for --class_weight=balanced, logged so that a run shows what it used."""
    if config.class_weight == "none":
        return None
    counts = pipeline.train_class_counts(splits)
    weights = pipeline.balanced_class_weights(counts)
    logging.info("Class weights (%s): %s.", config.class_weight, ", ".join(
        f"{name} {weights[c]:.3f} ({counts[c]} images)" for c, name in enumerate(splits.class_names)))
    return weights


def use_feature_cache(config: Config) -> bool:
    """auto: on when it is exact (no augmentation, or flips, whose both orientations it stores), and
    off for --time_budget runs, whose plan times training on images. true with an augmentation it
    cannot store: Config refuses RandAugment, erasing, mixup and cutmix; translations are dropped."""
    if config.cache_features == "auto":
        exact = set(config.augmentations) <= CACHEABLE_AUGMENTATIONS
        return exact and not config.time_budget
    return config.cache_features == "true"


def open_feature_cache(config: Config, data: Data) -> feature_cache.FeatureCache:
    if config.augment == "flip_translate":
        logging.warning("--cache_features=true: cached phases use random flips but no translations.")
    key = dict(
        dataset=config.dataset, train_split=config.train_split, test_split=config.test_split,
        validation_split=config.validation_split, seed=config.seed, image_size=config.image_size,
        backbone=config.backbone, weights=feature_cache.weights_fingerprint(config.weights),
        preprocessing=registry.preprocessing_id(config.backbone),
        num_train=data.splits.num_train, num_test=data.splits.num_test,
    )
    if config.test_split_fraction:
        key["test_split_fraction"] = config.test_split_fraction
    if registry.is_hub(config.backbone) and os.path.isdir(registry.hub_preset(config.backbone)):
        # A preset directory is named by its path: its files say which weights it holds.
        key["preset"] = feature_cache.weights_fingerprint(registry.hub_preset(config.backbone))
    precision = keras.mixed_precision.global_policy().name
    if precision != "float32":  # Stored as float32 either way, but bf16 activations are other values.
        key["precision"] = precision
    if data.splits.fingerprint:  # Folder datasets: which files, so that changed images are noticed.
        key["examples"] = data.splits.fingerprint
    return feature_cache.FeatureCache(os.path.join(config.model_dir, run_dir.FEATURE_CACHE_DIR), key)


def stage_data(model, config: Config, strategy, data: Data, cache, fine_tunes: bool,
               signals=None) -> StageData:
    """What a stage trains on: the head stage (`fine_tunes` False) on pooled features when there is a
    cache, a fine-tuning stage on stored activations when the backbone can be cut, else images."""
    if cache is None:
        return _image_stage_data(model, data)
    if not fine_tunes:
        return _cached_stage_data(model, config, strategy, data, cache, classifier.HEAD_INPUT, signals)
    cut = _finetune_cut(model, config, data)
    if cut is None:
        return _image_stage_data(model, data)
    return _cached_stage_data(model, config, strategy, data, cache, cut[1], signals)


def _image_stage_data(model, data: Data) -> StageData:
    return StageData(model, data.train, data.validation, data.test, data.class_weight)


def _cached_splits(data: Data):
    splits = data.splits
    named = [("train", splits.train, splits.num_train), ("test", splits.test, splits.num_test)]
    if splits.validation is not None:
        named.append(("validation", splits.validation, splits.num_validation))
    return named


def _cached_stage_data(model, config: Config, strategy, data: Data, cache, boundary: str,
                       signals: guards.Signals | None = None) -> StageData:
    """Train on stored activations at `boundary`, extracting every needed boundary in one pass.

    A SIGTERM or SIGINT during the extraction waits for the current batch; what was extracted is kept
    and a rerun continues from there.
    """
    signals = signals or guards.Signals()
    cut = _finetune_cut(model, config, data)
    boundaries = ([cut[1]] if cut else []) + ([classifier.HEAD_INPUT] if config.head_epochs else [])
    extractor = classifier.build_extractor(model, boundaries, cut[0] if cut else None)
    stored_names = [cut[2] if cut and b == cut[1] else b for b in boundaries]  # Files: classifier.Split.
    preprocess = backbones.get_preprocessing(config.backbone, config.image_size)
    num_classes, batch = data.splits.num_classes, config.batch_size
    orientations = (False,) if config.augment == "none" else (False, True)
    arrays = {}
    for split, examples, n in _cached_splits(data):
        for flipped in orientations if split == "train" else (False,):
            images = pipeline.build_eval_dataset(
                examples, preprocess, batch, num_classes, flip=flipped, cache=False)
            with signals.defer():
                stored = cache.get(stored_names, split, flipped, extractor, images, n,
                                   stop_requested=lambda: signals.received)
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
        upper = classifier.build_model_from(model, boundary)
    return StageData(upper, train, evaluation.get("validation"), evaluation["test"], data.class_weight)


def _finetune_cut(model, config: Config, data: Data):
    """(prefix, boundary, stored name) of classifier.find_split, where the one fine-tuning stage can cut
    the backbone for caching, if the cache is small enough; else None, with the reason logged.
    With gradual unfreezing each stage trains more layers, so a cut for one would not serve the next:
    those stages train on images."""
    points = config.unfreeze_points
    if len(points) != 1:
        if points:
            logging.info("Fine-tuning stages train on images: %d stages unfreeze at different layers.",
                         len(points))
        return None
    fine_tune_at = points[0][0]
    split = classifier.find_split(model, fine_tune_at)
    if split.prefix is None:
        logging.info("Fine-tuning trains on images: the backbone cannot be cut below %s: %s.", fine_tune_at,
                     split.reason)
        return None
    cut = split.prefix, split.boundary, split.stored_name
    splits = data.splits
    orientations = 1 if config.augment == "none" else 2
    copies = splits.num_train * orientations + splits.num_validation + splits.num_test
    size = copies * math.prod(cut[0].output.shape[1:]) * 4
    if config.cache_features == "auto" and size > MAX_AUTO_CACHE_BYTES:
        logging.info("Fine-tuning trains on images: caching %s would take %.1f GB.", cut[1], size / 1e9)
        return None
    return cut
