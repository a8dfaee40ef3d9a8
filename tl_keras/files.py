"""The one atomic writer: a kill or a power cut mid-write leaves the old file or none, never a torn one.

Everything tl_keras writes to a run directory (state, metrics, weights, the feature cache, rewritten
event files, export versions) goes through `atomic_path`.
"""

import contextlib
import json
import os
import shutil


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path beside `path` to write a file or a directory to; on success, flush it to
    disk and rename it onto `path`. On an exception the temporary is removed and `path` is untouched.

    `suffix` is kept at the end of the temporary name, for writers that check extensions
    (Keras's `.weights.h5`, numpy's `.npy`).
    """
    if suffix and not path.endswith(suffix):
        raise ValueError(f"{path} does not end with {suffix}")
    base = path[: len(path) - len(suffix)]
    tmp = f"{base}.tmp{suffix}"
    _remove(tmp)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def publish(tmp: str, path: str):
    """Flush a finished temporary file or directory to disk, then rename it onto `path`. For writers
    whose temporary outlives one process (an extraction resumed after a stop)."""
    _fsync_tree(tmp)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_bytes(path: str, data: bytes):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, data):
    """Sorted, indented JSON with a final newline: diffable, and the same bytes for the same data.
    NaN and inf are refused: they are not JSON, and readers other than Python's choke on them."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _remove(path: str):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _fsync_tree(path: str):
    """Data first, so that the rename never publishes a name whose blocks are not on disk yet."""
    if os.path.isdir(path):
        for root, _, names in os.walk(path):
            for name in names:
                _fsync_file(os.path.join(root, name))
            _fsync_dir(root)
    elif os.path.exists(path):
        _fsync_file(path)


def _fsync_file(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str):
    """The rename itself is durable only once the directory that holds it is synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # Some file systems refuse fsync on directories; the rename is still atomic.
        pass
    finally:
        os.close(fd)
