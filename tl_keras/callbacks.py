"""Callbacks shared by both phases: checkpoints of the full classifier (TensorBoard: summaries.py)."""

import math
import os

import keras

LATEST = "latest.weights.h5"
BEST = "best.weights.h5"


class ClassifierCheckpoint(keras.callbacks.Callback):
    """Save the full classifier's weights each epoch (latest) and when validation improves (best).

    Phase 1 may fit a head-only model on cached features, so this saves `classifier` explicitly
    rather than whatever model fit() is running. Writes go to a temporary file and are renamed, so a
    kill mid-write never leaves a truncated checkpoint.
    """

    def __init__(self, classifier: keras.Model, directory: str, monitor: str = "val_accuracy",
                 best_value: float = -math.inf):
        super().__init__()
        self.classifier = classifier
        self.directory = directory
        self.monitor = monitor
        self.best_value = best_value

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        save_weights_atomically(self.classifier, os.path.join(self.directory, LATEST))
        value = logs.get(self.monitor)
        if value is not None and value > self.best_value:
            self.best_value = float(value)
            save_weights_atomically(self.classifier, os.path.join(self.directory, BEST))


def save_weights_atomically(model: keras.Model, path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
    model.save_weights(tmp)
    os.replace(tmp, path)


def build_callbacks(classifier: keras.Model, model_dir: str, best_value: float = -math.inf, extra=()):
    """The callbacks for one phase's fit(): `extra` (e.g. TensorBoard summaries), then the checkpoint,
    which stays last so callers can read its best_value."""
    return [
        *extra,
        ClassifierCheckpoint(classifier, os.path.join(model_dir, "checkpoints"), best_value=best_value),
    ]
