"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2015;
fastai's `lr_find`): train a throwaway copy of the model for a few hundred steps while the rate rises
exponentially, record each step's loss, stop once the loss blows up, and suggest a rate from the curve.

The caller compiles (its own loss, label smoothing, precision and optimizer, a MultiOptimizer included),
so the curve is the one the real run would see; this module only supplies the rising rate, as a
schedule, and reads the losses back.
"""

import dataclasses
import math
import os

from absl import logging
import keras
import numpy as np

from tl_keras import errors, files
from tl_keras.reporting import images

# Why a run stopped: it reached max_lr; the smoothed loss rose past diverge_factor x its minimum; a
# loss was NaN or infinite; a finite `batches` ran out.
STOP_REASONS = ("max_lr", "diverged", "not_finite", "out_of_data")
# Fewer usable steps than this make no curve worth reading.
MIN_STEPS = 10
# The suggestion is read off a zero-lag smoothing whose time constant is this fraction of a decade of
# the rate (see `suggest`).
SUGGEST_SMOOTHING_DECADES = 0.5
RULE = "minimum/10"
# The minimum is the end of the low plateau: the last rate at which the smoothed loss is within this
# share of the lowest, or three times the noise of the raw losses about it in the first quarter
# (rates too low to change anything), whichever is more. On a curve
# that is flat until it diverges (fine-tuning a trained model) the lowest point is noise anywhere on the
# plateau; its end is where the loss starts to rise.
PLATEAU = 0.02


@dataclasses.dataclass
class Finding:
    """One range test. `learning_rates[i]` is the rate step i applied, `losses[i]` that step's batch
    loss (NaN where it was not finite), `smoothed[i]` their bias-corrected moving average."""
    learning_rates: list
    losses: list
    smoothed: list
    suggestion: float
    rule: str  # How `suggestion` was chosen, e.g. "minimum/10" (see `suggest`).
    stopped_reason: str  # One of STOP_REASONS.
    steps_run: int
    min_lr: float
    max_lr: float
    steps: int  # Planned; steps_run <= steps.
    beta: float
    diverge_factor: float

    def to_dict(self) -> dict:
        """Plain JSON data: non-finite losses become None (JSON has no NaN)."""
        data = dataclasses.asdict(self)
        for key in ("learning_rates", "losses", "smoothed"):
            data[key] = [float(v) if math.isfinite(v) else None for v in data[key]]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Finding":
        data = dict(data)
        for key in ("learning_rates", "losses", "smoothed"):
            data[key] = [math.nan if v is None else float(v) for v in data[key]]
        return cls(**data)


@keras.saving.register_keras_serializable(package="tl_keras")
class ExponentialRange(keras.optimizers.schedules.LearningRateSchedule):
    """min_lr at step 0, max_lr at step steps - 1, exponential in between, max_lr after. Driven by the
    optimizer's own iteration count, so it works wherever a schedule does (inside a MultiOptimizer's
    sub-optimizers too), and a step the loss scaler skips repeats its rate."""

    def __init__(self, min_lr: float, max_lr: float, steps: int):
        self.min_lr, self.max_lr, self.steps = float(min_lr), float(max_lr), int(steps)

    def __call__(self, step):
        fraction = keras.ops.minimum(keras.ops.cast(step, "float32") / float(self.steps - 1), 1.0)
        return self.min_lr * keras.ops.exp(fraction * math.log(self.max_lr / self.min_lr))

    def get_config(self):
        return {"min_lr": self.min_lr, "max_lr": self.max_lr, "steps": self.steps}


def find(model: keras.Model, batches, compile_fn, *, min_lr: float = 1e-7, max_lr: float = 10.0,
         steps: int = 100, beta: float = 0.98, diverge_factor: float = 4.0) -> Finding:
    """Run the range test on `model`, a throwaway copy: its weights and optimizer are changed.

    `batches` is an endless tf.data.Dataset of (images, one-hot labels) batches. `compile_fn(model,
    learning_rate)` compiles `model` with the given rate (here an `ExponentialRange` schedule), and
    with steps_per_execution=1, so that every step's loss is seen. It is called under the model's
    distribution strategy scope, and `fit` runs outside it, as in the real run.

    The test stops after `steps` steps, or early once the smoothed loss is above `diverge_factor` x
    its minimum so far, or a loss is not finite. Raises UserError when too few steps ran to suggest
    a rate.
    """
    _check_arguments(min_lr, max_lr, steps, beta, diverge_factor)
    schedule = ExponentialRange(min_lr, max_lr, steps)
    with model.distribute_strategy.scope():
        compile_fn(model, schedule)
    if model.steps_per_execution != 1:
        raise ValueError("The LR finder needs every step's loss: compile with steps_per_execution=1. "
                         f"Received: steps_per_execution={model.steps_per_execution}")
    recorder = _Recorder(schedule, beta, diverge_factor)
    model.fit(batches, epochs=1, steps_per_epoch=steps, callbacks=[recorder], verbose=0,
              shuffle=False)
    steps_run = len(recorder.losses)
    reason = recorder.reason or ("max_lr" if steps_run >= steps else "out_of_data")
    usable = usable_steps(steps_run, reason)
    if usable < MIN_STEPS:
        remedy = ("give it more batches" if reason == "out_of_data" else
                  f"start lower than min_lr={min_lr:g}, or raise steps")
        raise errors.UserError(
            f"The LR range test stopped ({reason}) after {steps_run} steps, too few to suggest a rate "
            f"(it needs {MIN_STEPS}); {remedy}. Received: steps_run={steps_run}")
    suggestion, rule = suggest(recorder.rates[:usable], recorder.losses[:usable])
    finding = Finding(
        learning_rates=recorder.rates, losses=recorder.losses, smoothed=recorder.smoothed,
        suggestion=suggestion, rule=rule, stopped_reason=reason, steps_run=steps_run, min_lr=float(min_lr),
        max_lr=float(max_lr), steps=int(steps), beta=float(beta), diverge_factor=float(diverge_factor))
    logging.info("LR range test: %d steps from %.3g to %.3g, stopped: %s. Suggested learning rate %.3g "
                 "(%s).", steps_run, recorder.rates[0], recorder.rates[-1], reason, suggestion, rule)
    return finding


def smooth(losses, beta: float) -> np.ndarray:
    """Exponential moving average, bias-corrected (divided by 1 - beta^(i+1)), so that it starts at
    the first loss instead of near zero. A non-finite loss makes it, and all after it, non-finite."""
    out = np.empty(len(losses))
    average = 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out[i] = average / (1 - beta ** (i + 1))
    return out


def usable_steps(steps_run: int, stopped_reason: str) -> int:
    """How many steps the suggestion reads: the step that stopped a diverging run is past the point
    the curve can speak for."""
    return steps_run - (stopped_reason in ("diverged", "not_finite"))


def zero_lag_smooth(learning_rates, losses) -> np.ndarray:
    """The losses smoothed without lag: forward and backward bias-corrected moving averages, averaged,
    with a time constant of SUGGEST_SMOOTHING_DECADES of a decade of the rate."""
    rates = np.asarray(learning_rates, np.float64)
    losses = np.asarray(losses, np.float64)
    steps_per_decade = (len(rates) - 1) / math.log10(rates[-1] / rates[0])
    beta = 1 - 1 / max(1.0, SUGGEST_SMOOTHING_DECADES * steps_per_decade)
    return (smooth(losses, beta) + smooth(losses[::-1], beta)[::-1]) / 2


def suggest(learning_rates, losses) -> tuple[float, str]:
    """(suggested rate, rule): a tenth of the rate at which the loss is lowest, located on a zero-lag
    smoothing of the raw losses (forward and backward bias-corrected moving averages, averaged, with
    a time constant of half a decade of the rate).

    Why not the plotted `smoothed` curve: a moving average with beta=0.98 lags about 50 steps, which
    over 100 steps from 1e-7 to 10 is 4 decades, so its minimum sits far right of the real one, and
    rules read off it have to guess the lag back. In simulated range tests of a softmax head and a
    one-hidden-layer head (Adam, batch 16 to 64, 50, 100 and 300 steps, 6-8 seeds each), training for
    300 steps at this rule's rate ended within 0.03 nats of the best constant rate of a grid in every
    setting, and its rate varied by 0.03-0.27 decades (sd) across seeds. fastai's "valley" rule was
    as good on the one-hidden-layer head, but a decade low on the softmax head (0.4 nats worse); the
    classic minimum/10 read off the lagging average was a decade high, and "steepest descent"
    followed the noise.

    "Lowest" is the end of the low plateau around the minimum (PLATEAU): a curve that is flat until it
    diverges, as fine-tuning a trained model gives, has its noisy minimum anywhere on the plateau (one
    at 1e-7 suggested 1e-7 for VGG16 on CIFAR-10), while the plateau's end is where the loss starts to
    rise. On a curve with a clear valley it moves the suggestion a little right of the valley's floor.

    Clamped to the first rate when that point lies within a decade of it (the loss only rose).
    `learning_rates` and `losses` must be the usable part of the curve: finite, before divergence.
    """
    rates = np.asarray(learning_rates, np.float64)
    losses = np.asarray(losses, np.float64)
    if len(rates) < MIN_STEPS or not np.all(np.isfinite(losses)):
        raise errors.UserError(f"Too short an LR range test curve to suggest a rate (it needs {MIN_STEPS} "
                               f"finite losses). Received: steps={len(rates)}")
    smooth = zero_lag_smooth(rates, losses)
    lowest = int(np.argmin(smooth))
    quiet = max(3, len(rates) // 4)
    tolerance = max(PLATEAU * abs(smooth[lowest]), 3 * float(np.std((losses - smooth)[:quiet])))
    best = rates[int(np.flatnonzero(smooth <= smooth[lowest] + tolerance)[-1])]
    if best / 10 < rates[0]:
        logging.warning("The LR range test's loss was lowest at %.3g, within a decade of its first rate: "
                        "the loss did not fall; a lower min_lr would show where it starts to.", best)
        return float(rates[0]), f"{RULE}, clamped to the first rate"
    return float(best / 10), RULE


def write_finding(finding: Finding, directory: str, name: str) -> dict:
    """Write NAME.json (the finding) and NAME.png (its curve) to `directory`; return their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {"json": os.path.join(directory, f"{name}.json"), "png": os.path.join(directory, f"{name}.png")}
    files.write_json(paths["json"], finding.to_dict())
    files.write_bytes(paths["png"], images.encode_png(plot(finding)))
    return paths


def plot(finding: Finding) -> np.ndarray:
    """The loss of each step, its moving average and the zero-lag curve the suggestion is read from,
    against the rate (log axis), the suggestion marked. The y axis ends at twice the starting loss
    (or the smoothed curves' top, if lower), so that the exploding last steps do not flatten the rest."""
    rates = np.asarray(finding.learning_rates, np.float64)
    raw = np.asarray(finding.losses, np.float64)
    lines = [images.ChartLine("loss of each step", rates, raw, images.LIGHT_BLUE),
             images.ChartLine(f"moving average (beta={finding.beta:g})", rates, finding.smoothed,
                              images.CHART_COLORS[0], 2)]
    usable = usable_steps(finding.steps_run, finding.stopped_reason)
    if usable >= 2 and np.all(np.isfinite(raw[:usable])):
        zero_lag = zero_lag_smooth(rates[:usable], raw[:usable])
        lines.append(images.ChartLine("zero-lag average (for the suggestion)", rates[:usable], zero_lag,
                                      images.CHART_COLORS[1], 2))
    curves = np.concatenate([np.asarray(line.ys, np.float64) for line in lines[1:]])
    curves = curves[np.isfinite(curves)]
    low = float(np.nanmin(raw)) if np.isfinite(raw).any() else 0.0
    high = float(curves.max()) if curves.size else low + 1.0
    start = float(np.median(raw[:max(1, usable // 10)])) if usable else math.nan
    if math.isfinite(start) and 2 * start > low:
        high = min(high, 2 * start)  # Twice the starting loss shows the rise; the blow-up is off the top.
    margin = 0.1 * (high - low) or 0.1 * abs(high) or 1.0
    return images.line_chart(
        lines, title=f"LR range test: {finding.steps_run} steps, stopped: {finding.stopped_reason}",
        x_label="learning rate", y_label="loss", log_x=True, y_limits=(low - margin, high + margin),
        marker=finding.suggestion, marker_label=f"suggested {finding.suggestion:.2g} ({finding.rule})")


class _Recorder(keras.callbacks.Callback):
    """Each step's rate and loss. Keras logs a running mean over the epoch: resetting the metrics
    before each step makes the logged loss that batch's own (averaged over replicas)."""

    def __init__(self, schedule: ExponentialRange, beta: float, diverge_factor: float):
        super().__init__()
        self.schedule, self.beta, self.diverge_factor = schedule, beta, diverge_factor
        self.rates, self.losses, self.smoothed = [], [], []
        self.reason = None
        self._average = 0.0
        self._best = math.inf

    def on_train_batch_begin(self, batch, logs=None):
        self.model.reset_metrics()
        # The rate this step applies: the schedule at the optimizer's count before the step.
        self.rates.append(float(self.schedule(self.model.optimizer.iterations)))

    def on_train_batch_end(self, batch, logs=None):
        loss = float(logs["loss"])
        step = len(self.losses)
        self.losses.append(loss if math.isfinite(loss) else math.nan)
        self._average = self.beta * self._average + (1 - self.beta) * loss
        smoothed = self._average / (1 - self.beta ** (step + 1))
        self.smoothed.append(smoothed if math.isfinite(smoothed) else math.nan)
        if not math.isfinite(loss) or not math.isfinite(smoothed):
            self.reason = "not_finite"
        elif smoothed > self.diverge_factor * self._best:
            self.reason = "diverged"
        self._best = min(self._best, smoothed)
        if self.reason:
            self.model.stop_training = True


def _check_arguments(min_lr, max_lr, steps, beta, diverge_factor):
    checks = [
        (min_lr > 0, "min_lr must be positive", "min_lr", min_lr),
        (max_lr > min_lr, "max_lr must be above min_lr", "max_lr", max_lr),
        (steps >= MIN_STEPS, f"steps must be at least {MIN_STEPS} to suggest a rate", "steps", steps),
        (0 <= beta < 1, "beta must be in [0, 1)", "beta", beta),
        (diverge_factor > 1, "diverge_factor must be above 1", "diverge_factor", diverge_factor),
    ]
    for ok, message, name, value in checks:
        if not ok:
            raise errors.UserError(f"LR range test: {message}. Received: {name}={value}")
