"""Your own images: a folder with one subfolder per class, checked file by file before training.

Every candidate image is decoded once up front (in parallel, with tf.data), so counts are exact and a
broken file is reported with its reason before training starts, never an hour into it. Before that,
the first bytes of each file (read by a thread pool) give its size, so an image over
--max_image_pixels is refused without being decoded, and its EXIF orientation, which the pipeline
applies after decoding (no TF op reads EXIF). Names, links and folders that cannot be used (not UTF-8,
symlink loops, unreadable folders) are skipped with their reason too. Decoding in the training
pipeline is tolerant as well: a file that breaks after the check is replaced by another image of its
split, with a warning, instead of ending the run.

With a `check_cache_dir`, the result of the check is remembered per file by (path, size, mtime), so
an unchanged folder of 100,000 images is checked again in seconds instead of decoded again.
"""

import collections
from concurrent import futures
import dataclasses
import hashlib
import json
import os

from absl import logging
import numpy as np
import tensorflow as tf

from tl_keras import files as atomic_files
from tl_keras.config import FOLDER_PREFIX as PREFIX
from tl_keras.data import image_files
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
# Bytes read to find a file's size and EXIF orientation: a JPEG's Exif segment is at most 64 KiB.
_PROBE_BYTES = 1 << 17
_CHECK_THREADS = min(32, 4 * (os.cpu_count() or 1))  # Reading headers waits on the disk, not the CPU.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
MEMO_FORMAT = 1


def is_folder(dataset: str) -> bool:
    return dataset.startswith(PREFIX)


def folder_path(dataset: str) -> str:
    return os.path.expanduser(dataset[len(PREFIX):])


@dataclasses.dataclass
class _Split:
    """The accepted files of one split, in a fixed order, with their integer labels."""

    paths: list
    labels: list


@dataclasses.dataclass
class _Checked:
    """The outcome of the up-front check: why files are skipped, and what the pipeline needs to know."""

    reasons: dict  # path -> why it is skipped
    renamed: dict  # path -> "FORMAT data", for readable files whose content is not their extension's
    orientations: dict  # path -> EXIF orientation, for readable files that are not upright (not 1)


def load_folder(root: str, validation_split: float, test_split_fraction: float = 0.0, seed: int = 0,
                strict: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                check_cache_dir: str | None = None) -> pipeline.Splits:
    """Load a class-folder dataset as raw Splits: uint8 RGB images of any size, integer labels.

    `root/CLASS/...` holds the images of each class, or `root/train/CLASS/...` plus `val/` or
    `validation/` and optionally `test/`. Missing splits are carved from train, stratified and seeded.
    Images over `max_image_pixels` are skipped (refused with `strict`) before they are decoded.
    `check_cache_dir`, if given, is where the check's results are remembered between runs.
    """
    received = f"Received: dataset={PREFIX}{root}"
    if not os.path.isdir(root):
        raise UserError(f"--dataset folder does not exist or is not a directory. {received}")
    layout = _find_layout(root, received)
    unusable = {}  # Folders and file names that cannot be used -> why.
    class_names = _class_names(layout["train"], received, unusable)
    listing = {split: _list_split(directory, class_names, received, unusable)
               for split, directory in layout.items()}
    _log_ignored(listing, root)
    candidates = [path for files, _ in listing.values() for paths in files.values() for path in paths]
    skipped, orientations = _skip_unreadable(candidates, unusable, root, strict, max_image_pixels,
                                             check_cache_dir)
    by_split = {}
    for split, (files, _) in listing.items():
        for name, paths in files.items():
            if paths and all(path in skipped for path in paths):
                raise UserError(f"Class folder {_rel(os.path.dirname(paths[0]), root)!r} has no readable "
                                f"images ({len(paths)} skipped as unreadable). {received}")
        by_split[split] = {c: [p for p in files.get(name, []) if p not in skipped]
                           for c, name in enumerate(class_names)}
    splits = _assign_splits(by_split, validation_split, test_split_fraction, seed, received)
    return _build_splits(splits, class_names, root, seed, orientations)


def _find_layout(root: str, received: str) -> dict:
    """Split name -> folder: {train, validation, test} folders when root is pre-split, else root."""
    try:
        entries = {e.name for e in os.scandir(root) if _is_dir(e) and not e.name.startswith(".")}
    except OSError as e:
        raise UserError(f"--dataset folder cannot be listed ({e.strerror}). {received}") from None
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


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # A symlink loop, or a link that cannot be followed: reported where it matters.
        return False


def _subfolders(directory: str, unusable: dict) -> tuple:
    """(sorted names of the usable visible subfolders, number of loose files) of a folder.

    A subfolder is unusable when it cannot be listed, its name is not UTF-8 (TensorFlow takes paths
    as UTF-8 strings), or it is a link that cannot be followed; each goes into `unusable` with why.
    """
    names, loose = [], 0
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        try:
            is_dir = entry.is_dir()
        except OSError as e:
            if not entry.name.startswith("."):
                unusable[entry.path + os.sep] = f"cannot be read ({e.strerror})"
            continue
        if not is_dir:
            loose += 1
            continue
        if entry.name.startswith("."):
            continue
        if not _is_utf8(entry.name):
            unusable[entry.path + os.sep] = "folder name is not valid UTF-8"
            continue
        try:
            os.scandir(entry.path).close()
        except OSError as e:
            unusable[entry.path + os.sep] = f"cannot be listed ({e.strerror})"
            continue
        names.append(entry.name)
    return names, loose


def _is_utf8(name: str) -> bool:
    """False for a name that the file system gave as bytes that are not UTF-8 (surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _class_names(directory: str, received: str, unusable: dict) -> list:
    names, _ = _subfolders(directory, unusable)
    if not names:
        raise UserError(f"--dataset folder has no class subfolders (one folder per class) in {directory}. "
                        f"{received}")
    if len(names) == 1:
        raise UserError(f"--dataset folder has only one class ({names[0]}); classification needs at "
                        f"least two class folders. {received}")
    return names


def _list_split(directory: str, class_names: list, received: str, unusable: dict):
    """(class folder name -> sorted image paths, Counter of ignored files by kind) for one split.

    Subfolders that cannot be listed and image names that are not UTF-8 go into `unusable`; the
    latter stay among the paths, so that they count as skipped images of their class.
    """
    present, loose = _subfolders(directory, unusable)
    unknown = sorted(set(present) - set(class_names))
    if unknown:
        raise UserError(f"Class folder {unknown[0]!r} in {directory} is not a class of the training "
                        f"split ({', '.join(class_names)}). {received}")
    ignored = collections.Counter()
    ignored["outside class folders"] = loose

    def unlisted(error):  # os.walk skips a folder it cannot list unless told.
        unusable[error.filename + os.sep] = f"cannot be listed ({error.strerror})"

    files = {}
    for name in present:
        paths = []
        for parent, dirs, names in os.walk(os.path.join(directory, name), onerror=unlisted):
            for d in dirs:
                if not d.startswith(".") and not _is_utf8(d):
                    unusable[os.path.join(parent, d) + os.sep] = "folder name is not valid UTF-8"
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and _is_utf8(d))
            for file in sorted(names):
                extension = os.path.splitext(file)[1].lower()
                if file.startswith("."):
                    ignored["hidden"] += 1
                elif extension in EXTENSION_FORMATS:
                    paths.append(os.path.join(parent, file))
                    if not _is_utf8(file):
                        unusable[paths[-1]] = "file name is not valid UTF-8"
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


def _skip_unreadable(paths: list, unusable: dict, root: str, strict: bool, max_image_pixels: int,
                     check_cache_dir: str | None) -> tuple:
    """Check every image once; warn about (or, with strict, fail on) every file and folder that cannot
    be used, in one message. Returns (skipped paths, {path: EXIF orientation})."""
    checked = check_images([p for p in paths if p not in unusable], max_image_pixels,
                           _memo_path(check_cache_dir, root) if check_cache_dir else None, root)
    if checked.renamed:
        logging.info("Decoded by content, which their extension does not match (%d): %s.",
                     len(checked.renamed), _listing(checked.renamed, root, limit=10))
    if checked.orientations:
        logging.info("Turned %d images upright as their EXIF orientation says.", len(checked.orientations))
    reasons = {**checked.reasons, **unusable}
    folders = sum(1 for path in reasons if path.endswith(os.sep))
    images = len(reasons) - folders
    if not reasons:
        logging.info("Checked %d images: all readable.", len(paths))
        return set(), checked.orientations
    if strict:
        and_folders = f" and {folders} folders" if folders else ""
        raise UserError(f"{images} of {len(paths)} images{and_folders} are unreadable (--strict): "
                        f"{_listing(reasons, root, limit=5)}. Received: strict=True")
    lines = "\n".join(f"  {_rel(path, root)}: {reason}" for path, reason in sorted(reasons.items()))
    and_folders = f", and {folders} folders," if folders else ""
    logging.warning("Skipped %d of %d images%s that cannot be read (--strict fails instead):\n%s",
                    images, len(paths), and_folders, lines)
    return set(reasons), checked.orientations


def _listing(reasons: dict, root: str, limit: int) -> str:
    items = [f"{_rel(path, root)} ({reason})" for path, reason in sorted(reasons.items())]
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _rel(path: str, root: str) -> str:
    """The path under root, as text that can be printed: bytes that are not UTF-8 show as \\xNN."""
    relative = os.path.relpath(path, root) + (os.sep if path.endswith(os.sep) else "")
    return os.fsencode(relative).decode("utf-8", "backslashreplace")


def check_images(paths: list, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 memo_path: str | None = None, root: str = "") -> _Checked:
    """Check each file once: its first bytes in a thread pool (size, format, orientation), then a full
    decode, in parallel with tf.data, of those within the pixel limit. No decoded image is kept.

    With `memo_path`, files whose (path under `root`, size, mtime) match a stored entry are not read
    again, and entries for the files that decoded are stored there.
    """
    memo = _read_memo(memo_path) if memo_path else {}
    prefix = os.path.join(root, "") if root else ""
    key = {path: path[len(prefix):] if path.startswith(prefix) else path for path in paths}
    checked = _Checked({}, {}, {})
    probes, known, to_decode = {}, {}, []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as e:
            checked.reasons[path] = f"cannot be read ({e.strerror})"
            continue
        if stat.st_size == 0:
            checked.reasons[path] = "empty file (0 bytes)"
            continue
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = memo.get(key[path])
        if entry and entry[:2] == stamp:
            known[path] = entry
        else:
            probes[path] = stamp
    with futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
        order = list(probes)
        chunks = [order[i:i + 256] for i in range(0, len(order), 256)]
        for chunk in pool.map(lambda chunk: [(p, _probe(p)) for p in chunk], chunks):
            for path, (orientation, size, found) in chunk:
                if isinstance(orientation, str):  # Could not be read: the reason.
                    checked.reasons[path] = orientation
                    continue
                known[path] = probes[path] + [orientation, *(size or (0, 0)), found]
                if not _over_limit(path, size, max_image_pixels, checked):
                    to_decode.append(path)
    decoded = _decode_sizes(to_decode)
    for path in to_decode:
        if path not in decoded:
            checked.reasons[path] = why_unreadable(path)
            del known[path]
            continue
        known[path][3:5] = decoded[path]
        _over_limit(path, decoded[path], max_image_pixels, checked)  # For formats without a size header.
    for path, (_, _, orientation, height, width, found) in known.items():
        if path not in decoded and _over_limit(path, (height, width), max_image_pixels, checked):
            continue
        if path in checked.reasons:
            continue
        if orientation != 1:
            checked.orientations[path] = orientation
        if found and found != EXTENSION_FORMATS[os.path.splitext(path)[1].lower()]:
            checked.renamed[path] = f"{found} data"
    if memo_path:
        # Only files that decoded are remembered: one refused by size alone was never decoded.
        _write_memo(memo_path, memo, {key[p]: entry for p, entry in known.items()
                                      if p in decoded or p not in probes})
    return checked


def _probe(path: str):
    """(EXIF orientation, (height, width) or None, format) from a file's first bytes, or (why, _, _)
    when it cannot be read or is not an image that TensorFlow decodes."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PROBE_BYTES)
            size = image_files.header_size(head)
            if size is None and head.startswith(b"\xff\xd8") and len(head) == _PROBE_BYTES:
                head += f.read()  # Large metadata segments before the JPEG frame header.
                size = image_files.header_size(head)
    except OSError as e:
        return f"cannot be read ({e.strerror})", None, None
    found = sniff_format(head[:_HEADER_BYTES])
    if found not in DECODABLE:
        return why_unreadable(path), None, None
    return image_files.exif_orientation(head), size, found


def _over_limit(path: str, size, max_image_pixels: int, checked: _Checked) -> bool:
    if size is None or size[0] * size[1] <= max_image_pixels:
        return False
    checked.reasons[path] = f"{size[1]} x {size[0]} pixels, over --max_image_pixels={max_image_pixels}"
    return True


def _decode_sizes(paths: list) -> dict:
    """{path: [height, width]} of the files that decode, in parallel with tf.data."""
    if not paths:
        return {}

    def probe(index, path):
        return index, tf.shape(decode_image(tf.io.read_file(path)))[:2]

    ds = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64), paths))
    ds = ds.map(probe, num_parallel_calls=pipeline.AUTOTUNE, deterministic=False)
    sizes = {}
    for indices, shapes in ds.ignore_errors().batch(256).as_numpy_iterator():
        sizes.update((paths[i], shape) for i, shape in zip(indices.tolist(), shapes.tolist()))
    return sizes


def _memo_path(directory: str, root: str) -> str:
    """One memo file per dataset folder, named by a hash of its absolute path."""
    name = hashlib.sha256(os.path.abspath(root).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(directory, f"folder_check.{name}.json")


def _read_memo(path: str) -> dict:
    """{path under root: [size, mtime_ns, orientation, height, width, format]}; {} if absent or unusable."""
    try:
        memo = atomic_files.read_json(path, default={})
    except (OSError, ValueError) as e:
        logging.warning("Ignoring the folder check memo %s, which cannot be read (%s).", path, e)
        return {}
    return memo.get("files", {}) if memo.get("format") == MEMO_FORMAT else {}


def _write_memo(path: str, old: dict, new: dict):
    if new == old:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_files.write_text(path, json.dumps({"format": MEMO_FORMAT, "files": new}, separators=(",", ":")))


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
        details = op_message(e).rstrip(".") or "no details"
        return f"corrupt, truncated or unsupported {found} data{named} ({details})"
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


def _build_splits(splits: dict, class_names: list, root: str, seed: int,
                  orientations: dict) -> pipeline.Splits:
    # Class-sorted files would defeat the training pipeline's bounded shuffle buffer, and would let
    # --eval_steps and --parity_examples, which read the first batches, score the first classes only.
    mixed = {name: _mixed(split, seed) for name, split in splits.items()}
    train = mixed["train"]
    validation = mixed["validation"] if splits["validation"].paths else None
    test = validation if splits["test"] is splits["validation"] else mixed["test"]
    counts = {name: np.bincount(s.labels, minlength=len(class_names)) if s else [0] * len(class_names)
              for name, s in (("train", train), ("validation", validation), ("test", test))}
    logging.info("Dataset %s%s: %d train, %d validation, %d test images, %d classes.", PREFIX, root,
                 len(train.paths), sum(counts["validation"]), len(test.paths), len(class_names))
    logging.info("Images per class (train/validation/test): %s.", ", ".join(
        f"{name} {counts['train'][c]}/{counts['validation'][c]}/{counts['test'][c]}"
        for c, name in enumerate(class_names)))
    validation_ds = _dataset(validation, orientations) if validation else None
    return pipeline.Splits(
        train=_dataset(train, orientations),
        test=validation_ds if test is validation else _dataset(test, orientations),
        class_names=list(class_names), num_train=len(train.paths), num_test=len(test.paths),
        validation=validation_ds,
        num_validation=len(validation.paths) if validation else 0,
        train_class_counts=counts["train"].tolist(),
        fingerprint=_fingerprint({"train": train, "validation": validation, "test": test}),
    )


def _mixed(split: _Split, seed: int) -> _Split:
    order = np.random.default_rng(seed).permutation(len(split.paths))
    return _Split([split.paths[i] for i in order], [split.labels[i] for i in order])


def _dataset(split: _Split, orientations: dict) -> tf.data.Dataset:
    """Decoded (image, label) pairs, upright, exactly len(split.paths) of them.

    Every file decoded in the check, but one can still change before it is read. Such a file is
    dropped and, so that counts and steps stay exact, a copy of a good example of the same split
    stands in for it, with a warning: a run never dies mid-epoch because of a file.
    """
    def load(path, label):
        return decode_image(tf.io.read_file(path)), label

    def load_upright(path, label, orientation):
        return image_files.apply_orientation(decode_image(tf.io.read_file(path)), orientation), label

    def stand_in(image, label):
        tf.py_function(_warn_stand_in, [], [])
        return image, label

    labels = np.asarray(split.labels, np.int64)
    turns = [orientations.get(path, 1) for path in split.paths]
    if any(turn != 1 for turn in turns):
        ds = tf.data.Dataset.from_tensor_slices((split.paths, labels, np.asarray(turns, np.int32)))
        good = ds.map(load_upright, num_parallel_calls=pipeline.AUTOTUNE).ignore_errors()
    else:  # The common case: no per-image branch in the graph.
        ds = tf.data.Dataset.from_tensor_slices((split.paths, labels))
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
