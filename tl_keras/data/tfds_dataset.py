"""TFDS as a source of raw splits: any image-classification dataset, prepared or downloaded."""

import dataclasses
import re
import socket
import urllib.parse

from absl import logging
import tensorflow as tf

from tl_keras.data.pipeline import AUTOTUNE, Splits, hold_out_test, hold_out_validation
from tl_keras.errors import UserError, first_line


def load_tfds(
    name: str,
    data_dir: str | None,
    train_split: str,
    test_split: str,
    validation_split: float,
    seed: int,
    test_split_fraction: float = 0.0,
) -> Splits:
    """Load a TFDS image-classification dataset, downloading it if it is not prepared yet.

    Any dataset with an Image and a ClassLabel feature works. Validation comes from the dataset's own
    'validation' split when it has one that train_split and test_split leave unused, else it is
    carved from train. A dataset without a 'test' split (and --test_split=test) gets its test split
    carved from train with test_split_fraction, or is scored on validation.
    """
    import tensorflow_datasets as tfds  # Heavy, and only this loader needs it.

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"--dataset is not a known TFDS dataset. Received: dataset={name}") from None

    def cannot_prepare(reason: str) -> UserError:
        return UserError(
            f"Could not download or prepare TFDS dataset '{name}' ({reason}). To run offline, "
            f"pass --data_dir=DIR where DIR/{name}/ holds a prepared copy. Received: data_dir={data_dir}")

    if _will_download(builder):
        unreachable = _unreachable(builder.url_infos)
        if unreachable:
            raise cannot_prepare(f"no network: {unreachable}")
    try:
        builder.download_and_prepare()
    except Exception as e:  # Offline, a download fails with many error types; all mean the same here.
        raise cannot_prepare(first_line(e)) from None
    image_key, label_key = _feature_keys(builder.info, name)
    class_names = list(builder.info.features[label_key].names)

    def load(split):
        try:
            ds = builder.as_dataset(split=split, shuffle_files=False)
        except (ValueError, KeyError) as e:
            raise UserError(f"Bad split for {name} ({first_line(e)}). Received: split={split}") from None
        ds = ds.map(lambda ex: (to_rgb_uint8(ex[image_key]), ex[label_key]), num_parallel_calls=AUTOTUNE)
        return ds, _num_examples(builder.info, split, ds)

    available = set(builder.info.splits.keys())  # Empty for mock data.
    carve_test = bool(available) and test_split == "test" and "test" not in available
    train, num_train = load(train_split)
    test, num_test = (None, 0) if carve_test else load(test_split)
    splits = Splits(train=train, test=test, class_names=class_names, num_train=num_train, num_test=num_test)
    if carve_test:
        logging.warning("%s has no 'test' split (splits: %s); %s.", name, ", ".join(sorted(available)),
                        f"holding out {test_split_fraction:g} of {train_split} as test" if test_split_fraction
                        else "pass --test_split_fraction or --test_split=SPLIT for a test split")
        if test_split_fraction:
            splits = hold_out_test(splits, test_split_fraction, seed)
            validation_split /= 1 - test_split_fraction  # Both are fractions of the whole train split.
    used = _split_names(train_split) | _split_names(test_split)
    if validation_split > 0 and "validation" in available and "validation" not in used:
        logging.info("Validating on %s's own 'validation' split.", name)
        validation, num_validation = load("validation")
        splits = dataclasses.replace(splits, validation=validation, num_validation=num_validation)
    elif validation_split > 0:
        splits = hold_out_validation(splits, validation_split, seed)
    if splits.test is None:
        if splits.validation is None:
            raise UserError(f"{name} has no 'test' split, and no validation split to score on; pass "
                            f"--test_split=SPLIT or --test_split_fraction. Received: test_split={test_split}")
        logging.warning("The test accuracy reported is measured on the validation split.")
        splits = dataclasses.replace(splits, test=splits.validation, num_test=splits.num_validation)
    logging.info("Dataset %s: %d train, %d validation, %d test examples, %d classes.", name,
                 splits.num_train, splits.num_validation, splits.num_test, splits.num_classes)
    return splits


# One connection attempt this long decides whether a download can work: TFDS's own downloader retries
# ten times with backoff, minutes in all, before it reports what this finds in seconds.
NETWORK_TIMEOUT_SECONDS = 5


def _will_download(builder) -> bool:
    """Whether download_and_prepare would go to the network: TFDS's own (not a test double), for a
    dataset that is not prepared yet and whose files are fetched from URLs."""
    import tensorflow_datasets as tfds

    own = type(builder).download_and_prepare.__module__ == tfds.core.DatasetBuilder.__module__
    return own and not builder.is_prepared() and bool(getattr(builder, "url_infos", None))


def _unreachable(url_infos) -> str | None:
    """Why the first download host cannot be reached, or None when one connection attempt succeeds."""
    url = urllib.parse.urlsplit(next(iter(url_infos)))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=NETWORK_TIMEOUT_SECONDS).close()
    except OSError as e:
        return f"cannot reach {url.hostname}: {e.strerror or e}"
    return None


def _feature_keys(info, name: str):
    """(image feature, label feature): the supervised keys, else the one (or the so named) Image and
    ClassLabel features."""
    import tensorflow_datasets as tfds

    features = dict(info.features.items())
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    keys = info.supervised_keys
    if keys and len(keys) == 2 and keys[0] in images and keys[1] in labels:
        return tuple(keys)

    def pick(candidates, preferred):
        return preferred if preferred in candidates else (candidates[0] if len(candidates) == 1 else None)

    image_key, label_key = pick(images, "image"), pick(labels, "label")
    if image_key is None or label_key is None:
        raise UserError(f"{name} is not an image-classification dataset: it needs one Image and one "
                        f"ClassLabel feature (it has {', '.join(sorted(features)) or 'none'}). "
                        f"Received: dataset={name}")
    return image_key, label_key


def _split_names(split: str) -> set:
    """The split names that a TFDS split string such as 'train[:90%]+validation' reads."""
    return {part.strip() for part in re.sub(r"\[[^\]]*\]", "", split).split("+")}


def to_rgb_uint8(image: tf.Tensor) -> tf.Tensor:
    """Any TFDS image (uint8 or uint16; gray, gray+alpha, RGB or RGBA) -> uint8 [H, W, 3]."""
    if image.dtype != tf.uint8:
        image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels in (1, 2):
        rgb = tf.tile(image[..., :1], [1, 1, 3])
    elif channels == 4:
        rgb = image[..., :3]
    else:
        rgb = tf.cond(tf.shape(image)[-1] < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]),
                      lambda: image[..., :3])
    rgb.set_shape(image.shape[:-1].concatenate([3]))
    return rgb


def _num_examples(info, split: str, ds: tf.data.Dataset) -> int:
    """Split size from the dataset info, else cardinality, else by counting (mock data has no splits)."""
    try:
        return int(info.splits[split].num_examples)
    except (KeyError, ValueError):
        pass
    cardinality = int(ds.cardinality())
    if cardinality >= 0:
        return cardinality
    return int(ds.reduce(0, lambda count, _: count + 1))
