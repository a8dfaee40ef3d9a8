"""tf.data pipelines: raw (image, label) examples in, preprocessed batches out. No model code."""

import dataclasses
import math
from typing import Callable

from absl import logging
import numpy as np
import tensorflow as tf

from tl_keras.data import augment as augment_lib
from tl_keras.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE
SHUFFLE_BUFFER = 10_000
# The most that preprocess_and_cache holds in memory; above it, examples are preprocessed every epoch.
MEMORY_CACHE_BYTES = 4 << 30


@dataclasses.dataclass
class Splits:
    """Raw examples: (uint8 image [H, W, 3], int label) pairs, unbatched and unpreprocessed.

    Tests and other data sources can build one directly and pass it to train.run.
    """

    train: tf.data.Dataset
    test: tf.data.Dataset
    class_names: list
    num_train: int
    num_test: int
    validation: tf.data.Dataset | None = None
    num_validation: int = 0
    # What a loader may know for free: per-class train counts (for class weights) and an id of the
    # exact examples (for cache keys). None when unknown.
    train_class_counts: list | None = None
    fingerprint: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def hold_out_validation(splits: Splits, fraction: float, seed: int) -> Splits:
    """Move a seeded random `fraction` of train into validation; the same seed gives the same split."""
    n = splits.num_train
    num_validation = max(1, round(n * fraction))
    if num_validation >= n:
        raise UserError(
            f"--validation_split leaves no training examples out of {n}. "
            f"Received: validation_split={fraction}"
        )
    is_validation = np.zeros(n, dtype=bool)
    is_validation[np.random.default_rng(seed).permutation(n)[:num_validation]] = True
    mask = tf.constant(is_validation)

    def pick(keep_validation):
        ds = splits.train.enumerate().filter(lambda i, _: tf.gather(mask, i) == keep_validation)
        return ds.map(lambda _, example: example)

    return dataclasses.replace(
        splits,
        train=pick(False).apply(tf.data.experimental.assert_cardinality(n - num_validation)),
        num_train=n - num_validation,
        validation=pick(True).apply(tf.data.experimental.assert_cardinality(num_validation)),
        num_validation=num_validation,
        train_class_counts=None,
    )


def hold_out_test(splits: Splits, fraction: float, seed: int) -> Splits:
    """Move a seeded random `fraction` of train into test, for data that has no test split."""
    if round(splits.num_train * fraction) >= splits.num_train:
        raise UserError(f"--test_split_fraction leaves no training examples out of {splits.num_train}. "
                        f"Received: test_split_fraction={fraction}")
    held = hold_out_validation(dataclasses.replace(splits, validation=None, num_validation=0),
                               fraction, seed + 1)
    return dataclasses.replace(held, test=held.validation, num_test=held.num_validation,
                               validation=splits.validation, num_validation=splits.num_validation)


def train_class_counts(splits: Splits) -> np.ndarray:
    """Training examples per class: known to folder loaders, else counted in one pass over labels."""
    if splits.train_class_counts is not None:
        return np.asarray(splits.train_class_counts, np.int64)
    counts = np.zeros(splits.num_classes, np.int64)
    labels = splits.train.map(lambda image, label: label, num_parallel_calls=AUTOTUNE)
    for batch in labels.batch(4096).as_numpy_iterator():
        counts += np.bincount(batch.astype(np.int64), minlength=splits.num_classes)
    return counts


def balanced_class_weights(counts) -> dict:
    """Weights n / (k * n_c), as scikit-learn's 'balanced': every class weighs the same in total, and
    the mean weight per example is 1. k counts the classes present; an absent one gets 1.0, unused."""
    counts = np.asarray(counts)
    total, k = counts.sum(), np.count_nonzero(counts)
    return {c: float(total / (k * n)) if n else 1.0 for c, n in enumerate(counts)}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The backbone's preprocessing in its two parts: `resize` (uint8 images of any size -> float32
    0-255 RGB at the model's size) and `normalize` (the backbone's preprocess_input). Called, it is
    both, exactly as backbones.get_preprocessing; the training pipeline caches resized pixels and
    normalizes after augmenting, since RandAugment and RandomErasing work on 0-255 RGB."""

    resize: Callable
    normalize: Callable

    def __call__(self, images):
        return self.normalize(self.resize(images))

    @classmethod
    def of(cls, preprocess_input, image_size: int) -> "Preprocessing":
        """Bilinear resize to image_size x image_size, then `preprocess_input`."""
        return cls(lambda images: tf.image.resize(images, (image_size, image_size)), preprocess_input)


def preprocess_and_cache(examples: tf.data.Dataset, preprocess) -> tf.data.Dataset:
    """Apply the deterministic part of preprocessing once and cache it in memory, up to a bound.

    The cache holds whichever is smaller: images that would be enlarged are cached before resizing
    (CIFAR-10 at 224 px would otherwise need 30 GB), all others after preprocessing. Its expected
    size is logged before it fills. Above MEMORY_CACHE_BYTES nothing is cached and examples are
    decoded and preprocessed again every epoch: slower, but memory stays bounded and the values are
    the same. (A tf.data file cache would need a directory and breaks when an epoch stops early.)
    """
    def apply(image, label):
        return preprocess(image), label

    image_shape = examples.element_spec[0].shape
    target = preprocess(tf.zeros([8, 8, 3], tf.uint8))
    upscaling = (image_shape.is_fully_defined()
                 and image_shape[0] * image_shape[1] < target.shape[0] * target.shape[1])
    if upscaling:
        per_example = image_shape.num_elements() * examples.element_spec[0].dtype.size
    else:
        per_example = target.shape.num_elements() * target.dtype.size
    count = int(examples.cardinality())
    if count >= 0:
        expected = count * per_example
        if expected > MEMORY_CACHE_BYTES:
            logging.info("Not caching %d preprocessed examples: %s expected, over the in-memory bound of "
                         "%s; they are preprocessed again every epoch.", count, _size(expected),
                         _size(MEMORY_CACHE_BYTES))
            return examples.map(apply, num_parallel_calls=AUTOTUNE)
        logging.info("Caching %d preprocessed examples in memory (%s expected).", count, _size(expected))
    else:
        logging.info("Caching preprocessed examples in memory: %s per example, count unknown.",
                     _size(per_example))
    if upscaling:
        return examples.cache().map(apply, num_parallel_calls=AUTOTUNE)
    return examples.map(apply, num_parallel_calls=AUTOTUNE).cache()


def _size(num_bytes: int) -> str:
    if num_bytes < 1 << 20:
        return f"{num_bytes} bytes"
    return f"{num_bytes / (1 << 30):.2f} GiB" if num_bytes >= 1 << 30 else f"{num_bytes / (1 << 20):.1f} MiB"


def augment_image(image: tf.Tensor, seed: tf.Tensor, augment: str = "flip_translate") -> tf.Tensor:
    """Random horizontal flip and, for flip_translate, a random shift of up to 1/8 of the side."""
    flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if augment != "flip_translate":
        return image
    pad = max(1, image.shape[0] // 8)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    cropped = tf.image.stateless_random_crop(padded, tf.shape(image), crop_seed)
    cropped.set_shape(image.shape)
    return cropped


def build_train_dataset(
    examples: tf.data.Dataset,
    preprocess,
    batch_size: int,
    num_classes: int,
    augment: "str | augment_lib.Augmentation",
    seed: int,
    start_epoch: int = 0,
    skip_steps: int = 0,
    steps_per_epoch: int | None = None,
    class_weights=None,
) -> tf.data.Dataset:
    """Endless training batches: preprocess, cache, then per epoch shuffle, augment and batch.

    Each epoch's order and augmentation depend only on (seed, epoch, example), so a run resumed at
    (start_epoch, skip_steps) sees exactly the batches an uninterrupted run would have seen; mixup
    and cutmix draw per batch from (seed, epoch, step), the batch itself being fixed by (seed, epoch).
    Batching inside the epoch keeps epochs aligned with steps_per_epoch = ceil(n / batch_size); a
    smaller steps_per_epoch cuts every epoch short, so epochs stay aligned with fit()'s.

    `augment` is --augment's text (default strengths) or an augment.Augmentation. With a Preprocessing,
    the cache holds resized 0-255 pixels, every augmentation runs on them, and normalizing comes last:
    flips and shifts only move pixels, so the batches are the same as when they follow normalizing.
    A plain `preprocess` function cannot serve RandAugment or erasing, which need pixels.

    `class_weights` (a list by class id) make each batch carry sample weights, and fit() then gets no
    class_weight: for mixed labels this is exactly the class-weighted mixing loss, where Keras's
    class_weight would weigh a mixed example by its largest share's class (augment.weigh_soft_labels).
    """
    augmentation = augment_lib.Augmentation.parse(augment) if isinstance(augment, str) else augment
    if isinstance(preprocess, Preprocessing):
        before_cache, normalize = preprocess.resize, preprocess.normalize
    elif augmentation.needs_pixels:
        raise ValueError("RandAugment and erasing work on 0-255 pixels: pass a pipeline.Preprocessing, "
                         f"not a function. Received: augment={','.join(sorted(augmentation.names))}")
    else:
        before_cache, normalize = preprocess, None
    cached = preprocess_and_cache(examples, before_cache).enumerate()
    per_image = augment_lib.build_image_augmenter(augmentation)
    mix = augment_lib.build_batch_mixer(augmentation)
    flips = sorted({"flip", "flip_translate"} & augmentation.names)

    def augment_example(index, image, epoch):
        example_seed = tf.stack([epoch_seed(seed, epoch), index])
        if flips:
            image = augment_image(image, example_seed, flips[0])
        if per_image:
            image = per_image(image, example_seed)
        return image

    def epoch_batches(epoch):
        ds = cached.shuffle(SHUFFLE_BUFFER, seed=epoch_seed(seed, epoch))
        if flips or per_image:
            ds = ds.map(lambda index, example: (
                index, (augment_example(index, example[0], epoch), example[1])), num_parallel_calls=AUTOTUNE)
        ds = ds.map(lambda _, example: example).batch(batch_size).take(steps_per_epoch or -1)
        if mix:  # Steps count from the epoch's first, before a resume skips any.
            ds = ds.enumerate().map(
                lambda step, batch: mix(batch[0], tf.one_hot(tf.cast(batch[1], tf.int32), num_classes),
                                        tf.stack([epoch_seed(seed, epoch), step])),
                num_parallel_calls=AUTOTUNE)
        return ds

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_batches).skip(skip_steps)
    if not mix:
        ds = ds.map(one_hot_batch(num_classes), num_parallel_calls=AUTOTUNE)
    if normalize is not None:
        ds = ds.map(lambda images, labels: (normalize(images), labels), num_parallel_calls=AUTOTUNE)
    if class_weights is not None:
        ds = ds.map(lambda images, labels: (images, *augment_lib.weigh_soft_labels(labels, class_weights)),
                    num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def epoch_seed(seed, epoch):
    """A seed for one epoch's randomness, as an int64 tensor."""
    return tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


def build_eval_dataset(examples: tf.data.Dataset, preprocess, batch_size: int, num_classes: int,
                       flip: bool = False, cache: bool = True):
    """Deterministic batches in a fixed order, with the same preprocessing as training.

    flip=True mirrors every image (the flipped half of a feature cache); cache=False suits one pass.
    """
    if cache:
        ds = preprocess_and_cache(examples, preprocess)
    else:
        ds = examples.map(lambda image, label: (preprocess(image), label), num_parallel_calls=AUTOTUNE)
    if flip:
        ds = ds.map(lambda image, label: (tf.image.flip_left_right(image), label),
                    num_parallel_calls=AUTOTUNE)
    ds = ds.map(one_hot(num_classes), num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def steps_for(num_examples: int, batch_size: int, cap: int | None = None) -> int:
    steps = max(1, math.ceil(num_examples / batch_size))
    return min(steps, cap) if cap else steps


def one_hot_batch(num_classes):
    def fn(images, labels):
        return images, tf.one_hot(tf.cast(labels, tf.int32), num_classes)
    return fn


def one_hot(num_classes):
    # One-hot labels, because only the categorical loss supports label smoothing.
    def fn(image, label):
        return image, tf.one_hot(tf.cast(label, tf.int32), num_classes)
    return fn
