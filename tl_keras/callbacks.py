"""Callbacks shared by both phases: resumable checkpoints of the full classifier (TensorBoard:
summaries.py)."""

import glob
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
                    steps_per_epoch: int, save_every_steps: int | None = None, extra=()):
    """The callbacks for one phase's fit(): `extra` (TensorBoard summaries), then the checkpoint, which
    comes last so that it saves only after the epoch has been logged."""
    return [
        *extra,
        TrainingCheckpoint(classifier, model_dir, state, steps_per_epoch, save_every_steps),
    ]


# Written once when a run starts, and not again when it resumes.
RUN_START_TAGS = frozenset({"augmented_inputs", "flags", "_hparams_/experiment",
                            "_hparams_/session_start_info"})


def trim_logs(log_dir: str, epoch: int, global_step: int):
    """Drop summaries a resumed run is about to write again, so curves never hold a step twice.

    Per-step tags (`batch_*`, on the global step axis) go after `global_step`; everything written per
    epoch or phase (on the epoch axis) goes from `epoch` on. Each event file is rewritten atomically.
    """
    def keep(tag, step):
        if tag in RUN_START_TAGS:
            return True
        if tag.startswith("batch_"):
            return step <= global_step
        return step < epoch

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
