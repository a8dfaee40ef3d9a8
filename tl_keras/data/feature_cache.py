"""Frozen backbone outputs, computed once and read back every epoch instead of recomputed.

While layers are frozen (and in inference mode) their output for a given image is fixed, so both
phases can train only the layers above a boundary on stored activations:
- phase 1 stores pooled features (512 floats an image for VGG16) and trains the head on them;
- phase 2 stores the output of the layers below --fine_tune_at and trains the rest.
With flip augmentation both orientations are stored, so the cached path stays exact.

Arrays live as .npy files under model_dir/feature_cache/KEY/ and are memory-mapped, so a cache
larger than RAM still works (the OS pages it in). KEY hashes everything the values depend on, so a
stale cache is never read; files appear only once complete, so a resumed run reuses them.
"""

import hashlib
import json
import os
import shutil
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tl_keras import files
from tl_keras.data import pipeline
from tl_keras.errors import Interrupted, UserError

FORMAT_VERSION = 1
# Free space kept beyond what the cache writes: other writers (checkpoints, logs) share the disk.
DISK_MARGIN_BYTES = 256 << 20
DISK_MARGIN_FRACTION = 0.05
ORIENTATIONS = {False: "", True: "_flipped"}


def cache_key(**parts) -> str:
    """A short hash of every input the cached values depend on."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_fingerprint(weights: str) -> str:
    """Named weights as is; a weights file, or a directory of them (a KerasHub preset), by content, so
    that a replaced file invalidates the cache."""
    if weights in ("imagenet", "none"):
        return weights
    digest = hashlib.sha256()
    if not os.path.isdir(weights):
        _update(digest, weights)
        return digest.hexdigest()
    for folder, dirs, names in os.walk(weights):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, weights).encode() + b"\0")
            _update(digest, path)
    return digest.hexdigest()


def _update(digest, path: str):
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


class FeatureCache:
    """Stored activations of one run, by (boundary layer, split, orientation)."""

    def __init__(self, directory: str, key_parts: dict):
        self.directory = os.path.join(directory, cache_key(**key_parts))
        self._key_parts = key_parts

    def path(self, boundary: str, split: str, flipped: bool = False) -> str:
        return os.path.join(self.directory, f"{boundary}.{split}{ORIENTATIONS[flipped]}.npy")

    def labels_path(self, split: str) -> str:
        return os.path.join(self.directory, f"labels.{split}.npy")

    def get(self, boundaries: list, split: str, flipped: bool, extractor: keras.Model, batches,
            num_examples: int, stop_requested=None) -> list:
        """Activations at each boundary (the extractor's outputs, in order), extracted in one pass
        (with a progress bar) unless all are stored already.

        `stop_requested()` is asked after every batch; when it returns a signal number, the work so far
        is kept on disk and Interrupted is raised. The next call continues from there.
        """
        paths = [self.path(b, split, flipped) for b in boundaries]
        if all(os.path.exists(p) for p in paths) and os.path.exists(self.labels_path(split)):
            arrays = [np.load(p, mmap_mode="r") for p in paths]
            if all(a.shape[0] == num_examples for a in arrays):
                logging.info("Reusing cached %s activations for %s%s.", "+".join(boundaries), split,
                             ORIENTATIONS[flipped])
                return arrays
        logging.info("Computing %s activations for %d %s%s examples.", "+".join(boundaries),
                     num_examples, split, ORIENTATIONS[flipped])
        os.makedirs(self.directory, exist_ok=True)
        self._check_free_space(extractor, num_examples)
        files.write_text(os.path.join(self.directory, "key.json"),
                         json.dumps(self._key_parts, indent=2, sort_keys=True, default=str) + "\n")
        _extract(extractor, batches, num_examples, paths + [self.labels_path(split)], stop_requested)
        return [np.load(p, mmap_mode="r") for p in paths]

    def _check_free_space(self, extractor: keras.Model, num_examples: int):
        """Refuse in one line when the disk cannot hold the arrays: writing through a memory map to a
        full disk kills the process with SIGBUS, with no message."""
        needed = num_examples * (8 + sum(4 * int(np.prod(o.shape[1:])) for o in extractor.outputs))
        wanted = needed + max(DISK_MARGIN_BYTES, int(needed * DISK_MARGIN_FRACTION))
        free = shutil.disk_usage(self.directory).free
        if free < wanted:
            raise UserError(f"Not enough free disk space for the feature cache: it needs {_gib(needed)} "
                            f"(plus a margin of {_gib(wanted - needed)}) and {_gib(free)} is free; free "
                            f"some space or run with --cache_features=false. "
                            f"Received: feature_cache={self.directory}")

    def labels(self, split: str) -> np.ndarray:
        return np.load(self.labels_path(split))


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / (1 << 30):.2f} GiB"


def _extract(extractor: keras.Model, batches, num_examples: int, paths: list, stop_requested=None):
    """Stream the extractor's outputs (to paths[:-1]) and the integer labels (to paths[-1]) into .npy
    files, through memory-mapped `.partial.npy` files that become the real ones once complete.

    A record of the batches done (`.partial.json`, written each 10% and on a stop) lets a rerun
    continue where a stop or a kill left off; rows past the record are simply written again.
    """
    shapes = [tuple(o.shape[1:]) for o in extractor.outputs] + [()]
    dtypes = [np.float32] * len(extractor.outputs) + [np.int64]
    partials = [p[: -len(".npy")] + ".partial.npy" for p in paths]
    record = paths[0][: -len(".npy")] + ".partial.json"
    done_batches, done = _resume_point(record, partials, num_examples, shapes)
    outs = [np.lib.format.open_memmap(partial, mode="r+" if done_batches else "w+", dtype=dtype,
                                      shape=(num_examples,) + shape)
            for partial, dtype, shape in zip(partials, dtypes, shapes)]
    name = os.path.basename(paths[0]).split(".")[1]
    if done:
        logging.info("Continuing the extraction of %s after %d of %d examples.", name, done, num_examples)

    def keep(batches_done: int, examples_done: int):
        for out in outs:
            out.flush()
        files.write_json(record, {"batches": batches_done, "examples": examples_done,
                                  "num_examples": num_examples})

    progress = _Progress(num_examples, name, done)
    for inputs, one_hot in batches.skip(done_batches):
        values = extractor.predict_on_batch(inputs)
        values = values if isinstance(values, (list, tuple)) else [values]
        n = min(len(values[0]), num_examples - done)
        for out, value in zip(outs, values):
            out[done:done + n] = np.asarray(value)[:n]
        outs[-1][done:done + n] = np.argmax(one_hot[:n], axis=-1)
        done, done_batches = done + n, done_batches + 1
        if progress.update(done):
            keep(done_batches, done)
        signum = stop_requested() if stop_requested else None
        if signum and done < num_examples:
            keep(done_batches, done)
            raise Interrupted(signum, f"during feature extraction ({done} of {num_examples} {name} "
                                      "examples kept)")
    if done != num_examples:
        raise RuntimeError(f"Expected {num_examples} examples for {paths[0]}, got {done}.")
    for out in outs:
        out.flush()
    del out
    outs.clear()  # Close the memory maps before the files are synced and renamed.
    for partial, path in zip(partials, paths):
        files.publish(partial, path)
    os.remove(record)


def _resume_point(record: str, partials: list, num_examples: int, shapes: list) -> tuple[int, int]:
    """(batches, examples) already extracted by an earlier, stopped attempt; (0, 0) if none fits."""
    saved = files.read_json(record)
    if not saved or saved.get("num_examples") != num_examples or not all(map(os.path.exists, partials)):
        return 0, 0
    for partial, shape in zip(partials, shapes):
        if np.load(partial, mmap_mode="r").shape != (num_examples,) + shape:
            return 0, 0
    return int(saved["batches"]), int(saved["examples"])


class _Progress:
    """A text progress bar in the log, every 10%: extraction of a large split takes minutes."""

    def __init__(self, total: int, name: str, done: int = 0):
        self.total, self.name, self.start, self.first = total, name, time.time(), done
        self.next = (int(10 * done / max(total, 1)) + 1) / 10

    def update(self, done: int) -> bool:
        """Log when a 10% mark is passed, and say so."""
        if done < self.total * self.next and done < self.total:
            return False
        while self.next <= done / self.total:
            self.next += 0.1
        fraction = done / self.total
        rate = (done - self.first) / max(time.time() - self.start, 1e-9)
        bar = "#" * int(20 * fraction) + "." * (20 - int(20 * fraction))
        logging.info("%s [%s] %3.0f%% %d/%d images, %.0f img/s", self.name, bar, 100 * fraction, done,
                     self.total, rate)
        return True


def train_dataset(features: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int,
                  seed: int, flipped: np.ndarray | None = None, start_epoch: int = 0,
                  skip_steps: int = 0, steps_per_epoch: int | None = None) -> tf.data.Dataset:
    """Endless shuffled batches from stored activations; with `flipped`, each example's orientation
    is drawn at random every epoch, exactly like image-level random flips. Order and flips depend
    only on (seed, epoch), so a resumed run sees the batches an uninterrupted one would."""
    n = len(labels)
    read = _reader(features, labels, flipped)

    def epoch_batches(epoch):
        # The same shuffle op, seed and buffer as the image pipeline: shuffling depends only on those
        # and the length, so the cached head sees the images' order, batch for batch.
        seed_e = pipeline.epoch_seed(seed, epoch)
        order = tf.data.Dataset.range(n).shuffle(pipeline.SHUFFLE_BUFFER, seed=seed_e)
        with_flips = order.map(lambda i: (i, tf.random.stateless_uniform([], tf.stack([seed_e, i])) < 0.5))
        return with_flips.batch(batch_size).take(steps_per_epoch or -1)

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_batches).skip(skip_steps)
    ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(_finish(features.shape[1:], num_classes)).prefetch(tf.data.AUTOTUNE)


def eval_dataset(features: np.ndarray, labels: np.ndarray, num_classes: int,
                 batch_size: int) -> tf.data.Dataset:
    """Batches in stored order, for validation and test."""
    read = _reader(features, labels)
    ds = tf.data.Dataset.range(len(labels)).batch(batch_size)
    ds = ds.map(lambda idx: read(idx, None), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(_finish(features.shape[1:], num_classes)).prefetch(tf.data.AUTOTUNE)


# Arrays up to this size are read into memory and gathered inside the tf.data graph; larger ones
# stay memory-mapped and are read batch by batch, so memory stays bounded.
IN_MEMORY_BYTES = 1 << 30


def _reader(features, labels, flipped=None):
    """A graph function (indices, flip mask) -> (activations, labels)."""
    if features.nbytes * (1 if flipped is None else 2) <= IN_MEMORY_BYTES:
        tensors = [tf.constant(np.asarray(a)) for a in (features, labels)]
        mirrored = None if flipped is None else tf.constant(np.asarray(flipped))

        def read_in_memory(idx, flip):
            batch = tf.gather(tensors[0], idx)
            if mirrored is not None and flip is not None:
                mask = tf.reshape(flip, [-1] + [1] * (len(features.shape) - 1))
                batch = tf.where(mask, tf.gather(mirrored, idx), batch)
            return batch, tf.gather(tensors[1], idx)
        return read_in_memory

    def read_mapped(idx, *flip):
        order = np.argsort(idx)  # Sorted reads are faster on a memory map.
        batch = np.empty((len(idx),) + features.shape[1:], np.float32)
        batch[order] = features[idx[order]]
        if flip and flipped is not None and flip[0].any():
            chosen = np.flatnonzero(flip[0])
            batch[chosen] = flipped[idx[chosen]]
        return batch, np.asarray(labels[idx])  # In the order asked for, as the in-memory reader.

    def read(idx, flip):
        args = [idx] if flip is None else [idx, flip]
        return tf.numpy_function(read_mapped, args, [tf.float32, tf.int64], stateful=False)
    return read


def _finish(feature_shape, num_classes):
    def fn(batch, labels):
        batch.set_shape((None,) + tuple(feature_shape))
        labels.set_shape((None,))
        return batch, tf.one_hot(tf.cast(labels, tf.int32), num_classes)
    return fn
