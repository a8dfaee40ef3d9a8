"""Stopping a fit() safely: at the first non-finite loss, on SIGTERM or SIGINT, and when a stage stops
improving (--early_stopping_patience).

The first two stop inside fit() at a step boundary, so that what is on disk is a state the run can
resume from (the last good one for a divergence, the current step for a signal) and nothing is exported.
"""

import contextlib
import math
import signal
import threading

from absl import logging
import keras

from tl_keras.errors import Interrupted, UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Signals:
    """SIGTERM and SIGINT handlers for the length of a run.

    Inside fit() (`deferring`), a signal only sets `received`: the StopOnSignal callback then finishes
    the step, saves, and raises Interrupted. Anywhere else (data preparation, evaluation, export) the
    handler raises Interrupted at once: those parts keep nothing half-written (atomic writes), and the
    last saved state is where the rerun starts.
    """

    def __init__(self):
        self.received = None
        self.deferring = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there.
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        del frame
        first = self.received is None
        self.received = self.received or signum
        if self.deferring and first:
            logging.info("%s received: stopping after the current step.", signal.Signals(signum).name)
            return
        raise Interrupted(self.received, "before training had saved anything newer")

    @contextlib.contextmanager
    def defer(self):
        """While fit() runs: a signal waits for the end of the current step."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.received:  # Arrived during fit()'s last moments, after the callbacks could see it.
            raise Interrupted(self.received, "at the end of a fit")


class StopOnSignal(keras.callbacks.Callback):
    """After the step in which a signal arrived: save the mid-epoch state and raise Interrupted.

    `save(step)` saves the run's state `step` steps into the current epoch. A signal during the
    validation pass (after the epoch's last step) waits for the epoch's own save; this callback comes
    after the checkpoint callback, so that save has happened by on_epoch_end.
    """

    def __init__(self, signals: Signals, save, steps_per_epoch: int, step_offset: int = 0):
        super().__init__()
        self.signals = signals
        self.save = save
        self.steps_per_epoch = steps_per_epoch
        self.step_offset = step_offset

    def on_train_batch_end(self, batch, logs=None):
        done = self.step_offset + batch + 1
        if self.signals.received and done < self.steps_per_epoch:
            self.save(done)
            raise Interrupted(self.signals.received, f"after step {done} of epoch {self._epoch + 1}")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.step_offset = 0
        if self.signals.received:
            raise Interrupted(self.signals.received, f"at the end of epoch {epoch + 1}")


class StopOnDivergence(keras.callbacks.Callback):
    """Raise a one-line UserError at the first step whose loss is nan or inf.

    It comes before the checkpoint callback, so the diverged step is never saved: the last good
    checkpoint stays the one a rerun would start from, and no export is written.
    """

    def __init__(self, stage: str, steps_per_epoch: int, learning_rate, flag: tuple, step_offset: int = 0):
        super().__init__()
        self.stage = stage
        self.flag = flag  # (name, value) of the learning-rate flag, for the message's Received: part.
        self.steps_per_epoch = steps_per_epoch
        self.learning_rate = learning_rate
        self.step_offset = step_offset

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        step = self.step_offset + batch + 1
        iteration = int(self.model.optimizer.iterations.numpy())
        rate = self.learning_rate
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            rate = rate(max(0, iteration - 1))
        raise UserError(
            f"Training in {self.stage} diverged at step {step} of epoch {self._epoch + 1} (global step "
            f"{self._epoch * self.steps_per_epoch + step}): the loss is {float(loss)} at learning rate "
            f"{float(rate):g}. Nothing was exported; the last good checkpoint is kept. Lower the learning "
            f"rate and rerun with --overwrite. Received: {self.flag[0]}={self.flag[1]:g}")

    def on_epoch_end(self, epoch, logs=None):
        self.step_offset = 0


class StopWhenNotImproving(keras.callbacks.Callback):
    """End a stage after `patience` epochs without a better validation accuracy than the stage's best.

    keras.callbacks.EarlyStopping keeps its best value and counter in memory and resets them in
    on_train_begin; a stage runs several fit() calls (a resumed partial epoch has its own) and may
    span processes, so the best value, the counter and the stop live in the run's state (`state`,
    a checkpointing.RunState), which the checkpoint callback after this one saves. `save_best` stores
    the stage's best weights, which the stage loads back when it ends.
    """

    def __init__(self, state, patience: int, save_best, monitor: str = "val_accuracy"):
        super().__init__()
        self.state = state
        self.patience = patience
        self.save_best = save_best
        self.monitor = monitor

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        state = self.state
        if state.stage_best_value is None or value > state.stage_best_value:
            state.stage_best_value, state.stage_wait = float(value), 0
            self.save_best()
            return
        state.stage_wait += 1
        if state.stage_wait >= self.patience:
            state.stage_stopped = True
            self.model.stop_training = True
            logging.info("Early stopping after epoch %d: %s has not beaten %.4f for %d epochs.", epoch + 1,
                         self.monitor, state.stage_best_value, state.stage_wait)
