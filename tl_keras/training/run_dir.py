"""The run directory (model_dir): what a run keeps there, and the checks before anything is written.

    model_dir/
      config.json, flags.txt   the settings; `--flagfile=MODEL_DIR/flags.txt` repeats the run
      labels.txt               class names, one a line, in label order
      metrics.json             per-phase test metrics, the export path
      checkpoints/             resumable state (checkpointing.py), latest and best weights
      logs/                    TensorBoard (reporting/summaries.py)
      eval/                    --mode=evaluate's report (reporting/evaluation.py)
      export/N/                SavedModel versions (serving/export.py)
      feature_cache/           frozen activations (data/feature_cache.py)
"""

import dataclasses
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
EVAL_DIR = "eval"
EXPORT_DIR = "export"
LOG_DIR = "logs"
FEATURE_CACHE_DIR = "feature_cache"
# What --overwrite removes; the feature cache stays, since its key guards against stale use.
RUN_OUTPUTS = ("checkpoints", LOG_DIR, EXPORT_DIR, EVAL_DIR, METRICS_FILE, CONFIG_FILE, FLAGS_FILE)


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


def write_labels(model_dir: str, class_names):
    files.write_text(os.path.join(model_dir, LABELS_FILE), "\n".join(class_names) + "\n")


def read_metrics(model_dir: str) -> dict:
    return files.read_json(os.path.join(model_dir, METRICS_FILE), default={})


def update_metrics(model_dir: str, new: dict):
    """Merge `new` into metrics.json; what other phases wrote stays."""
    metrics = read_metrics(model_dir)
    metrics.update(new)
    files.write_json(os.path.join(model_dir, METRICS_FILE), metrics)


def _fail(message: str, **received):
    (name, value), = received.items()
    raise UserError(f"{message}. Received: {name}={value}")
