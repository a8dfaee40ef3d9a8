"""--time_budget: plan the run's length from measured speeds, so that it fills the time it is given.

The rule: every phase but the last keeps its epoch count from the flags (phase 1 warms up the head; more
of it buys little), and the last phase that runs gets all the time that is left, in steps, so its
learning-rate schedule can end exactly at its last step. The plan is made once, before training, from a
few timed steps of each phase's kind; a resumed run keeps it and does not plan again.
"""

import dataclasses
import math
import time

import keras
import numpy as np

from tl_keras.errors import UserError

# Reserved for the export (SavedModel, labels) and the final saves, which the plan cannot time ahead.
EXPORT_SECONDS = 20.0
# Kept free for what a plan cannot foresee: per-epoch saves and summaries, which the timed steps do not
# include, and the noise of the measurement itself.
SAFETY_FRACTION = 0.03
# Steps timed per phase kind, after the warm-up ones that trace and compile.
WARMUP_STEPS, TIMED_STEPS = 2, 5


@dataclasses.dataclass(frozen=True)
class Rates:
    """Measured speeds, in images per second: a train step of each phase, and inference; and the
    seconds each phase's first steps take to trace and compile, which the real phase pays again."""

    head: float
    finetune: float
    inference: float
    head_setup: float = 0.0
    finetune_setup: float = 0.0


@dataclasses.dataclass
class Plan:
    """Step counts per phase, and the time each is expected to take. Stored in the run's state."""

    budget_seconds: float
    spent_seconds: float  # Before training: data preparation, model building, the measurements.
    head_steps: int
    finetune_steps: int
    steps_per_epoch: int
    head_seconds: float
    finetune_seconds: float
    evaluation_export_seconds: float
    rates: dict
    last_phase_fixed: bool = False  # The last phase's steps, set again when it starts (see fix_last).

    @property
    def head_epochs(self) -> float:
        return self.head_steps / self.steps_per_epoch

    @property
    def finetune_epochs(self) -> float:
        return self.finetune_steps / self.steps_per_epoch

    def describe(self) -> str:
        parts = [f"Budget {minutes(self.budget_seconds)}: preparation {minutes(self.spent_seconds)}"]
        if self.head_steps:
            parts.append(f"phase 1 {self.head_epochs:.1f} epochs at {self.rates['head']:.0f} img/s "
                         f"({minutes(self.head_seconds)})")
        if self.finetune_steps:
            parts.append(f"phase 2 {self.finetune_epochs:.1f} epochs at {self.rates['finetune']:.0f} img/s "
                         f"({minutes(self.finetune_seconds)})")
        parts.append(f"evaluation and export {minutes(self.evaluation_export_seconds)}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), head_epochs=round(self.head_epochs, 3),
                    finetune_epochs=round(self.finetune_epochs, 3))

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def fix_last(self, spent_seconds: float, num_validation: int, num_test: int, batch_size: int) -> "Plan":
        """Set phase 2's steps once more when it starts, from the time actually left: phase 1 may have
        run long or short of its plan (its first epoch also fills the input cache). Done once; a
        resumed run keeps the result."""
        if self.last_phase_fixed or not self.finetune_steps:
            return self
        rates = Rates(**self.rates)
        fixed = make_plan(self.budget_seconds, spent_seconds, self.steps_per_epoch, batch_size,
                          num_validation, num_test, dataclasses.replace(rates, head_setup=0.0),
                          head_epochs=0, finetune=True)
        return dataclasses.replace(self, finetune_steps=fixed.finetune_steps,
                                   finetune_seconds=fixed.finetune_seconds, last_phase_fixed=True)


def make_plan(budget_seconds: float, spent_seconds: float, steps_per_epoch: int, batch_size: int,
              num_validation: int, num_test: int, rates: Rates, head_epochs: int, finetune: bool,
              export_seconds: float = EXPORT_SECONDS) -> Plan:
    """Step counts that fill `budget_seconds`, of which `spent_seconds` are gone already.

    Each epoch ends with a validation pass and each phase with a test pass, at the inference rate; the
    last phase that runs (phase 2, or phase 1 without it) gets whatever is left after the others, the
    evaluations, the export and a small safety margin, rounded down to whole steps.
    """
    step_seconds = {"head": batch_size / rates.head, "finetune": batch_size / rates.finetune}
    validation = num_validation / rates.inference
    test = num_test / rates.inference
    last = "finetune" if finetune else "head"
    fixed = {"head": head_epochs * steps_per_epoch if finetune else 0, "finetune": 0}
    phases = 2 if finetune and head_epochs else 1
    setup = rates.finetune_setup * finetune + rates.head_setup * bool(head_epochs or not finetune)
    fixed_seconds = (fixed["head"] * step_seconds["head"] + head_epochs * validation * (last != "head")
                     + setup)
    left = (budget_seconds * (1 - SAFETY_FRACTION) - spent_seconds - fixed_seconds - phases * test
            - export_seconds)
    # Solve steps * step + ceil(steps / steps_per_epoch) * validation <= left for the most steps.
    epoch_seconds = steps_per_epoch * step_seconds[last] + validation
    whole = max(0, math.floor(left / epoch_seconds))
    rest = left - whole * epoch_seconds - validation
    steps = whole * steps_per_epoch + max(0, min(steps_per_epoch - 1, math.floor(rest / step_seconds[last])))
    if steps < 1:
        needed = (spent_seconds + fixed_seconds + phases * test + export_seconds
                  + epoch_seconds / steps_per_epoch)
        raise UserError(f"--time_budget is too short for this run: preparing, the fixed phases, evaluation "
                        f"and export alone take about {minutes(needed)}. Received: "
                        f"time_budget={minutes(budget_seconds)}")
    counts = dict(fixed, **{last: steps})
    seconds = {name: counts[name] * step_seconds[name]
               + math.ceil(counts[name] / steps_per_epoch) * validation
               + (rates.head_setup if name == "head" else rates.finetune_setup) * (counts[name] > 0)
               for name in counts}
    return Plan(budget_seconds=budget_seconds, spent_seconds=round(spent_seconds, 2),
                head_steps=counts["head"], finetune_steps=counts["finetune"],
                steps_per_epoch=steps_per_epoch, head_seconds=round(seconds["head"], 2),
                finetune_seconds=round(seconds["finetune"], 2),
                evaluation_export_seconds=round(phases * test + export_seconds, 2),
                rates=dataclasses.asdict(rates))


class Clock:
    """Wall time of the whole run, across the processes of a resumed one: `before` is what earlier
    processes had spent by their last save."""

    def __init__(self, before: float = 0.0, start: float | None = None):
        self.before = before
        self.start = time.monotonic() if start is None else start

    def __call__(self) -> float:
        return self.before + time.monotonic() - self.start


@dataclasses.dataclass(frozen=True)
class Length:
    """How long a phase trains: `epochs` epochs, the last of which has `last_epoch_steps` steps (a
    planned phase ends where the budget does, usually inside an epoch)."""

    epochs: int
    last_epoch_steps: int

    @classmethod
    def of_steps(cls, steps: int, steps_per_epoch: int) -> "Length":
        epochs = math.ceil(steps / steps_per_epoch)
        return cls(epochs, steps - (epochs - 1) * steps_per_epoch if epochs else steps_per_epoch)

    def steps(self, steps_per_epoch: int) -> int:
        return max(0, self.epochs - 1) * steps_per_epoch + self.last_epoch_steps * (self.epochs > 0)


def measure_train_rate(model: keras.Model, batches, batch_size: int) -> tuple[float, float]:
    """(images per second of `model`'s compiled train step on real batches, seconds of the warm-up
    steps that trace and compile it). Each step changes the weights: call it on a throwaway copy."""
    iterator = iter(batches)
    start = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        model.train_on_batch(*next(iterator))
    timed = time.perf_counter()
    for _ in range(TIMED_STEPS):
        model.train_on_batch(*next(iterator))
    end = time.perf_counter()
    return TIMED_STEPS * batch_size / (end - timed), timed - start


def measure_inference_rate(model: keras.Model, batches, batch_size: int) -> float:
    iterator = iter(batches)
    for _ in range(WARMUP_STEPS):
        model.predict_on_batch(next(iterator)[0])
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        np.asarray(model.predict_on_batch(next(iterator)[0]))
    return TIMED_STEPS * batch_size / (time.perf_counter() - start)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
