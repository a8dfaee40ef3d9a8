"""Your own images: a folder with one subfolder per class, checked file by file before training.

Every candidate image is decoded once up front (in parallel, with tf.data), so counts are exact and a
broken file is reported with its reason before training starts, never an hour into it. Decoding in
the training pipeline is tolerant as well: a file that breaks after the check is replaced by another
image of its split, with a warning, instead of ending the run.
"""

import collections
import dataclasses
import hashlib
import os

from absl import logging
import numpy as np
import tensorflow as tf

from tl_keras.config import FOLDER_PREFIX as PREFIX
from tl_keras.data import pipeline
from tl_keras.errors import UserError, op_message

# Formats by extension; tf.io.decode_image decodes them all and tells them apart by content.
EXTENSION_FORMATS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".bmp": "BMP",
    ".gif": "GIF", ".webp": "WebP", ".jxl": "JPEG XL",
}
DECODABLE = frozenset(EXTENSION_FORMATS.values())
# Split folders of a pre-split dataset; anything else at the top level is a class folder.
TRAIN_DIR, VALIDATION_DIRS, TEST_DIR = "train", ("val", "validation"), "test"
_HEADER_BYTES = 16


def is_folder(dataset: str) -> bool:
    return dataset.startswith(PREFIX)


def folder_path(dataset: str) -> str:
    return os.path.expanduser(dataset[len(PREFIX):])


@dataclasses.dataclass
class _Split:
    """The accepted files of one split, in a fixed order, with their integer labels."""

    paths: list
    labels: list


def load_folder(root: str, validation_split: float, test_split_fraction: float = 0.0, seed: int = 0,
                strict: bool = False) -> pipeline.Splits:
    """Load a class-folder dataset as raw Splits: uint8 RGB images of any size, integer labels.

    `root/CLASS/...` holds the images of each class, or `root/train/CLASS/...` plus `val/` or
    `validation/` and optionally `test/`. Missing splits are carved from train, stratified and seeded.
    """
    received = f"Received: dataset={PREFIX}{root}"
    if not os.path.isdir(root):
        raise UserError(f"--dataset folder does not exist or is not a directory. {received}")
    layout = _find_layout(root, received)
    class_names = _class_names(layout["train"], received)
    listing = {split: _list_split(directory, class_names, received)
               for split, directory in layout.items()}
    _log_ignored(listing, root)
    candidates = [path for files, _ in listing.values() for paths in files.values() for path in paths]
    skipped = _skip_unreadable(candidates, root, strict)
    by_split = {}
    for split, (files, _) in listing.items():
        for name, paths in files.items():
            if paths and all(path in skipped for path in paths):
                raise UserError(f"Class folder {_rel(os.path.dirname(paths[0]), root)!r} has no readable "
                                f"images ({len(paths)} skipped as unreadable). {received}")
        by_split[split] = {c: [p for p in files.get(name, []) if p not in skipped]
                           for c, name in enumerate(class_names)}
    splits = _assign_splits(by_split, validation_split, test_split_fraction, seed, received)
    return _build_splits(splits, class_names, root, seed)


def _find_layout(root: str, received: str) -> dict:
    """Split name -> folder: {train, validation, test} folders when root is pre-split, else root."""
    entries = {e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")}
    validation = [name for name in VALIDATION_DIRS if name in entries]
    split_dirs = {TRAIN_DIR, TEST_DIR, *VALIDATION_DIRS}
    if TRAIN_DIR not in entries or not entries <= split_dirs:
        return {"train": root}
    if len(validation) > 1:
        raise UserError(f"--dataset folder has both val/ and validation/; keep one. {received}")
    layout = {"train": os.path.join(root, TRAIN_DIR)}
    if validation:
        layout["validation"] = os.path.join(root, validation[0])
    if TEST_DIR in entries:
        layout["test"] = os.path.join(root, TEST_DIR)
    logging.info("Using the split folders of %s: %s (missing splits are carved from train/).", root,
                 ", ".join(f"{os.path.basename(d)}/" for d in layout.values()))
    return layout


def _class_names(directory: str, received: str) -> list:
    names = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise UserError(f"--dataset folder has no class subfolders (one folder per class) in {directory}. "
                        f"{received}")
    if len(names) == 1:
        raise UserError(f"--dataset folder has only one class ({names[0]}); classification needs at "
                        f"least two class folders. {received}")
    return names


def _list_split(directory: str, class_names: list, received: str):
    """(class folder name -> sorted image paths, Counter of ignored files by kind) for one split."""
    present = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    unknown = sorted(set(present) - set(class_names))
    if unknown:
        raise UserError(f"Class folder {unknown[0]!r} in {directory} is not a class of the training "
                        f"split ({', '.join(class_names)}). {received}")
    ignored = collections.Counter()
    ignored["outside class folders"] = sum(1 for e in os.scandir(directory) if e.is_file())
    files = {}
    for name in present:
        paths = []
        for parent, dirs, names in os.walk(os.path.join(directory, name)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(names):
                extension = os.path.splitext(file)[1].lower()
                if file.startswith("."):
                    ignored["hidden"] += 1
                elif extension in EXTENSION_FORMATS:
                    paths.append(os.path.join(parent, file))
                else:
                    ignored[extension or "no extension"] += 1
        if not paths:
            raise UserError(f"Class folder {os.path.join(directory, name)} has no images "
                            f"({', '.join(sorted(EXTENSION_FORMATS))}). {received}")
        files[name] = paths
    return files, ignored


def _log_ignored(listing: dict, root: str):
    ignored = sum((counts for _, counts in listing.values()), collections.Counter())
    ignored = {kind: n for kind, n in ignored.items() if n}
    if ignored:
        logging.info("Ignored %d files in %s that are not images (%s).", sum(ignored.values()), root,
                     ", ".join(f"{kind}: {n}" for kind, n in sorted(ignored.items())))


def _skip_unreadable(paths: list, root: str, strict: bool) -> set:
    """Decode every image once; warn about (or, with strict, fail on) those that cannot be decoded."""
    reasons, renamed = check_images(paths)
    if renamed:
        logging.info("Decoded by content, which their extension does not match (%d): %s.",
                     len(renamed), _listing(renamed, root, limit=10))
    if not reasons:
        logging.info("Checked %d images: all readable.", len(paths))
        return set()
    if strict:
        raise UserError(f"{len(reasons)} of {len(paths)} images are unreadable (--strict): "
                        f"{_listing(reasons, root, limit=5)}. Received: strict=True")
    lines = "\n".join(f"  {_rel(path, root)}: {reason}" for path, reason in sorted(reasons.items()))
    logging.warning("Skipped %d of %d images that cannot be read (--strict fails instead):\n%s",
                    len(reasons), len(paths), lines)
    return set(reasons)


def _listing(reasons: dict, root: str, limit: int) -> str:
    items = [f"{_rel(path, root)} ({reason})" for path, reason in sorted(reasons.items())]
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root)


def check_images(paths: list):
    """Decode each file once, in parallel. Returns ({path: why unreadable}, {path: format}) where the
    second holds readable files whose content is in a format other than their extension says."""
    reasons = {}
    to_decode = []
    for path in paths:
        try:
            if os.path.getsize(path) == 0:
                reasons[path] = "empty file (0 bytes)"
                continue
        except OSError as e:
            reasons[path] = f"cannot be read ({e.strerror})"
            continue
        to_decode.append(path)
    headers = {}
    if to_decode:
        def probe(index, path):
            contents = tf.io.read_file(path)
            image = decode_image(contents)
            return index, tf.strings.substr(contents, 0, _HEADER_BYTES), tf.shape(image)

        ds = tf.data.Dataset.from_tensor_slices((tf.range(len(to_decode), dtype=tf.int64), to_decode))
        ds = ds.map(probe, num_parallel_calls=pipeline.AUTOTUNE, deterministic=False)
        for indices, header_batch, _ in ds.ignore_errors().batch(256).as_numpy_iterator():
            headers.update(zip(indices.tolist(), header_batch.tolist()))
    renamed = {}
    for index, path in enumerate(to_decode):
        if index in headers:
            found = sniff_format(headers[index])
            if found and found != EXTENSION_FORMATS[os.path.splitext(path)[1].lower()]:
                renamed[path] = f"{found} data"
        else:
            reasons[path] = why_unreadable(path)
    return reasons, renamed


def decode_image(contents: tf.Tensor) -> tf.Tensor:
    """Any decodable image bytes -> uint8 [H, W, 3]: first GIF frame; gray, palette, RGBA to RGB."""
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def why_unreadable(path: str) -> str:
    """A short reason, from the file's first bytes and TensorFlow's own decoding error."""
    try:
        with open(path, "rb") as f:
            contents = f.read()
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    extension = os.path.splitext(path)[1].lower()
    found = sniff_format(contents[:_HEADER_BYTES])
    named = f" named {extension}" if found and found != EXTENSION_FORMATS.get(extension) else ""
    if found == "text":
        return "not an image (text)"
    if found is None:
        return "not an image (unknown format)"
    if found not in DECODABLE:
        return f"{found} data{named}, which TensorFlow cannot decode"
    try:
        decode_image(tf.constant(contents))
    except (tf.errors.OpError, ValueError) as e:
        return f"corrupt, truncated or unsupported {found} data{named} ({op_message(e).rstrip('.') or 'no details'})"
    return "could not be decoded"  # Decodes now: it changed during the check.


def sniff_format(header: bytes) -> str | None:
    """The image format that a file's first bytes announce, 'text', or None."""
    if header.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if header.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if header[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if header.startswith(b"BM"):
        return "BMP"
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "WebP"
    if header.startswith(b"\xff\x0a") or header[4:12] == b"JXL \r\n\x87\n":
        return "JPEG XL"
    if header[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if header[4:8] == b"ftyp":
        return "AVIF" if header[8:12] in (b"avif", b"avis") else "HEIC"
    if header.startswith(b"%PDF"):
        return "PDF"
    if header.startswith(b"8BPS"):
        return "PSD"
    if header and all(32 <= b < 127 or b in b"\t\n\r" for b in header):
        return "text"
    return None


def _assign_splits(by_split: dict, validation_split: float, test_split_fraction: float, seed: int,
                   received: str) -> dict:
    """Split name -> _Split. Missing validation and test are carved from train, class by class."""
    train = by_split["train"]
    carve = {"validation": validation_split if "validation" not in by_split else 0.0,
             "test": test_split_fraction if "test" not in by_split else 0.0}
    held = {split: {c: [] for c in train} for split in carve}
    rng = np.random.default_rng(seed)
    for c in sorted(train):
        paths = [train[c][i] for i in rng.permutation(len(train[c]))]
        total = len(paths)
        for split in ("test", "validation"):
            # Every class gets at least one held-out image, as long as one is left to train on.
            n = min(max(1, round(total * carve[split])) if carve[split] else 0, len(paths) - 1)
            held[split][c], paths = paths[:n], paths[n:]
        train[c] = sorted(paths)
    result = {"train": _flatten(train)}
    for split in ("validation", "test"):
        source = by_split.get(split) or held[split]
        result[split] = _flatten(source)
    if not result["test"].paths:
        if not result["validation"].paths:
            raise UserError(f"--dataset folder needs a test/ or validation/ folder, --validation_split "
                            f"or --test_split_fraction to measure accuracy on. {received}")
        logging.warning("No test split (no test/ folder and no --test_split_fraction): the test accuracy "
                        "reported is measured on the validation split.")
        result["test"] = result["validation"]
    return result


def _flatten(by_class: dict) -> _Split:
    pairs = [(path, c) for c in sorted(by_class) for path in by_class[c]]
    return _Split([p for p, _ in pairs], [c for _, c in pairs])


def _build_splits(splits: dict, class_names: list, root: str, seed: int) -> pipeline.Splits:
    train = splits["train"]
    # Class-sorted files would defeat the training pipeline's bounded shuffle buffer: mix them once.
    order = np.random.default_rng(seed).permutation(len(train.paths))
    train = _Split([train.paths[i] for i in order], [train.labels[i] for i in order])
    validation = splits["validation"] if splits["validation"].paths else None
    test = splits["test"]
    counts = {name: np.bincount(s.labels, minlength=len(class_names)) if s else [0] * len(class_names)
              for name, s in (("train", train), ("validation", validation), ("test", test))}
    logging.info("Dataset %s%s: %d train, %d validation, %d test images, %d classes.", PREFIX, root,
                 len(train.paths), sum(counts["validation"]), len(test.paths), len(class_names))
    logging.info("Images per class (train/validation/test): %s.", ", ".join(
        f"{name} {counts['train'][c]}/{counts['validation'][c]}/{counts['test'][c]}"
        for c, name in enumerate(class_names)))
    validation_ds = _dataset(validation) if validation else None
    return pipeline.Splits(
        train=_dataset(train), test=validation_ds if test is validation else _dataset(test),
        class_names=list(class_names), num_train=len(train.paths), num_test=len(test.paths),
        validation=validation_ds,
        num_validation=len(validation.paths) if validation else 0,
        train_class_counts=counts["train"].tolist(),
        fingerprint=_fingerprint({"train": train, "validation": validation, "test": test}),
    )


def _dataset(split: _Split) -> tf.data.Dataset:
    """Decoded (image, label) pairs, exactly len(split.paths) of them.

    Every file decoded in the check, but one can still change before it is read. Such a file is
    dropped and, so that counts and steps stay exact, a copy of a good example of the same split
    stands in for it, with a warning: a run never dies mid-epoch because of a file.
    """
    def load(path, label):
        return decode_image(tf.io.read_file(path)), label

    def stand_in(image, label):
        tf.py_function(_warn_stand_in, [], [])
        return image, label

    ds = tf.data.Dataset.from_tensor_slices((split.paths, np.asarray(split.labels, np.int64)))
    good = ds.map(load, num_parallel_calls=pipeline.AUTOTUNE).ignore_errors()
    n = len(split.paths)
    return good.concatenate(good.repeat().map(stand_in)).take(n).apply(
        tf.data.experimental.assert_cardinality(n))


def _warn_stand_in():
    logging.warning("An image became unreadable after the up-front check (changed or deleted during "
                    "the run); a copy of another image of its split stands in for it.")


def _fingerprint(splits: dict) -> str:
    """Identifies the exact files (by path, size and modification time) and their split and label."""
    digest = hashlib.sha256()
    for name, split in splits.items():
        for path, label in zip(split.paths, split.labels) if split else ():
            try:
                stat = os.stat(path)
                size, mtime = stat.st_size, stat.st_mtime_ns
            except OSError:
                size = mtime = -1
            digest.update(f"{name}\0{path}\0{label}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:16]
