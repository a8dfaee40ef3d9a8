"""The backbone's blocks (its natural stages), bottom to top: the units that discriminative learning
rates scale and that --fine_tune_at=top:N and --unfreeze_schedule count; and the single-tensor
boundaries where the backbone can be cut for the feature cache.

Blocks are found from layer names, because every keras.applications family names its layers by
stage; the family is recognised by a layer name only it has. Per family, bottom to top:

    VGG16/19, Xception, tiny   block1_conv1, block1_pool ...  -> block1 ... block5 (block14 for Xception)
    ResNet, ResNetV2, DenseNet conv1_* (the stem), conv2_* ... conv5_*  -> conv1 ... conv5
                               (ResNetV2's post_bn and DenseNet's transitions join the block before)
    EfficientNet, V2           stem_*, block1a_* ... block7a_*, top_*  -> stem, block1 ... block7, top
    MobileNet                  conv1* (the stem) -> conv1; then conv_dw_N / conv_pw_N / conv_pad_N: a
                               strided block (one with a conv_pad_N layer) starts a stage, named after
                               its first layer -> conv_dw_1, conv_dw_2, conv_dw_4, conv_dw_6, conv_dw_12
    MobileNetV2                Conv1, bn_Conv1, Conv1_relu (the stem)  -> Conv1
                               expanded_conv_*, then block_1_* ... block_16_*, in the paper's 7
                               stages: a block without a residual add (no block_N_add layer) starts
                               a stage, which is named after its first block -> expanded_conv,
                               block_1, block_3, block_6, block_10, block_13, block_16
                               Conv_1, Conv_1_bn (the last 1x1 conv)  -> Conv_1
    MobileNetV3                conv, conv_bn (the stem) -> conv; expanded_conv_* ... as MobileNetV2's
                               blocks (a block without an _add layer starts a stage); conv_1 -> conv_1
    InceptionV3                the stem (every layer up to its last single-tensor boundary before
                               mixed0), then mixed0 ... mixed10: each block ends with the concatenation
                               that names it, and its branch layers (conv2d_N, auto-named) join it
    InceptionResNetV2          the stem as InceptionV3's, then mixed_5b, block35 (its 10 repeats),
                               mixed_6a, block17 (20), mixed_7a, block8 (10), conv_7b; auto-named
                               branch layers join the block of the next named layer
    NASNetMobile/Large         stem_conv1, stem_bn1 -> stem; each cell's layers end in its id: the
                               reduction stem cells stem_1, stem_2; the reduction cells reduce_N;
                               normal cells are grouped between reductions, named after the first
                               (normal_0, normal_5, normal_9 in NASNetMobile). Cells read the two
                               cells before them, so the layers of neighbouring cells interleave.
    ConvNeXt                   *_stem -> stem; *_stage_K_block_* -> stageK; the downsampling layer
                               before stage K (*_downsampling_block_{K-1}) starts stageK

KerasHub presets (--backbone=hub:PRESET; model/hub.py lays a ViT's or DINOv2's transformer layers out as
layers of the backbone):

    ViT                        vit_patching_and_embedding (patches, class token, positions) -> embeddings;
                               transformer_block_1 ... transformer_block_N, a block each; the final
                               LayerNormalization (ln) joins the last
    DINOv2                     embeddings -> embeddings; layers_0 ... layers_{N-1}, a block each; the
                               final layernorm joins the last
    ResNet (v1, v2, vd)        conv1_* ... (the stem, with pool1) -> stem; stackK_* -> stackK; ResNetV2's
                               post_bn joins the last

A layer that no rule names (the input, ResNet's pool1_*, EfficientNet's rescaling and normalization,
auto-named activations, a transformer's final norm) belongs to the block of the layer before it, or to
the first block if it comes first; in the Inception families, to the block of the next named layer.
Layers without weights are listed too, but only weighted layers matter to an optimizer or an unfreeze
point.
"""

import dataclasses
import re

import keras

from tl_keras.errors import UserError

BACKBONE = "backbone"  # The classifier's backbone sub-model.
HEAD = "head"  # What block_of calls every layer of the classifier outside the backbone.
ALL = "all"  # --fine_tune_at=all: every backbone layer trains.
TOP = "top:"  # --fine_tune_at=top:N: the last N blocks train.


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
    rule = _family_rule(names)
    if rule is None:
        raise UserError("No rule in tl_keras/model/blocks.py finds the stages of this backbone from its "
                        f"layer names. Received: first_layers={', '.join(names[:4])}")
    keys = rule(names, lambda: _boundary_layer_names(backbone))
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


def unfreeze_points(model: keras.Model) -> dict[str, str]:
    """What --fine_tune_at accepts besides a weighted layer's name, each with the first weighted layer
    it unfreezes from: 'all', then top:1 (the top block), top:2, ..., and each block by its name.

    top:N starts at the lowest first layer of the last N blocks, so that all of them train even where
    the layers of neighbouring blocks interleave (NASNet)."""
    backbone = get_backbone(model)
    weighted = [layer.name for layer in backbone.layers if layer.weights]
    found = [b for b in backbone_blocks(model) if set(b.layers) & set(weighted)]
    first = {b.name: min(weighted.index(name) for name in b.layers if name in weighted) for b in found}
    points = {ALL: weighted[0]}
    for n in range(1, len(found) + 1):
        points[f"{TOP}{n}"] = weighted[min(first[b.name] for b in found[-n:])]
    for block in found:
        points.setdefault(block.name, weighted[first[block.name]])
    return points


def describe_points(model: keras.Model) -> str:
    """The stages for an error message: 'top:1=conv5, top:2=conv4, ...'."""
    backbone = get_backbone(model)
    names = [b.name for b in backbone_blocks(model)
             if any(backbone.get_layer(name).weights for name in b.layers)]
    return ", ".join(f"{TOP}{n}={name}" for n, name in enumerate(reversed(names), start=1))


def boundaries(backbone: keras.Model) -> list[int]:
    """Indices into backbone.operations after which the backbone can be cut at one tensor: every
    operation after the index reads the input only through that operation's output. Skip
    connections and branches make the operations they span no boundary."""
    operations = backbone.operations
    producer = {}
    for i, operation in enumerate(operations):
        for tensor in keras.tree.flatten(operation.output):
            producer[id(tensor)] = i
    last_use = list(range(len(operations)))
    for i, operation in enumerate(operations):
        if isinstance(operation, keras.layers.InputLayer):
            continue
        for tensor in keras.tree.flatten(operation.input):
            if id(tensor) in producer:
                j = producer[id(tensor)]
                last_use[j] = max(last_use[j], i)
    for tensor in keras.tree.flatten(backbone.outputs):  # Outputs are read after the last operation.
        last_use[producer[id(tensor)]] = len(operations)
    found, reach = [], -1
    for i, operation in enumerate(operations):
        if reach <= i and len(keras.tree.flatten(operation.output)) == 1:
            found.append(i)
        reach = max(reach, last_use[i])
    return found


def _boundary_layer_names(backbone: keras.Model) -> set[str]:
    operations = backbone.operations
    return {operations[i].name for i in boundaries(backbone)}


# Rules: (layer names, boundary names (called only if needed)) -> each name's block key, or None.

def _prefix_rule(*patterns):
    """A rule from (pattern, name template or function of the match) pairs, tried in order."""
    def rule(names, boundaries_fn):
        keys = []
        for name in names:
            for pattern, template in patterns:
                match = pattern.fullmatch(name)
                if match:
                    keys.append(template(match) if callable(template) else template.format(*match.groups()))
                    break
            else:
                keys.append(None)
        return keys
    return rule


_VGG = _prefix_rule((re.compile(r"block(\d+)_.*"), "block{0}"))
_RESNET = _prefix_rule((re.compile(r"conv(\d+)(?:_.*)?"), "conv{0}"))
_EFFICIENTNET = _prefix_rule(
    (re.compile(r"stem_.*"), "stem"),
    (re.compile(r"block(\d+)[a-z]+_.*"), "block{0}"),
    (re.compile(r"top_.*"), "top"),
)
_CONVNEXT = _prefix_rule(
    (re.compile(r".*_stem"), "stem"),
    (re.compile(r".*_stage_(\d+)_block_\d+_.*"), "stage{0}"),
    (re.compile(r".*_downsampling_block_(\d+)"), lambda m: f"stage{int(m.group(1)) + 1}"),
)


def _stages_of_blocks(names, pattern, starts_stage):
    """block id -> the id of the block that starts its stage: blocks come in order, and a block for
    which starts_stage(id) is true starts a new stage."""
    stage_of, stage = {}, None
    for name in names:
        match = pattern.match(name)
        if match and match.group(1) not in stage_of:
            if stage is None or starts_stage(match.group(1)):
                stage = match.group(1)
            stage_of[match.group(1)] = stage
    return stage_of


def _residual_stages(block_pattern, others):
    """MobileNetV2 and V3: a block without a residual add (no BLOCK_add layer) changes stride or width,
    so it starts a stage; `others` names the layers outside the blocks (the stem, the last conv)."""
    def rule(names, boundaries_fn):
        present = set(names)
        stage_of = _stages_of_blocks(names, block_pattern, lambda block: f"{block}_add" not in present)
        return [stage_of[match.group(1)] if (match := block_pattern.match(name)) else key
                for name, key in zip(names, others(names, boundaries_fn))]
    return rule


_MOBILENET_V2 = _residual_stages(
    re.compile(r"(block_\d+|expanded_conv)_"),
    _prefix_rule((re.compile(r"(?:bn_)?Conv1(?:_.*)?"), "Conv1"), (re.compile(r"Conv_1(?:_.*)?"), "Conv_1")))
_MOBILENET_V3 = _residual_stages(
    re.compile(r"(expanded_conv(?:_\d+)?)_"),
    _prefix_rule((re.compile(r"conv(?:_bn)?"), "conv"), (re.compile(r"conv_1(?:_bn)?"), "conv_1")))
_MOBILENET_BLOCK = re.compile(r"conv_(?:dw|pw|pad)_(\d+)(?:_.*)?")


def _mobilenet(names, boundaries_fn):
    """MobileNet (v1): a strided depthwise block (it has a conv_pad_N layer) starts a stage."""
    present = set(names)
    stage_of = _stages_of_blocks(names, _MOBILENET_BLOCK, lambda block: f"conv_pad_{block}" in present)
    keys = []
    for name in names:
        match = _MOBILENET_BLOCK.fullmatch(name)
        if match:
            keys.append(f"conv_dw_{stage_of[match.group(1)]}")
        else:
            keys.append("conv1" if re.fullmatch(r"conv1(?:_.*)?", name) else None)
    return keys


_NASNET_CELL = re.compile(r"_(stem_[12]|reduce_\d+|\d+)$")


def _nasnet(names, boundaries_fn):
    """NASNet: by the cell id that ends a cell layer's name; normal cells grouped from one reduction cell
    to the next."""
    cells = [_cell(name) for name in names]
    reductions = sorted({int(cell[len("reduce_"):]) for cell in cells if cell and cell.startswith("reduce_")})
    keys = []
    for name, cell in zip(names, cells):
        if name.startswith("stem_"):
            keys.append("stem")
        elif cell and cell.isdigit():
            keys.append(f"normal_{max([0] + [r + 1 for r in reductions if r < int(cell)])}")
        else:
            keys.append(cell)
    return keys


def _cell(name: str) -> str | None:
    """The id of the NASNet cell a layer belongs to (auto-named layers belong to none)."""
    if not re.search(r"normal|reduction|adjust", name):
        return None
    match = _NASNET_CELL.search(name)
    return match.group(1) if match else None


def _closing_rule(*patterns):
    """Inception families: a named layer ends (or is part of) a block, and the auto-named branch layers
    before it join that block; the stem is everything up to the last boundary before the first one."""
    named = _prefix_rule(*patterns)

    def rule(names, boundaries_fn):
        keys = named(names, boundaries_fn)
        first = next(i for i, key in enumerate(keys) if key)
        cuts = boundaries_fn()
        stem_end = max(i for i in range(first) if names[i] in cuts)
        result, following = [None] * len(names), None
        for i in range(len(names) - 1, -1, -1):  # Unnamed layers take the next named layer's block.
            following = keys[i] or following
            result[i] = "stem" if i <= stem_end else (following or keys[i])
        last = next(key for key in reversed(keys) if key)
        return [key or last for key in result]
    return rule


_INCEPTION_V3 = _closing_rule((re.compile(r"mixed(\d+)"), "mixed{0}"))
_INCEPTION_RESNET_V2 = _closing_rule(
    (re.compile(r"(mixed_5b|mixed_6a|mixed_7a)"), "{0}"),
    (re.compile(r"(block35|block17|block8)_\d+_.*"), "{0}"),
    (re.compile(r"(conv_7b)(?:_.*)?"), "{0}"),
)

_VIT = _prefix_rule(
    (re.compile(r"vit_patching_and_embedding"), "embeddings"),
    (re.compile(r"(transformer_block_\d+)"), "{0}"),
)
_DINOV2 = _prefix_rule(
    (re.compile(r"(?:.*_)?embeddings"), "embeddings"),  # A named DINOV2Backbone prefixes it with its name.
    (re.compile(r"(layers_\d+)"), "{0}"),
)
_HUB_RESNET = _prefix_rule(
    (re.compile(r"(?:conv\d+|pool1)_.*"), "stem"),
    (re.compile(r"(stack\d+)_.*"), "{0}"),
)

# (a layer name only this family has, its rule), tried in order.
_FAMILIES = (
    (lambda names: "vit_patching_and_embedding" in names, _VIT),
    (lambda names: any(re.fullmatch(r"layers_\d+", n) for n in names), _DINOV2),
    (lambda names: any(re.fullmatch(r"stack\d+_block\d+_.*", n) for n in names), _HUB_RESNET),
    (lambda names: any(re.fullmatch(r".*_stage_\d+_block_\d+_.*", n) for n in names), _CONVNEXT),
    (lambda names: "mixed0" in names, _INCEPTION_V3),
    (lambda names: "mixed_5b" in names, _INCEPTION_RESNET_V2),
    (lambda names: "stem_bn1" in names, _nasnet),
    (lambda names: "conv_dw_1" in names, _mobilenet),
    (lambda names: "Conv1" in names, _MOBILENET_V2),
    (lambda names: "expanded_conv_1_expand" in names, _MOBILENET_V3),
    (lambda names: "stem_conv" in names, _EFFICIENTNET),
    (lambda names: "conv1_conv" in names, _RESNET),
    (lambda names: any(re.fullmatch(r"block\d+_.*", n) for n in names), _VGG),
)


def _family_rule(names):
    return next((rule for recognises, rule in _FAMILIES if recognises(names)), None)
