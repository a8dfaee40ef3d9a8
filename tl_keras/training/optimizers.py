"""The optimizer of a training stage: plain Adam, or Adam with discriminative (layer-wise) learning rates.

With `layerwise_lr_decay` d, the head (every layer outside the backbone) trains at the full rate, the
backbone's top block (model/blocks.py) at d times it, the block below at d^2 times it, and so on
down: the lower a block, the more general its features and the less they should move (ULMFiT,
timm's --layer-decay). The exponent counts blocks from the top of the backbone, not from the top of
the trainable part, so a block keeps its rate whichever stage unfreezes it.

Mechanism: keras.optimizers.MultiOptimizer with an OptimizerMap, one Adam per block, keyed by a regex
of the exact paths of the block's variables; the head's Adam is the map's default. Each Adam's rate is
a BlockScaledSchedule: the stage's rate or schedule times the block's factor, so warmup and decay
stay in step across blocks. The Adams are named after their blocks (adam_head, adam_block5, ...):
Keras numbers unnamed optimizers per process (adam, adam_1, ...), and checkpointing keys optimizer
state by these names, so they must be the same in a resumed process. MultiOptimizer hands each Adam
its own variables' gradients, and each Adam does its own all-reduce and loss-scale handling, so it
works under every tf.distribute strategy and under mixed precision (a mixed_float16
LossScaleOptimizer wraps the MultiOptimizer, which is allowed; the reverse is not). Build it inside
`strategy.scope()`, as every optimizer: a Keras optimizer records the strategy it was created in.
"""

import collections
import re

import keras

from tl_keras.errors import UserError
from tl_keras.model import blocks

HEAD = blocks.HEAD
NAME = "layerwise_adam"


def optimizer_name(block: str) -> str:
    """The stable name of the Adam that trains `block` (or HEAD)."""
    return f"adam_{block}"


@keras.saving.register_keras_serializable(package="tl_keras")
class BlockScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A base rate (a float or a LearningRateSchedule) times a constant factor."""

    def __init__(self, learning_rate, factor: float):
        self.learning_rate = learning_rate
        self.factor = float(factor)

    def __call__(self, step):
        rate = self.learning_rate
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            rate = rate(step)
        return keras.ops.multiply(keras.ops.cast(rate, "float32"), self.factor)

    def get_config(self):
        rate = self.learning_rate
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            rate = keras.optimizers.schedules.serialize(rate)
        return {"learning_rate": rate, "factor": self.factor}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["learning_rate"], dict):
            config["learning_rate"] = keras.optimizers.schedules.deserialize(config["learning_rate"])
        return cls(**config)


def build_optimizer(model: keras.Model, learning_rate, layerwise_lr_decay: float | None = None):
    """Adam(learning_rate), or with a decay a MultiOptimizer of one Adam per block (module docstring).

    `model` is the classifier, or any model whose layer "backbone" is the backbone; the optimizer may
    then train any model that shares its layers (a phase's model on cached activations).
    """
    if layerwise_lr_decay is None:
        return keras.optimizers.Adam(learning_rate)
    factors = _factors(model, layerwise_lr_decay)
    backbone = blocks.get_backbone(model)
    _check_unique_paths(model)
    head = keras.optimizers.Adam(BlockScaledSchedule(learning_rate, 1.0), name=optimizer_name(HEAD))
    optimizer_map = keras.optimizers.OptimizerMap(head)
    for block in blocks.backbone_blocks(model):
        paths = [v.path for name in block.layers for v in backbone.get_layer(name).weights]
        if paths:
            pattern = "(?:" + "|".join(re.escape(path) for path in paths) + ")"
            optimizer_map[pattern] = keras.optimizers.Adam(
                BlockScaledSchedule(learning_rate, factors[block.name]), name=optimizer_name(block.name))
    return keras.optimizers.MultiOptimizer(optimizer_map, name=NAME)


def block_learning_rates(model: keras.Model, learning_rate, decay: float | None,
                         step: int = 0) -> dict[str, float]:
    """Each block's rate at `step` (a warmup starts at 0: pass its last step to see the peak), for the
    log: the head first, then the backbone's blocks from the top down."""
    factors = _factors(model, decay)
    base = learning_rate
    if isinstance(base, keras.optimizers.schedules.LearningRateSchedule):
        base = keras.ops.convert_to_numpy(base(step))
    return {name: float(base) * factor for name, factor in factors.items()}


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The head's rate for the next step: Adam's own, or the head's Adam's in a MultiOptimizer (whose
    `.learning_rate` raises, its blocks having several)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        heads = [o for o in optimizer.optimizers if o.name == optimizer_name(HEAD)]
        if not heads:
            raise ValueError(f"{optimizer.name} has no optimizer named {optimizer_name(HEAD)}: it was not "
                             "made by build_optimizer.")
        optimizer = heads[0]
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def _factors(model: keras.Model, decay: float | None) -> dict[str, float]:
    """HEAD: 1, then each block from the top down: decay, decay^2, ... (all 1 without a decay)."""
    if decay is not None and not 0.0 < decay <= 1.0:
        raise UserError(f"--layerwise_lr_decay must be in (0, 1]. Received: layerwise_lr_decay={decay}")
    names = [block.name for block in reversed(blocks.backbone_blocks(model))]
    if HEAD in names:
        raise ValueError(f"A backbone block is named {HEAD}, like the head.")
    factors = {HEAD: 1.0}
    for depth, name in enumerate(names, start=1):
        factors[name] = 1.0 if decay is None else decay ** depth
    return factors


def _check_unique_paths(model: keras.Model):
    """The map routes variables by path, so two variables with one path would share a block."""
    counts = collections.Counter(v.path for v in model.weights)
    duplicates = sorted(path for path, count in counts.items() if count > 1)
    if duplicates:
        raise ValueError(f"Variable paths are not unique in {model.name}: {', '.join(duplicates[:3])}.")
