"""The run as a list of stages, each saying which layers train, for how long and at what learning rate;
and how a stage is compiled.

The two-phase recipe is the list [head, finetune]. --unfreeze_schedule=block5_conv1=1,all=2 makes
[head, unfreeze_block5_conv1, unfreeze_all]. A stage's index and name are what state.json, metrics.json
and TensorBoard record; the names of the two-phase recipe are the ones its phases had, so its older
model_dirs resume.
"""

import dataclasses

import keras

from tl_keras.config import AUTO, Config
from tl_keras.training import ema
from tl_keras.training import optimizers

HEAD = "head"
FINETUNE = "finetune"
UNFREEZE_PREFIX = "unfreeze_"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One fit() of the run, possibly resumed: `trains_from` is None for the head on a frozen backbone,
    else the first trainable backbone layer ('all' for every one); `epochs` is what the flags say (a
    --time_budget plan may set the last stage's length in steps instead)."""

    index: int
    name: str
    trains_from: str | None
    epochs: int
    learning_rate: float | str  # The peak rate, or AUTO until the range test has chosen it.

    @property
    def fine_tunes(self) -> bool:
        return self.trains_from is not None

    @property
    def label(self) -> str:
        return f"stage {self.index} ({self.name})"


def build_stages(config: Config) -> list[Stage]:
    """The run's stages, in order, from the flags."""
    stages = []
    if config.head_epochs:
        stages.append(Stage(0, HEAD, None, config.head_epochs, config.head_learning_rate))
    for layer, epochs in config.unfreeze_points:
        name = UNFREEZE_PREFIX + layer.replace(":", "_") if config.unfreeze_schedule else FINETUNE
        stages.append(Stage(len(stages), name, layer, epochs, config.finetune_learning_rate))
    return stages


def rate_key(stage: Stage) -> str:
    """Which learning-rate flag a stage's rate comes from: one auto rate serves every fine-tuning stage."""
    return FINETUNE if stage.fine_tunes else HEAD


def learning_rate(stage: Stage, stages: list[Stage], steps: dict, config: Config, train_steps: int,
                  peak: float):
    """The stage's learning rate or schedule, over the steps that will run (`steps`: name -> steps).

    The head trains at a constant rate. Fine-tuning warms up linearly to `peak`, then decays to zero
    along a cosine: with --stage_lr_schedule=shared one warmup and one decay span every fine-tuning
    stage (a stage continues the curve where the one before it stopped); with per_stage each stage has
    its own.
    """
    if not stage.fine_tunes:
        return peak
    warmup = int(config.finetune_warmup_epochs * train_steps)
    if config.stage_lr_schedule == "per_stage":
        return warmup_cosine(peak, warmup, steps[stage.name])
    group = [s for s in stages if s.fine_tunes]
    offset = sum(steps[s.name] for s in group[:group.index(stage)])
    shared = warmup_cosine(peak, warmup, sum(steps[s.name] for s in group))
    return OffsetSchedule(shared, offset) if offset else shared


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int):
    """Linear warmup to `peak`, then cosine decay to zero at step `total_steps` (the planned last one,
    with a budget: a schedule cut off mid-decay would waste its low-rate steps)."""
    total_steps = max(1, total_steps)
    warmup_steps = min(warmup_steps, total_steps - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else peak,
        decay_steps=total_steps - warmup_steps,
        warmup_target=peak if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


@keras.saving.register_keras_serializable(package="tl_keras")
class OffsetSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule` from step `offset` on: a later stage's fresh optimizer counts its steps from zero,
    while the shared curve goes on from where the stage before it stopped."""

    def __init__(self, schedule, offset: int):
        self.schedule = schedule
        self.offset = offset

    def __call__(self, step):
        return self.schedule(step + self.offset)

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule), "offset": self.offset}

    @classmethod
    def from_config(cls, config):
        return cls(keras.optimizers.schedules.deserialize(config["schedule"]), config["offset"])


def resolved_rate(stage: Stage, chosen: dict) -> float:
    """The stage's peak rate: its flag's value, or the one the range test chose (`chosen`, by rate_key)."""
    if stage.learning_rate == AUTO:
        return chosen[rate_key(stage)]
    return float(stage.learning_rate)


def compile_classifier(model: keras.Model, learning_rate, config: Config, num_classes: int,
                       steps_per_execution: int = 1, layerwise: keras.Model | None = None):
    """Always a fresh optimizer: a changed trainable set must never reuse stale optimizer slots.

    `layerwise` is the classifier whose backbone blocks get --layerwise_lr_decay's rates (fine-tuning
    stages only: the head stage trains one block). It may be `model` itself, or the classifier whose
    layers `model` shares (a stage on cached activations, which has no backbone layer of its own).
    """
    decay = config.layerwise_lr_decay if layerwise is not None else None
    optimizer = optimizers.build_optimizer(layerwise if decay else model, learning_rate, decay)
    if config.ema_decay:  # Keras's weight averaging, on every Adam that updates weights (training/ema.py).
        ema.enable(optimizer, config.ema_decay)
    model.compile(
        steps_per_execution=steps_per_execution,
        jit_compile=config.jit_compile,
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5_accuracy"),
        ],
    )
