"""TensorBoard logs that answer a practitioner's questions about a run.

Layout under model_dir/logs (each folder is a TensorBoard run):
- train/: epoch_* scalars at step = epoch (0-based, continuing across the stages) and, every
  --log_every_steps, batch_* scalars at step = global train step (1-based, also continuing);
  the augmented-input grid; profiler traces under plugins/profile/.
- validation/: epoch_* scalars of the per-epoch validation pass.
- test/: epoch_* scalars, the confusion matrix and misclassified examples at the end of each
  stage, at step = the stage's last epoch.
- the folder itself: HParams (with stage_end/* scalars as its metrics), the effective flags and
  the model summary per stage.

epoch_stage and batch_stage are the stage's index; texts and image descriptions name it as well.

A resumed run first calls trim_logs, which drops what it is about to write again.

All stages share one RunSummaries, so curves, steps and writers continue across their fit() calls
even though each stage compiles a fresh optimizer and may fit a different model (a head on cached
features, or the upper backbone on stored activations).
"""

import dataclasses
import glob
import math
import os
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from tl_keras import config as config_lib
from tl_keras import files
from tl_keras.data import augment
from tl_keras.data import pipeline
from tl_keras.model import backbones
from tl_keras.reporting import evaluation
from tl_keras.reporting import images

GRID_EXAMPLES = 16  # Augmented inputs and misclassified examples shown per grid.
# The timed train_function relies on how this Keras's fit() calls train_function(iterator); under any
# other version it is left out (and *_input_wait with it) rather than risk breaking training.
TESTED_KERAS = "3.15"
# Written once when a run starts, and not again when it resumes.
RUN_START_TAGS = frozenset({"augmented_inputs", "flags", "plan", "_hparams_/experiment",
                            "_hparams_/session_start_info"})
# HParams metrics, written to logs/ itself as stage_end/NAME at the end of each stage; the table
# shows each one's last value. (The plugin cannot find metrics in subfolders of a session that is
# the logdir itself, so they are not read from train/, validation/ and test/.)
HPARAM_METRICS = (
    ("test_accuracy", "test accuracy"),
    ("test_top5_accuracy", "test top-5 accuracy"),
    ("test_loss", "test loss"),
    ("validation_accuracy", "validation accuracy"),
    ("validation_loss", "validation loss"),
    ("train_accuracy", "train accuracy"),
    ("train_loss", "train loss"),
    ("train_throughput", "train img/s"),
)


class RunSummaries:
    """The run's summary writers and what every stage needs to log consistently."""

    def __init__(self, config, splits: pipeline.Splits, steps_per_epoch: int):
        self.config = config
        self.splits = splits
        self.steps_per_epoch = steps_per_epoch
        self.log_dir = os.path.join(config.model_dir, "logs")
        self.writers = {name: tf.summary.create_file_writer(os.path.join(self.log_dir, name))
                        for name in ("train", "validation", "test")}
        self.writers["run"] = tf.summary.create_file_writer(self.log_dir)
        self.train_examples = min(splits.num_train, steps_per_epoch * config.batch_size)
        self.validation_examples = _capped(splits.num_validation, config.eval_steps, config.batch_size)
        self.profiling = False
        self.profiled = False
        self.last_epoch = {}  # The latest epoch's scalars, by run: what stage_end/ reports.
        self.stages = {}  # Stage index -> _StageState, shared by that stage's fit() calls.
        self.warned_keras = False

    def write_run_start(self, plan: str | None = None):
        """HParams, the effective flags, a --time_budget run's plan, and a grid of augmented inputs."""
        with self.writers["run"].as_default(step=0):
            if plan:
                tf.summary.text("plan", plan)
            hparams = hparams_of(self.config)
            hp.hparams_config(
                hparams=[hp.HParam(name) for name in hparams],
                metrics=[hp.Metric(f"stage_end/{tag}", display_name=name) for tag, name in HPARAM_METRICS])
            hp.hparams(hparams, trial_id=os.path.abspath(self.config.model_dir))
            tf.summary.text("flags", flags_markdown(self.config))
        pictures, labels = self.augmented_examples()
        captions = [label_caption(label, self.splits.class_names) for label in labels]
        with self.writers["train"].as_default(step=0):
            tf.summary.image("augmented_inputs", images.captioned_grid(pictures, captions)[None],
                             description=f"Training inputs after augmentation ({self.config.augment}), "
                                         "preprocessing undone; mixed labels show each class's share.")
        self.flush()

    def augmented_examples(self):
        """A batch from the training pipeline's own code, on a few examples: what the model sees.
        Returns (uint8 pictures, labels [N, C]: one-hot, or soft for mixup and cutmix)."""
        config = self.config
        preprocess = pipeline.Preprocessing.of(backbones.get_preprocess_input(config.backbone),
                                               config.image_size)
        batch = pipeline.build_train_dataset(
            self.splits.train.take(GRID_EXAMPLES), preprocess, GRID_EXAMPLES,
            self.splits.num_classes, augment.Augmentation.from_config(config), config.seed)
        pictures, labels = next(iter(batch))
        unpreprocess = backbones.get_inverse_preprocessing(config.backbone)
        return unpreprocess(pictures.numpy()), labels.numpy()

    def stage_callback(self, stage: int, name: str, classifier: keras.Model, initial_epoch: int,
                       learning_rate, step_offset: int = 0) -> keras.callbacks.Callback:
        """A new callback for one fit() of stage `stage` (its index) called `name`, which began
        `step_offset` steps into its first epoch (a resumed partial epoch). What outlives one fit() is
        kept here, per stage."""
        state = self.stages.setdefault(stage, _StageState())
        return StageSummaries(self, state, stage, name, classifier, initial_epoch, learning_rate, step_offset)

    def write_stage_end(self, stage: int, name: str, epoch: int, result: evaluation.Evaluation,
                        metrics: dict) -> np.ndarray:
        """Test metrics, the confusion matrix and the worst mistakes at the stage's end.

        `result` evaluates the stage's test batches, which follow the raw test split's order;
        `metrics` are its prefixed metrics (test_loss, ...) and whatever else the stage reports.
        Returns the indices of the mistakes drawn, worst first.
        """
        ends = dict(metrics)
        for run, values in self.last_epoch.items():
            ends.update({f"{run}_{name}": value for name, value in values.items()})
        with self.writers["run"].as_default(step=epoch):
            for metric, _ in HPARAM_METRICS:
                if metric in ends:
                    tf.summary.scalar(f"stage_end/{metric}", ends[metric])
        names = self.splits.class_names
        label = f"Stage {stage} ({name})"
        matrix = evaluation.confusion_matrix(result.labels, result.predictions, len(names))
        grid, shown = evaluation.misclassified_image(result, self.splits.test, names, GRID_EXAMPLES)
        with self.writers["test"].as_default(step=epoch):
            for metric, value in result.metrics.items():
                tf.summary.scalar(f"epoch_{metric}", value)
            tf.summary.scalar("epoch_stage", stage)
            tf.summary.image("confusion_matrix", images.confusion_matrix_image(matrix, names)[None],
                             description=f"{label} on {len(result.labels)} test examples: rows are "
                                         "true classes, columns predicted; shade is the share of the row.")
            tf.summary.text("confusion_matrix_counts", confusion_matrix_markdown(matrix, names))
            if len(shown):
                tf.summary.image("misclassified", grid[None],
                                 description=f"{label}: the {len(shown)} most confident mistakes "
                                             "on the test split, with true and predicted labels.")
        self.flush()
        return shown

    def write_model_summary(self, label: str, classifier: keras.Model, fitted: keras.Model, step: int):
        lines = []
        classifier.summary(print_fn=lambda text, **_: lines.append(text))
        trainable = sum(math.prod(w.shape) for w in fitted.trainable_weights)
        header = (f"{label} fits `{fitted.name}` ({trainable:,} trainable parameters); "
                  f"the classifier it trains:\n\n")
        with self.writers["run"].as_default(step=step):
            tf.summary.text("model_summary", header + _code_block("\n".join(lines)))

    def start_profiler(self, step: int):
        try:
            tf.profiler.experimental.start(os.path.join(self.log_dir, "train"))
        except (tf.errors.AlreadyExistsError, tf.errors.UnavailableError) as e:
            logging.warning("Could not start the profiler at step %d: %s", step, e)
            self.profiled = True
            return
        self.profiling = self.profiled = True
        logging.info("Profiler started at step %d.", step)

    def stop_profiler(self, step: int):
        if self.profiling:
            tf.profiler.experimental.stop()
            self.profiling = False
            logging.info("Profiler stopped after step %d; trace in %s.", step,
                         os.path.join(self.log_dir, "train", "plugins", "profile"))

    def flush(self):
        for writer in self.writers.values():
            writer.flush()

    def close(self):
        self.stop_profiler(-1)
        for writer in self.writers.values():
            writer.close()


@dataclasses.dataclass
class _Interval:
    """Sums since the last batch-level point: steps, seconds, input wait, metric totals."""

    steps: int = 0
    seconds: float = 0.0
    wait: float = 0.0
    totals: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _StageState:
    """What one stage's fit() calls share: a resumed partial epoch's steps after its last batch-level
    point count towards the next point, written by the next fit()."""

    interval: _Interval = dataclasses.field(default_factory=_Interval)
    summarized: bool = False  # The model summary is written once per stage.


class StageSummaries(keras.callbacks.Callback):
    """Epoch and step scalars for one fit() of a stage, on the run's global epoch and step axes.

    Keras reports running means since the epoch began; batch_* scalars are the means over the
    steps since the previous point, recovered from those running means (k * mean_k - j * mean_j).

    Input wait: after each fit()'s first step (which traces the step function), the callback
    fetches each batch itself, timed, and hands it to Keras's compiled step, instead of letting the
    step fetch it in-graph. Time blocked in that fetch is time the accelerator had nothing to do
    because the tf.data pipeline was behind; *_input_wait is its share of the training wall time.
    Near 0: the input keeps up; near 1: input-bound. Under a Keras other than TESTED_KERAS the fetch
    is not timed and *_input_wait is not written.
    """

    def __init__(self, board: RunSummaries, state: _StageState, stage: int, name: str,
                 classifier: keras.Model, initial_epoch: int, learning_rate, step_offset: int = 0):
        super().__init__()
        self.board = board
        self.state = state
        self.stage = stage
        self.name = name
        self.classifier = classifier
        self.initial_epoch = initial_epoch
        self.learning_rate = learning_rate
        self.step_offset = step_offset  # Steps of the first epoch done before this fit() began.
        config = board.config
        self.log_every = config.log_every_steps or 0
        self.profile_steps = config.profile_steps
        self._unwrapped = None
        self._times_input = False
        self._step = initial_epoch * board.steps_per_epoch

    # Fit begin/end: model summary, the timed fetch, profiler.

    def on_train_begin(self, logs=None):
        if not self.state.summarized:
            self.board.write_model_summary(f"Stage {self.stage} ({self.name})", self.classifier, self.model,
                                           self.initial_epoch)
            self.state.summarized = True
        self._times_input = _keras_is_tested(self.board)
        if self._times_input:
            self._wrap_train_function()

    def on_train_end(self, logs=None):
        if self._unwrapped is not None:
            self.model.train_function, self._unwrapped = self._unwrapped, None
        self.board.stop_profiler(self._step)
        self.board.flush()

    def _wrap_train_function(self):
        train_function = self.model.train_function
        if train_function is None or getattr(self.model, "steps_per_execution", 1) != 1:
            return
        self._unwrapped = train_function
        first = [True]

        def timed_train_function(iterator):
            if first[0] or not isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
                # Keras's own first step traces the step for any batch size; later calls reuse it.
                first[0] = False
                return train_function(iterator)
            start = time.perf_counter()
            batch = next(iterator)  # Blocks until the pipeline's prefetch buffer has a batch.
            waited = time.perf_counter() - start
            self.state.interval.wait += waited
            self._epoch_wait += waited
            # Keras runs its compiled step on each batch of a plain Python iterator.
            return train_function(iter([batch]))

        self.model.train_function = timed_train_function

    # Epochs.

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = self._last_batch_end = time.perf_counter()
        self._segment_start = None
        self._epoch_wait = 0.0
        self._batches = 0
        self._read = _Interval()  # Running totals at the last point read in this epoch.
        self._train_seconds = None
        self._validation_start = self._validation_seconds = None

    def on_train_batch_begin(self, batch, logs=None):
        self._step = self._epoch * self.board.steps_per_epoch + self.step_offset + batch + 1
        if (self.profile_steps and not self.board.profiled
                and self.profile_steps[0] <= self._step <= self.profile_steps[1]):
            self.board.start_profiler(self._step)
        if self._segment_start is None:
            self._segment_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._batches = batch + 1
        if self.board.profiling and self._step >= self.profile_steps[1]:
            self.board.stop_profiler(self._step)
        point = self.log_every and self._step % self.log_every == 0
        if point or self._batches == self.board.steps_per_epoch - self.step_offset:
            _scalars(logs)  # Waits for the step to finish, so the clock below is true on GPUs too.
        self._last_batch_end = time.perf_counter()
        if point:
            self._write_step_point(logs)

    def _write_step_point(self, logs):
        self._close_segment()
        self._advance(self._batches, _scalars(logs))
        interval, self.state.interval = self.state.interval, _Interval()
        with self.board.writers["train"].as_default(step=self._step):
            for name, total in interval.totals.items():
                tf.summary.scalar(f"batch_{name}", total / interval.steps)
            tf.summary.scalar("batch_learning_rate", self._current_learning_rate())
            self._write_speed("batch", interval.steps * self.board.config.batch_size, interval.seconds,
                              interval.wait)
            tf.summary.scalar("batch_stage", self.stage)
        self._segment_start = time.perf_counter()

    def _advance(self, batches: int, means: dict):
        """Move the interval to `batches` steps into the epoch, whose running means are `means`."""
        interval = self.state.interval
        totals = {name: batches * mean for name, mean in means.items()}
        for name, total in totals.items():
            interval.totals[name] = interval.totals.get(name, 0.0) + total - self._read.totals.get(name, 0.0)
        interval.steps += batches - self._read.steps
        self._read = _Interval(steps=batches, totals=totals)

    def _close_segment(self):
        """Stop the interval's clock at the last step's end (validation is not training time)."""
        if self._segment_start is not None:
            self.state.interval.seconds += self._last_batch_end - self._segment_start
            self._segment_start = None

    def on_test_begin(self, logs=None):
        self._close_segment()
        self._train_seconds = self._last_batch_end - self._epoch_start
        self._validation_start = time.perf_counter()

    def on_test_end(self, logs=None):
        self._validation_seconds = time.perf_counter() - self._validation_start

    def on_epoch_end(self, epoch, logs=None):
        self._close_segment()
        if self._train_seconds is None:
            self._train_seconds = self._last_batch_end - self._epoch_start
        values = _scalars(logs)
        train = {k: v for k, v in values.items() if not k.startswith("val_")}
        validation = {k[len("val_"):]: v for k, v in values.items() if k.startswith("val_")}
        # Steps after the epoch's last batch-level point count towards the next point.
        self._advance(self._batches, train)

        board = self.board
        examples = min(board.train_examples, self._batches * board.config.batch_size)
        board.last_epoch = {"train": dict(train, throughput=examples / max(self._train_seconds, 1e-9)),
                            "validation": validation}
        with board.writers["train"].as_default(step=epoch):
            for name, value in train.items():
                tf.summary.scalar(f"epoch_{name}", value)
            tf.summary.scalar("epoch_learning_rate", self._current_learning_rate())
            self._write_speed("epoch", examples, self._train_seconds, self._epoch_wait)
            tf.summary.scalar("epoch_stage", self.stage)
        if validation:
            with board.writers["validation"].as_default(step=epoch):
                for name, value in validation.items():
                    tf.summary.scalar(f"epoch_{name}", value)
                seconds = self._validation_seconds
                if seconds:
                    tf.summary.scalar("epoch_throughput", board.validation_examples / seconds)
                    tf.summary.scalar("epoch_time", seconds)
        board.flush()
        self.step_offset = 0  # Later epochs of this fit() start at their first step.

    def _write_speed(self, prefix: str, examples: int, seconds: float, wait: float):
        seconds = max(seconds, 1e-9)
        tf.summary.scalar(f"{prefix}_throughput", examples / seconds,
                          description="Training images per second.")
        if prefix == "epoch":
            tf.summary.scalar("epoch_time", seconds, description="Seconds of training steps.")
        if self._times_input:
            tf.summary.scalar(f"{prefix}_input_wait", min(1.0, wait / seconds),
                              description="Share of the time spent waiting for the input pipeline.")

    def _current_learning_rate(self) -> float:
        """The learning rate of the step just taken (a schedule is read at the step before)."""
        if isinstance(self.learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            step = max(0, int(self.model.optimizer.iterations.numpy()) - 1)
            return float(self.learning_rate(step))
        return float(self.learning_rate)


def _keras_is_tested(board: RunSummaries) -> bool:
    """Whether this Keras is the one the timed train_function was written for; warns once if not."""
    version = ".".join(keras.__version__.split(".")[:2])
    if version == TESTED_KERAS:
        return True
    if not board.warned_keras:
        logging.warning("The input-wait timing was written for Keras %s, found %s: training runs "
                        "untimed and *_input_wait is not logged.", TESTED_KERAS, keras.__version__)
        board.warned_keras = True
    return False


def _scalars(logs) -> dict:
    """Keras logs as Python floats (reading them waits for the step that produced them)."""
    out = {}
    for name, value in (logs or {}).items():
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _capped(num_examples: int, steps: int | None, batch_size: int) -> int:
    return min(num_examples, steps * batch_size) if steps else num_examples


def label_caption(label, class_names) -> list:
    """A grid caption for a label vector: the class name, or for a mixed label (mixup, cutmix) the two
    largest shares, one line each ("dog 62%", "cat 38%")."""
    label = np.asarray(label, np.float64)
    top = np.argsort(-label, kind="stable")[:2]
    if label[top[0]] >= 1.0 - 1e-6:
        return [(class_names[top[0]], images.INK)]
    return [(f"{class_names[c]} {label[c]:.0%}", images.INK) for c in top if label[c] > 0]


def hparams_of(config) -> dict:
    """The config as HParams values: scalars as they are, lists as text; unset ones left out."""
    values = {}
    location = config_lib.names(config_lib.LOCATION)  # Where a run lives, not what it does.
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in location or value is None:
            continue
        values[field.name] = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return values


def flags_markdown(config) -> str:
    rows = ["| flag | value |", "| --- | --- |"]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        rows.append(f"| `--{field.name}` | " + ("unset |" if value is None else f"`{value}` |"))
    return "Effective flags of this run (also in `flags.txt`).\n\n" + "\n".join(rows)


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def confusion_matrix_markdown(matrix: np.ndarray, class_names) -> str:
    n = len(class_names)
    rows = ["| true \\ predicted | " + " | ".join(class_names) + " | recall |",
            "| --- " * (n + 2) + "|"]
    for i, name in enumerate(class_names):
        total = matrix[i].sum()
        recall = f"{matrix[i, i] / total:.1%}" if total else "-"
        rows.append(f"| **{name}** | " + " | ".join(str(c) for c in matrix[i]) + f" | {recall} |")
    return "\n".join(rows)


def trim_logs(log_dir: str, epoch: int, global_step: int):
    """Drop summaries a resumed run is about to write again, so curves never hold a step twice.

    Per-step tags (`batch_*`, on the global step axis) go after `global_step`; everything written per
    epoch or stage (on the epoch axis) goes from `epoch` on; RUN_START_TAGS stay. Each event file that
    loses a summary is rewritten atomically.
    """
    def keep(tag, step):
        if tag in RUN_START_TAGS:
            return True
        if tag.startswith("batch_"):
            return step <= global_step
        return step < epoch

    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        if path.endswith(".tmp"):  # An interrupted rewrite's leftover; atomic_path replaces it.
            continue
        kept, dropped = [], 0
        records = tf.data.TFRecordDataset(path).as_numpy_iterator()
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except tf.errors.DataLossError:  # A torn last record (a kill or a full disk mid-flush).
                logging.warning("Dropped the truncated end of %s.", path)
                dropped += 1
                break
            event = tf.compat.v1.Event.FromString(record)
            tags = [value.tag for value in event.summary.value]
            if tags and not all(keep(tag, event.step) for tag in tags):
                dropped += 1
            else:
                kept.append(record)
        if dropped:
            with files.atomic_path(path) as tmp, tf.io.TFRecordWriter(tmp) as writer:
                for record in kept:
                    writer.write(record)
            logging.info("Dropped %d summaries past epoch %d (step %d) from %s.", dropped, epoch,
                         global_step, path)
