"""Callbacks shared by both phases: TensorBoard, and resumable checkpoints of the full classifier."""

import glob
import math
import os

from absl import logging
import keras
import tensorflow as tf

from tl_keras import checkpointing

LATEST = "latest.weights.h5"
BEST = "best.weights.h5"


class TrainingCheckpoint(keras.callbacks.Callback):
    """Save resumable state at each epoch end (and every `save_every_steps` steps), plus the
    classifier's latest and best (by validation accuracy) weights for evaluate and export.

    Phase 1 may fit a head-only model on cached features, so this saves `classifier` explicitly
    rather than whatever model fit() is running; the optimizer comes from the fitted model.
    """

    def __init__(self, classifier: keras.Model, model_dir: str, state: checkpointing.RunState,
                 steps_per_epoch: int, save_every_steps: int | None = None,
                 monitor: str = "val_accuracy"):
        super().__init__()
        self.classifier = classifier
        self.model_dir = model_dir
        self.state = state
        self.steps_per_epoch = steps_per_epoch
        self.save_every_steps = save_every_steps
        self.monitor = monitor
        self.step_offset = 0  # Steps of the current epoch done before this fit() began.

    def on_train_batch_end(self, batch, logs=None):
        done = self.step_offset + batch + 1
        if self.save_every_steps and done % self.save_every_steps == 0 and done < self.steps_per_epoch:
            self.state.step = done
            checkpointing.save_state(self.model_dir, self.state, self.classifier, self.model)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.step_offset = 0
        directory = checkpointing.checkpoint_dir(self.model_dir)
        save_weights_atomically(self.classifier, os.path.join(directory, LATEST))
        value = logs.get(self.monitor)
        if value is not None and value > self.state.best_value:
            self.state.best_value = float(value)
            save_weights_atomically(self.classifier, os.path.join(directory, BEST))
        self.state.epoch, self.state.step = epoch + 1, 0
        checkpointing.save_state(self.model_dir, self.state, self.classifier, self.model)


def save_weights_atomically(model: keras.Model, path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
    model.save_weights(tmp)
    os.replace(tmp, path)


def build_callbacks(classifier: keras.Model, model_dir: str, state: checkpointing.RunState,
                    steps_per_epoch: int, save_every_steps: int | None = None):
    """The callbacks for one phase's fit(); epochs continue across phases, so curves join up.
    The checkpoint comes last, so it saves only after TensorBoard has logged the epoch."""
    return [
        keras.callbacks.TensorBoard(log_dir=os.path.join(model_dir, "logs"), write_graph=False),
        TrainingCheckpoint(classifier, model_dir, state, steps_per_epoch, save_every_steps),
    ]


def trim_logs(log_dir: str, epoch: int, keep=None):
    """Drop summaries a resumed run is about to write again, so curves never hold a step twice.

    Epoch-level summaries (tags `epoch_*`) use the epoch as step: those at or after `epoch` go.
    `keep(tag, step)` may decide for other tags. Each event file is rewritten atomically.
    """
    if keep is None:
        keep = lambda tag, step: not tag.startswith("epoch_") or step < epoch  # noqa: E731
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        kept, dropped = [], 0
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags = [value.tag for value in event.summary.value]
            if tags and not all(keep(tag, event.step) for tag in tags):
                dropped += 1
                continue
            kept.append(record.numpy())
        if dropped:
            tmp = path + ".tmp"
            with tf.io.TFRecordWriter(tmp) as writer:
                for record in kept:
                    writer.write(record)
            os.replace(tmp, path)
            logging.info("Dropped %d summaries past epoch %d from %s.", dropped, epoch, path)
