"""--ema_decay: Keras's own exponential moving average of the weights (the optimizer's use_ema=True),
kept exact across the several fit() calls of a stage and across processes.

What Keras does: after each step the optimizer updates average = decay * average + (1 - decay) *
weights (the first step copies the weights), in variables of its own, and every fit() ends with
finalize_variable_values, which overwrites the weights with the average.

What tl_keras adds, so that the run trains the raw weights and measures the average:
- The model holds the raw weights while it trains; validation (SwapForEvaluation), latest.weights.h5,
  best.weights.h5 and the early-stopping best (`averaged`) see the average. The swap copies values,
  which is exact: keras.callbacks.SwapEMAWeights swaps by addition and subtraction under TensorFlow,
  which rounds, so every validation pass would nudge the raw weights.
- The resumable state stores the raw weights with the optimizer, whose variables include the average
  ('..._average', by name like every optimizer variable), so a resume continues both.
- A stage runs one fit() per stretch of epochs, and one more for a resumed partial epoch or a short
  last epoch. A fit() that is not the stage's last gets its raw weights back after finalize
  (TrainingWeights), so the number of fit() calls never changes the result. The stage's last fit()
  ends with the average in the model: the stage is evaluated, saved and exported with it
  (`use_average` does the same for a resumed stage that has no fit() left to run).

The average restarts with each stage, from the weights the stage starts with (the previous stage's
average). Each stage compiles a fresh optimizer for a different set of trainable variables; a frozen
variable has no average to carry, and averaging a head trained on frozen features into one that
follows moving features would mix two different problems.
"""

import contextlib

from absl import logging
import keras
import numpy as np

from tl_keras.errors import UserError


def enable(optimizer: keras.optimizers.Optimizer, decay: float):
    """Turn on Keras's weight averaging with momentum `decay` on the optimizer(s) that update weights:
    Adam itself, each Adam of a MultiOptimizer (--layerwise_lr_decay), the one inside a
    LossScaleOptimizer. Before the optimizer is built, since building creates the average variables."""
    if not 0.0 < decay < 1.0:
        raise UserError(f"--ema_decay must be in (0, 1), such as 0.999. Received: ema_decay={decay}")
    for leaf in leaf_optimizers(optimizer):
        if leaf.built:
            raise ValueError(f"Optimizer {leaf.name} is built: turn on averaging before its first step.")
        # What Optimizer.__init__(use_ema=True, ema_momentum=decay) stores; build_optimizer knows nothing
        # of averaging, so it is set here for every optimizer it may return.
        leaf.use_ema = True
        leaf.ema_momentum = float(decay)
        leaf.ema_overwrite_frequency = None


def leaf_optimizers(optimizer) -> list:
    """The optimizers that apply updates to weights, unwrapping a LossScaleOptimizer and a MultiOptimizer."""
    if optimizer is None:
        return []
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return leaf_optimizers(optimizer.inner_optimizer)
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        return [leaf for sub in optimizer.optimizers for leaf in leaf_optimizers(sub)]
    return [optimizer]


def enabled(optimizer) -> bool:
    return any(getattr(leaf, "use_ema", False) for leaf in leaf_optimizers(optimizer))


def pairs(optimizer) -> list:
    """(weight, its average) of every weight that an averaging optimizer has stepped at least once; an
    unbuilt or unstepped optimizer has no average yet (its variables are zeros)."""
    found = []
    for leaf in leaf_optimizers(optimizer):
        if not (getattr(leaf, "use_ema", False) and leaf.built and int(leaf.iterations.numpy()) > 0):
            continue
        for variable, average in zip(leaf._trainable_variables, leaf._model_variables_moving_average):
            if average is not None:
                found.append((variable, average))
    return found


def swap(optimizer):
    """Exchange each weight's value with its average's, by copying (exact)."""
    for variable, average in pairs(optimizer):
        raw = np.array(variable.numpy())
        variable.assign(average.numpy())
        average.assign(raw)


@contextlib.contextmanager
def averaged(optimizer):
    """The averages in the model for the length of the block; the raw weights back afterwards."""
    swap(optimizer)
    try:
        yield
    finally:
        swap(optimizer)


def use_average(optimizer) -> bool:
    """Set the weights to their averages, as a fit() ends (finalize_variable_values). Returns whether
    there was an average."""
    found = pairs(optimizer)
    for variable, average in found:
        variable.assign(average.numpy())
    return bool(found)


class SwapForEvaluation(keras.callbacks.Callback):
    """Validation inside fit() measures the averaged weights, and training resumes with the raw ones."""

    def on_test_begin(self, logs=None):
        swap(self.model.optimizer)

    def on_test_end(self, logs=None):
        swap(self.model.optimizer)


class TrainingWeights(keras.callbacks.Callback):
    """Keep the raw weights of the fit's last epoch (finalize_variable_values overwrites them with the
    averages as fit() returns), for `restore` when the stage goes on with another fit()."""

    def __init__(self):
        super().__init__()
        self.raw = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.params["epochs"] - 1 or self.model.stop_training:
            self.raw = [(variable, np.array(variable.numpy())) for variable, _ in pairs(self.model.optimizer)]

    def restore(self):
        for variable, value in self.raw or []:
            variable.assign(value)


def warn_if_short(decay: float, steps: int, label: str):
    """An average over about 1 / (1 - decay) steps in a stage with fewer: Keras's average starts at the
    first step's weights and has no warmup, so it would still lean on them."""
    horizon = round(1.0 / (1.0 - decay))
    if steps < horizon:
        logging.warning("%s runs %d steps, fewer than the %d that --ema_decay=%g averages over: its average "
                        "still weighs its first steps' weights by %.0f%%. A smaller decay suits it, such as "
                        "%g.", label, steps, horizon, decay, 100 * decay ** max(0, steps - 1),
                        _suggested(steps))


def _suggested(steps: int) -> float:
    """The largest of 0.9, 0.99, 0.999, 0.9999 whose horizon is at most a third of `steps`."""
    fitting = [d for d in (0.99, 0.999, 0.9999) if 1.0 / (1.0 - d) <= steps / 3]
    return fitting[-1] if fitting else 0.9
