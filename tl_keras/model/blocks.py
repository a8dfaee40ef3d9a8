"""The backbone's blocks (its natural stages), bottom to top: the units that discriminative learning
rates scale, and that gradual unfreezing will name.

A block is found from layer names, because every keras.applications family names its layers by
stage. Rules, tried in this order on each layer name of the backbone:

    VGG16/19, the test-only tiny   block1_conv1, block1_pool ...   -> block1 ... block5
    ResNet50                       conv1_* (the stem), conv2_block1_* ... conv5_*  -> conv1 ... conv5
    EfficientNetB0                 stem_*, block1a_* ... block7a_*, top_*  -> stem, block1 ... block7, top
    MobileNetV2                    Conv1, bn_Conv1, Conv1_relu (the stem)  -> Conv1
                                   expanded_conv_*, then block_1_* ... block_16_*, in the paper's 7
                                   stages: a block without a residual add (no block_N_add layer) starts
                                   a stage, which is named after its first block -> expanded_conv,
                                   block_1, block_3, block_6, block_10, block_13, block_16
                                   Conv_1, Conv_1_bn (the last 1x1 conv)  -> Conv_1

A layer that no rule names (the input, ResNet's pool1_*, EfficientNet's rescaling and
normalization, MobileNetV2's out_relu) belongs to the block of the layer before it, or to the first
block if it comes first. Layers without weights are listed too, but only weighted layers matter to
an optimizer.
"""

import dataclasses
import re

import keras

from tl_keras.errors import UserError

BACKBONE = "backbone"  # The classifier's backbone sub-model.
HEAD = "head"  # What block_of calls every layer of the classifier outside the backbone.

# (pattern, block name template): the first pattern that matches a layer name names its block.
_RULES = (
    (re.compile(r"block(\d+)_"), "block{0}"),  # VGG, tiny.
    (re.compile(r"block(\d+)[a-z]+_"), "block{0}"),  # EfficientNet: block1a_, block2b_.
    (re.compile(r"conv(\d+)_"), "conv{0}"),  # ResNet.
    (re.compile(r"(stem)_"), "{0}"),  # EfficientNet.
    (re.compile(r"(top)_"), "{0}"),  # EfficientNet.
    (re.compile(r"(Conv1)(_|$)"), "{0}"),  # MobileNetV2's stem: Conv1, Conv1_relu.
    (re.compile(r"bn_(Conv1)$"), "{0}"),
    (re.compile(r"(Conv_1)(_|$)"), "{0}"),  # MobileNetV2's last 1x1 conv: Conv_1, Conv_1_bn.
    (re.compile(r"(expanded_conv)_"), "{0}"),  # MobileNetV2's first inverted-residual block.
)
_MOBILENET_BLOCK = re.compile(r"(block_(\d+))_")


@dataclasses.dataclass(frozen=True)
class Block:
    """One stage of the backbone: its name and its layers' names, in the backbone's order."""

    name: str
    layers: tuple[str, ...]


def get_backbone(model: keras.Model) -> keras.Model:
    """The classifier's backbone sub-model (or `model` itself if it is the backbone)."""
    if model.name == BACKBONE:
        return model
    if BACKBONE not in [layer.name for layer in model.layers]:
        # A model built from the classifier's layers (classifier.build_model_from) has lost the
        # backbone's boundaries and cannot tell its head from its top block.
        raise ValueError(f"{model.name} has no layer named {BACKBONE}: pass the classifier whose layers it "
                         "shares.")
    return model.get_layer(BACKBONE)


def backbone_blocks(model: keras.Model) -> list[Block]:
    """The backbone's blocks, bottom to top (see the module docstring for the rules)."""
    backbone = get_backbone(model)
    names = [layer.name for layer in backbone.layers]
    keys = _block_keys(names)
    if not any(keys):
        raise UserError("No rule in tl_keras/model/blocks.py finds the stages of this backbone from its "
                        f"layer names. Received: first_layers={', '.join(names[:4])}")
    first = next(key for key in keys if key)
    order, members = [], {}
    current = first
    for name, key in zip(names, keys):
        current = key or current
        if current not in members:
            order.append(current)
            members[current] = []
        members[current].append(name)
    return [Block(name, tuple(members[name])) for name in order]


def block_of(model: keras.Model, layer_name: str) -> str:
    """The name of the block that `layer_name` belongs to; HEAD for a layer of the classifier outside
    the backbone."""
    for block in backbone_blocks(model):
        if layer_name in block.layers:
            return block.name
    if layer_name != BACKBONE and layer_name in [layer.name for layer in model.layers]:
        return HEAD
    raise UserError(f"{layer_name} is no layer of {model.name}. Received: layer_name={layer_name}")


def _block_keys(names: list[str]) -> list[str | None]:
    """Each layer name's block by the rules, or None where no rule names one."""
    # MobileNetV2: a block without a residual add changes stride or width, so it starts a stage.
    stage_of, stage = {}, None
    for name in names:
        match = _MOBILENET_BLOCK.match(name)
        if match and match.group(1) not in stage_of:
            if f"{match.group(1)}_add" not in names:
                stage = match.group(1)
            stage_of[match.group(1)] = stage
    keys = []
    for name in names:
        match = _MOBILENET_BLOCK.match(name)
        if match:
            keys.append(stage_of[match.group(1)])
            continue
        for pattern, template in _RULES:
            match = pattern.match(name)
            if match:
                keys.append(template.format(match.group(1)))
                break
        else:
            keys.append(None)
    return keys
