"""Helpers that tests import: generated data (arrays, TFDS-like splits, class folders with every kind
of file that real folders contain), the CLI runner, and where the offline data lives.

conftest.py holds the fixtures; test files import from here, never from each other.
"""

import io
import os
import subprocess
import sys

from absl.testing import flagsaver
import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from tl_keras import flags as tl_flags
from tl_keras.data import pipeline
from tl_keras.model import classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
SHARED_DATA = os.path.join(SHARED, "data", "tensorflow_datasets")
SHARED_WEIGHTS = os.path.join(SHARED, "weights", "vgg16_hed_notop.weights.h5")
CLASS_NAMES = ["cat", "dog", "frog"]


def make_examples(n: int, seed: int, size: int = 32, num_classes: int = 3):
    """Images whose mean brightness depends on the class, so a few steps can learn something."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    base = (labels * (200 // max(1, num_classes - 1)))[:, None, None, None]
    images = np.clip(base + rng.integers(0, 56, (n, size, size, 3)), 0, 255).astype(np.uint8)
    return images, labels


def make_splits(num_train=24, num_test=8, validation_split=0.25, seed=0, size=32):
    images, labels = make_examples(num_train, seed, size)
    test_images, test_labels = make_examples(num_test, seed + 1, size)
    splits = pipeline.Splits(
        train=tf.data.Dataset.from_tensor_slices((images, labels)),
        test=tf.data.Dataset.from_tensor_slices((test_images, test_labels)),
        class_names=list(CLASS_NAMES), num_train=num_train, num_test=num_test)
    if validation_split:
        splits = pipeline.hold_out_validation(splits, validation_split, seed)
    return splits


def requires_shared():
    return pytest.mark.skipif(
        not (os.path.isdir(SHARED_DATA) and os.path.isfile(SHARED_WEIGHTS)),
        reason=f"needs the offline CIFAR-10 copy and VGG16 weights under {SHARED} (absent here)")


# For tests of what a CPU-only host does (the default strategy, float32, matmul convolutions).
cpu_only_host = pytest.mark.skipif(
    bool(tf.config.list_physical_devices("GPU")),
    reason="checks the behaviour of a host without GPUs, and this host has one")


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "tl_keras.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_python(code: str, timeout=120):
    """`code` in a fresh interpreter: for what a process imports, or does when a module is missing."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=timeout)


def one_step_on_images_and_on_stored(model, boundary: str, x, stored, y, learning_rate=1e-3):
    """(start, weights after one step on images `x`, weights after one step of the part above
    `boundary` on the `stored` activations), both from the same start. The feature cache is right
    when the last two agree."""
    start = model.get_weights()
    for net, inputs in ((model, x), (classifier.build_model_from(model, boundary), stored)):
        model.set_weights(start)
        net.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="categorical_crossentropy",
                    run_eagerly=True)
        net.train_on_batch(inputs, y)
        if net is model:
            on_images = model.get_weights()
    return start, on_images, model.get_weights()


# Class folder names, sorted: a space and a non-ASCII character, and imbalanced counts.
CLASSES = {"cat": 12, "dog café": 4, "frog": 6}


def photo(label: int, seed: int, size=(36, 44), num_classes: int = 3) -> np.ndarray:
    """An RGB image whose brightness depends on the class, so a few steps can learn something."""
    rng = np.random.default_rng(seed)
    base = label * (200 // max(1, num_classes - 1))
    return np.clip(base + rng.integers(0, 56, (*size, 3)), 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, mode: str | None = None, **kwargs) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def animated_gif(first: np.ndarray, second: np.ndarray) -> bytes:
    frames = [Image.fromarray(a).convert("P") for a in (first, second)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return out.getvalue()


# Good files, cycled through per class: every accepted format, mode and extension spelling.
GOOD_KINDS = [
    ("{i}.jpg", lambda a: encode(a, "JPEG", quality=95)),
    ("{i} with space.PNG", lambda a: encode(a, "PNG")),
    ("naïve {i}.jpeg", lambda a: encode(a, "JPEG")),
    ("gray {i}.png", lambda a: encode(a, "PNG", "L")),
    ("palette {i}.png", lambda a: encode(a, "PNG", "P")),
    ("rgba {i}.png", lambda a: encode(a, "PNG", "RGBA")),
    ("{i}.BMP", lambda a: encode(a, "BMP")),
    ("animated {i}.gif", lambda a: animated_gif(a, 255 - a)),
    ("{i}.webp", lambda a: encode(a, "WEBP", lossless=True)),
    ("png named jpeg {i}.jpg", lambda a: encode(a, "PNG")),
]


def _jpeg(seed):
    return encode(photo(0, seed), "JPEG")


# Broken files: (class folder, name, content, words the skip reason must contain).
BAD_FILES = [
    ("cat", "empty.jpg", b"", "empty file"),
    ("cat", "notes.jpg", b"shopping list: milk, eggs\n", "not an image (text)"),
    ("dog café", "truncated.JPG", _jpeg(1)[:400], "corrupt, truncated or unsupported JPEG"),
    ("frog", "corrupt.png", encode(photo(2, 3), "PNG")[:60] + bytes(range(256)) * 4,
     "corrupt, truncated or unsupported PNG"),
    ("frog", "scan.png", encode(photo(2, 4), "TIFF"), "TIFF data named .png"),
    ("cat", "one bit.bmp", encode(photo(0, 5), "BMP", "1"), "corrupt, truncated or unsupported BMP"),
    ("cat", "garbage.gif", bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)),
     "not an image (unknown format)"),
]
# Not images: ignored by extension (or as hidden files), never decoded.
NON_IMAGES = [("cat", "readme.txt"), ("dog café", "Thumbs.db"), ("frog", ".DS_Store"),
              ("frog", "._0.jpg"), ("cat", "labels")]


def write(path: str, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_image_folder(root, classes=None, bad=True, seed=0, size=(36, 44)) -> dict:
    """Write root/CLASS/*.ext; return {class: number of readable images}. With bad=True, add every
    kind of broken and non-image file, a nested subfolder, and a loose file at the top."""
    classes = CLASSES if classes is None else classes
    root = str(root)
    for label, (name, count) in enumerate(sorted(classes.items())):
        for i in range(count):
            filename, make = GOOD_KINDS[(i + label) % len(GOOD_KINDS)]
            h, w = size[0] + 3 * (i % 4), size[1] - 2 * (i % 3)  # Any size.
            write(os.path.join(root, name, filename.format(i=i)),
                  make(photo(label, seed * 1000 + label * 100 + i, (h, w), len(classes))))
    if bad:
        for name, filename, data, _ in BAD_FILES:
            write(os.path.join(root, name, filename), data)
        for name, filename in NON_IMAGES:
            write(os.path.join(root, name, filename), b"not an image")
        write(os.path.join(root, "labels.csv"), b"file,label\n")
        write(os.path.join(root, ".ipynb_checkpoints", "x.jpg"), _jpeg(9))
        # Nested folders belong to their class.
        write(os.path.join(root, "cat", "more", "nested.jpg"), encode(photo(0, 77), "JPEG"))
    counts = dict(classes)
    if bad:
        counts["cat"] += 1
    return counts


def exif_jpeg(array: np.ndarray, orientation: int, quality: int = 100) -> bytes:
    """JPEG bytes whose EXIF says how to turn the stored pixels upright, as a phone camera writes."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(array, "JPEG", quality=quality, exif=exif.tobytes())


def upright(array: np.ndarray, orientation: int) -> np.ndarray:
    """What PIL's ImageOps.exif_transpose makes of stored pixels with this EXIF orientation."""
    from PIL import ImageOps

    image = Image.fromarray(array)
    image.getexif()[0x0112] = orientation
    return np.asarray(ImageOps.exif_transpose(image))


def fake_unreadable_folders(monkeypatch, names):
    """Listing a folder whose name is in `names` fails with EACCES, as for a chmod 000 folder that a
    non-root user cannot open (tests may run as root, which reads everything)."""
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fsdecode(path).rstrip(os.sep)) in names:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def config_from_flagfile(path):
    """The Config that --flagfile=PATH alone gives: how flags.txt resumes, evaluates and exports a run."""
    with flagsaver.flagsaver():
        tl_flags.FLAGS.unparse_flags()
        tl_flags.FLAGS(["prog", f"--flagfile={path}"])
        return tl_flags.get_config()
