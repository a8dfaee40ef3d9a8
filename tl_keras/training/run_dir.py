"""The run directory (model_dir): what a run keeps there, and the checks before anything is written.

    model_dir/
      config.json, flags.txt   the settings; `--flagfile=MODEL_DIR/flags.txt` repeats the run
      labels.txt               class names, one a line, in label order
      dataset.json             the classes and (for folders) the files the run trained on
      metrics.json             per-phase test metrics, the export path
      checkpoints/             resumable state (checkpointing.py), latest and best weights
      logs/                    TensorBoard (reporting/summaries.py)
      eval/                    --mode=evaluate's report (reporting/evaluation.py)
      export/N/                SavedModel versions (serving/export.py)
      feature_cache/           frozen activations (data/feature_cache.py)
      folder_check/            which files of a folder dataset were readable, by path, size and mtime
"""

import contextlib
import dataclasses
import fcntl
import os
import shutil

from tl_keras import config as config_lib
from tl_keras import files
from tl_keras.data import folder_dataset
from tl_keras.errors import UserError

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
FLAGS_FILE = "flags.txt"
LABELS_FILE = "labels.txt"
DATASET_FILE = "dataset.json"
EVAL_DIR = "eval"
EXPORT_DIR = "export"
LOG_DIR = "logs"
FEATURE_CACHE_DIR = "feature_cache"
FOLDER_CHECK_DIR = "folder_check"
LOCK_FILE = ".lock"
LR_FIND_DIR = "lr_find"  # The range test's plots and suggestions (--mode=lr_find, auto rates).
# What --overwrite removes; the feature cache and the folder check's memo stay: their keys guard them.
RUN_OUTPUTS = ("checkpoints", LOG_DIR, EXPORT_DIR, EVAL_DIR, LR_FIND_DIR, METRICS_FILE, CONFIG_FILE,
               FLAGS_FILE, LABELS_FILE, DATASET_FILE)
# Everything a run may leave in model_dir: a directory holding anything else is not a run's.
RUN_ENTRIES = frozenset(RUN_OUTPUTS) | {FEATURE_CACHE_DIR, FOLDER_CHECK_DIR, LOCK_FILE}


def check_paths(config: config_lib.Config):
    """The file-system side of validation: paths the flags name must exist and be of the right kind."""
    if config.model_dir and os.path.exists(config.model_dir) and not os.path.isdir(config.model_dir):
        _fail("--model_dir exists and is not a directory", model_dir=config.model_dir)
    if folder_dataset.is_folder(config.dataset):
        folder = folder_dataset.folder_path(config.dataset)
        if not folder or not os.path.isdir(folder):
            _fail("--dataset=folder:PATH needs PATH to be a directory with one subfolder per class",
                  dataset=config.dataset)
    if config.weights_path is not None and not os.path.isfile(config.weights_path):
        _fail("--weights file does not exist", weights=config.weights)
    if config.mode == "train" and os.path.isdir(config.model_dir or ""):
        _check_holds_a_run(config.model_dir)


def _check_holds_a_run(model_dir: str):
    """Training writes (and --overwrite removes) only in a directory that is empty or holds a run, so
    that --model_dir=$HOME --overwrite cannot touch ~/logs."""
    if os.path.exists(os.path.join(model_dir, CONFIG_FILE)):
        return
    foreign = sorted(set(os.listdir(model_dir)) - RUN_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(f"--model_dir holds files that are not a tl_keras run ({shown}); tl_keras writes "
                        "only to a new, empty or earlier tl_keras model_dir. "
                        f"Received: model_dir={model_dir}")


@contextlib.contextmanager
def lock(model_dir: str):
    """Hold model_dir for this process alone, or refuse with the holder's pid.

    An advisory lock (flock) on model_dir/.lock: the kernel releases it when the process ends, so even
    a kill -9 leaves no stale lock behind. Two runs on one model_dir would delete each other's files.
    """
    try:
        os.makedirs(model_dir, exist_ok=True)
        fd = os.open(os.path.join(model_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"--model_dir is not a writable directory ({e.strerror}). "
                        f"Received: model_dir={model_dir}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise UserError(f"--model_dir is in use by another tl_keras process (pid {holder}); wait for it "
                            f"to finish or stop it. Received: model_dir={model_dir}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # Closing releases the lock.


def prepare(config: config_lib.Config):
    """Create model_dir, refuse a run whose saved settings differ, and record this run's settings."""
    try:
        os.makedirs(config.model_dir, exist_ok=True)
        files.write_text(os.path.join(config.model_dir, ".write_test"), "")
        os.remove(os.path.join(config.model_dir, ".write_test"))
    except OSError as e:
        raise UserError(f"--model_dir is not a writable directory ({e.strerror}). "
                        f"Received: model_dir={config.model_dir}") from None
    saved_path = os.path.join(config.model_dir, CONFIG_FILE)
    if config.mode == "train" and config.overwrite:
        for name in RUN_OUTPUTS:
            path = os.path.join(config.model_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    saved = files.read_json(saved_path)
    if saved is not None:
        if config.mode == "train":
            fields = set(saved) - config_lib.names(config_lib.RUNTIME, config_lib.LOCATION)
            hint = "pass --overwrite to start fresh, or use another --model_dir"
        else:
            fields = config_lib.names(config_lib.ARCHITECTURE)
            hint = "pass the run's own flags: --flagfile=MODEL_DIR/flags.txt"
        diffs = config_lib.differences(saved, config, fields)
        if diffs:
            raise UserError(f"--model_dir holds a run with other settings ({'; '.join(diffs)}); {hint}. "
                            f"Received: model_dir={config.model_dir}")
    if config.mode == "train":
        files.write_text(os.path.join(config.model_dir, FLAGS_FILE), config.to_flagfile())
        files.write_json(saved_path, dataclasses.asdict(config))


def check_dataset(config: config_lib.Config, class_names, fingerprint: str | None):
    """The trained run defines the classes: the first training records them (labels.txt, and
    dataset.json with the folder's fingerprint); every later mode must find the same classes, and a
    resumed training the same files. A renamed class folder would otherwise relabel the export."""
    model_dir = config.model_dir
    saved = files.read_json(os.path.join(model_dir, DATASET_FILE))
    if saved is None and os.path.exists(os.path.join(model_dir, LABELS_FILE)):  # Runs before dataset.json.
        with open(os.path.join(model_dir, LABELS_FILE), encoding="utf-8") as f:
            saved = {"class_names": f.read().splitlines()}
    if saved is None:
        if config.mode == "train":
            files.write_text(os.path.join(model_dir, LABELS_FILE), "\n".join(class_names) + "\n")
            files.write_json(os.path.join(model_dir, DATASET_FILE),
                             {"class_names": list(class_names), "fingerprint": fingerprint})
        return
    if list(saved["class_names"]) != list(class_names):
        raise UserError(f"--dataset's classes differ from the run's ({_names(saved['class_names'])} -> "
                        f"{_names(class_names)}); use the data the run was trained on. "
                        f"Received: dataset={config.dataset}")
    if config.mode == "train" and saved.get("fingerprint") and fingerprint != saved["fingerprint"]:
        raise UserError("The images of --dataset changed since the run began (files added, removed or "
                        "replaced); restore them, or pass --overwrite to start fresh. "
                        f"Received: dataset={config.dataset}")


def _names(class_names, limit: int = 8) -> str:
    names = list(class_names)
    return ", ".join(names[:limit] + (["..."] if len(names) > limit else []))


def read_metrics(model_dir: str) -> dict:
    return files.read_json(os.path.join(model_dir, METRICS_FILE), default={})


def update_metrics(model_dir: str, new: dict):
    """Merge `new` into metrics.json; what other stages wrote stays."""
    metrics = read_metrics(model_dir)
    metrics.update(new)
    files.write_json(os.path.join(model_dir, METRICS_FILE), metrics)


def _fail(message: str, **received):
    (name, value), = received.items()
    raise UserError(f"{message}. Received: {name}={value}")
