"""--time_budget: plan the run's length from measured speeds, so that it fills the time it is given.

The rule: every stage but the last keeps its epoch count from the flags (the head stage warms up the head;
more of it buys little, and an unfreezing schedule's early stages are short on purpose), and the last stage
gets all the time that is left, in steps, so its learning-rate schedule can end exactly at its last step.
The plan is made once, before training, from a few timed steps of each stage's kind; a resumed run keeps
it and does not plan again. When the last stage starts, its steps are set once more from the time actually
left (see Plan.fix_last): time that an earlier stage did not use (early stopping, a fast epoch) goes to it.
"""

import dataclasses
import math
import time

import keras
import numpy as np

from tl_keras.errors import UserError

# Reserved for the export (SavedModel, labels) and the final saves, which the plan cannot time ahead;
# and for converting each further format (TFLite, ONNX, OpenVINO; see export_seconds).
EXPORT_SECONDS = 20.0
FORMAT_SECONDS = 30.0
# Kept free for what a plan cannot foresee: per-epoch saves and summaries, which the timed steps do not
# include, and the noise of the measurement itself.
SAFETY_FRACTION = 0.03
# Steps timed per stage kind, after the warm-up ones that trace and compile.
WARMUP_STEPS, TIMED_STEPS = 2, 5


@dataclasses.dataclass(frozen=True)
class Rates:
    """Measured speeds, in images per second: a train step of each stage (by name), and inference; and
    the seconds each stage's first steps take to trace and compile, which the real stage pays again."""

    train: dict
    inference: float
    setup: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "Rates":
        if "train" not in data:  # A plan of the two-phase version: rates named head and finetune.
            names = ("head", "finetune")
            return cls(train={name: data[name] for name in names}, inference=data["inference"],
                       setup={name: data.get(f"{name}_setup", 0.0) for name in names})
        return cls(**data)


@dataclasses.dataclass
class Plan:
    """Steps per stage, and the time each is expected to take. Stored in the run's state.

    `stages` holds one {"name", "steps", "seconds"} per stage, in order.
    """

    budget_seconds: float
    spent_seconds: float  # Before training: data preparation, model building, the measurements.
    steps_per_epoch: int
    stages: list
    evaluation_export_seconds: float
    rates: dict
    last_stage_fixed: bool = False  # The last stage's steps, set again when it starts (see fix_last).
    export_seconds: float = EXPORT_SECONDS  # Of evaluation_export_seconds: the export and its checks.

    def steps(self, name: str) -> int:
        return next(s["steps"] for s in self.stages if s["name"] == name)

    def epochs(self, name: str) -> float:
        return self.steps(name) / self.steps_per_epoch

    def describe(self) -> str:
        rates = Rates.from_dict(self.rates)
        parts = [f"Budget {minutes(self.budget_seconds)}: preparation {minutes(self.spent_seconds)}"]
        for stage in self.stages:
            parts.append(f"{stage['name']} {stage['steps'] / self.steps_per_epoch:.1f} epochs at "
                         f"{rates.train[stage['name']]:.0f} img/s ({minutes(stage['seconds'])})")
        parts.append(f"evaluation and export {minutes(self.evaluation_export_seconds)}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if "stages" not in data:  # The two-phase version's plan: head_steps and finetune_steps.
            stages = [{"name": name, "steps": data[f"{name}_steps"], "seconds": data[f"{name}_seconds"]}
                      for name in ("head", "finetune") if data[f"{name}_steps"]]
            data = dict(data, stages=stages, last_stage_fixed=data.get("last_phase_fixed", False),
                        rates=dataclasses.asdict(Rates.from_dict(data["rates"])))
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def fix_last(self, spent_seconds: float, num_validation: int, num_test: int, batch_size: int) -> "Plan":
        """Set the last stage's steps once more when it starts, from the time actually left: earlier
        stages may have run long or short of their plan (the first epoch also fills the input cache,
        and early stopping may end a stage early). Done once; a resumed run keeps the result."""
        if self.last_stage_fixed:
            return self
        rates = Rates.from_dict(self.rates)
        last = self.stages[-1]["name"]
        fixed = make_plan(self.budget_seconds, spent_seconds, self.steps_per_epoch, batch_size,
                          num_validation, num_test, rates, [(last, 0)], self.export_seconds)
        return dataclasses.replace(self, stages=self.stages[:-1] + fixed.stages, last_stage_fixed=True)


def make_plan(budget_seconds: float, spent_seconds: float, steps_per_epoch: int, batch_size: int,
              num_validation: int, num_test: int, rates: Rates, stages: list,
              export_seconds: float = EXPORT_SECONDS) -> Plan:
    """Step counts that fill `budget_seconds`, of which `spent_seconds` are gone already.

    `stages` is [(name, epochs)] in order; every stage but the last keeps its epochs. Each epoch ends
    with a validation pass and each stage with a test pass, at the inference rate; the last stage gets
    whatever is left after the others, the evaluations, the export and a small safety margin, rounded
    down to whole steps.
    """
    step_seconds = {name: batch_size / rates.train[name] for name, _ in stages}
    validation = num_validation / rates.inference
    test = num_test / rates.inference
    last = stages[-1][0]
    counts = {name: epochs * steps_per_epoch for name, epochs in stages[:-1]}
    setup = sum(rates.setup.get(name, 0.0) for name, _ in stages)
    fixed_seconds = sum(counts[name] * step_seconds[name] + epochs * validation
                        for name, epochs in stages[:-1]) + setup
    left = budget_seconds * (1 - SAFETY_FRACTION) - spent_seconds - fixed_seconds - len(stages) * test \
        - export_seconds
    # Solve steps * step + ceil(steps / steps_per_epoch) * validation <= left for the most steps.
    epoch_seconds = steps_per_epoch * step_seconds[last] + validation
    whole = max(0, math.floor(left / epoch_seconds))
    rest = left - whole * epoch_seconds - validation
    steps = whole * steps_per_epoch + max(0, min(steps_per_epoch - 1, math.floor(rest / step_seconds[last])))
    if steps < 1:
        needed = (spent_seconds + fixed_seconds + len(stages) * test + export_seconds
                  + epoch_seconds / steps_per_epoch)
        raise UserError(f"--time_budget is too short for this run: preparing, the fixed stages, evaluation "
                        f"and export alone take about {minutes(needed)}. Received: "
                        f"time_budget={minutes(budget_seconds)}")
    counts[last] = steps
    planned = [{"name": name, "steps": counts[name],
                "seconds": round(counts[name] * step_seconds[name]
                                 + math.ceil(counts[name] / steps_per_epoch) * validation
                                 + rates.setup.get(name, 0.0), 2)}
               for name, _ in stages]
    return Plan(budget_seconds=budget_seconds, spent_seconds=round(spent_seconds, 2),
                steps_per_epoch=steps_per_epoch, stages=planned,
                evaluation_export_seconds=round(len(stages) * test + export_seconds, 2),
                rates=dataclasses.asdict(rates), export_seconds=round(export_seconds, 2))


def export_seconds(formats: int, examples: int, inference: float) -> float:
    """Time the end of a run needs after the last stage: the SavedModel, `formats` further formats to
    convert, and `examples` images read at the inference rate (calibration's validation and test
    passes, and each format's parity check)."""
    return EXPORT_SECONDS + FORMAT_SECONDS * formats + examples / inference


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
    """How long a stage trains: `epochs` epochs, the last of which has `last_epoch_steps` steps (a
    planned stage ends where the budget does, usually inside an epoch)."""

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
