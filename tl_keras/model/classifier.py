"""The classifier: a backbone, pooling and the head; which layers train in each phase; where the
model can be cut for the feature cache."""

import dataclasses
import inspect
import re

from absl import logging
import keras

from tl_keras.errors import UserError
from tl_keras.model import backbones
from tl_keras.model import blocks
from tl_keras.model import pooling
from tl_keras.model import registry

# The pooling layer (model/pooling.py): everything after it is the head, and its output is what phase 1
# caches. Named "gap" whatever it pools by (a ViT's class token too), as checkpoints and caches name it.
HEAD_INPUT = "gap"
LOGITS = "predictions"  # The final Dense layer: logits. Its name is what checkpoints store it under.
PROBABILITIES = "probabilities"  # The Softmax over LOGITS: the model's output.


def build_classifier(
    backbone_name: str,
    image_size: int,
    num_classes: int,
    weights: str = "imagenet",
    head_units=(256,),
    head_batchnorm: bool = True,
    dropout: float = 0.3,
    matmul_small_convs: bool = False,
    backbone_bn: str = registry.BN_FROZEN,
) -> keras.Model:
    """Frozen backbone, pooling, then the head: Dense logits named "predictions", then a Softmax, both
    float32 under mixed precision. Pooling is GlobalAveragePooling2D for feature maps, and the class
    token for a transformer's tokens (hub:PRESET ViTs, DINOv2).

    backbone_bn (registry.BACKBONE_BN) says whether fine-tuning trains the backbone's BatchNormalization
    layers on batch statistics (backbones.pin_mode); by default the backbone runs in inference mode.

    The softmax is a layer of its own so that exports can return the logits beside the probabilities
    and divide them by a temperature. It has no weights, and the Dense layer keeps its name, so
    checkpoints written when that layer applied the softmax itself load unchanged.
    """
    backbone = backbones.build_backbone(backbone_name, image_size, weights, matmul_small_convs, backbone_bn)
    backbone.trainable = False
    inputs = keras.Input((image_size, image_size, 3), name="image")
    # fit() overrides this training=False (Keras 3.15): backbones.pin_mode is what keeps the mode. It
    # still holds for any copy without the pin (the export's float32 clone), which only infers.
    x = backbone(inputs, training=False)
    x = pooling.build_pooling(backbone, HEAD_INPUT)(x)
    if head_batchnorm:
        x = keras.layers.BatchNormalization(name="head_batchnorm")(x)
    for i, units in enumerate(head_units, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"head_dense_{i}")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    logits = keras.layers.Dense(num_classes, dtype="float32", name=LOGITS)(x)
    outputs = keras.layers.Softmax(dtype="float32", name=PROBABILITIES)(logits)
    # hub:PRESET may be a handle or a path: a model name has no '/'.
    return keras.Model(inputs, outputs, name=re.sub(r"[^\w.-]+", "_", f"{backbone_name}_classifier"))


def head_layers(model: keras.Model) -> list:
    """The layers after pooling, in order: the part phase 1 trains."""
    names = [layer.name for layer in model.layers]
    return model.layers[names.index(HEAD_INPUT) + 1:]


def build_feature_extractor(model: keras.Model) -> keras.Model:
    """Images to pooled backbone features, sharing layers with `model`."""
    return keras.Model(model.inputs, model.get_layer(HEAD_INPUT).output, name="feature_extractor")


def freeze_backbone(model: keras.Model):
    """Phase 1: only the head trains. Recompile afterwards."""
    model.get_layer(blocks.BACKBONE).trainable = False


def unfreeze_backbone(model: keras.Model, fine_tune_at: str):
    """Phase 2: unfreeze backbone layers from `fine_tune_at` upward. Recompile afterwards.

    Setting trainable on a model sets it on every sublayer, so the backbone flag goes first and the
    per-layer flags after it. With --backbone_bn=frozen, BatchNormalization layers stay frozen: their
    statistics suit the weights; with train, those above the unfreeze point train too.
    """
    backbone = model.get_layer(blocks.BACKBONE)
    layers = [layer for layer in backbone.layers if layer.weights]
    start = unfreeze_start(model, fine_tune_at)
    train_bn = backbones.batchnorm_mode(backbone) == registry.BN_TRAIN
    backbone.trainable = True
    for i, layer in enumerate(layers):
        layer.trainable = i >= start and (train_bn or not isinstance(layer, keras.layers.BatchNormalization))
        if layer.trainable and not train_bn:
            for sublayer in getattr(layer, "layers", ()):  # ConvNeXt's stem and downsampling layers.
                if isinstance(sublayer, keras.layers.BatchNormalization):
                    sublayer.trainable = False
    logging.info("Unfroze %d of %d weighted backbone layers from %s (%s).",
                 sum(layer.trainable for layer in layers), len(layers), layers[start].name, fine_tune_at)


def unfreeze_start(model: keras.Model, fine_tune_at: str) -> int:
    """Index among the backbone's weighted layers where phase 2 starts, for 'all', top:N (the last N
    blocks of blocks.py), a block's name or a weighted layer's name (a layer wins over a block of the
    same name; they start at the same layer anyway). A UserError naming the valid stages if there is
    none, raised before training so that a typo costs seconds, not a phase."""
    names = [layer.name for layer in model.get_layer(blocks.BACKBONE).layers if layer.weights]
    if fine_tune_at == blocks.ALL:
        return 0
    if fine_tune_at in names:
        return names.index(fine_tune_at)
    points = blocks.unfreeze_points(model)
    if fine_tune_at in points:
        return names.index(points[fine_tune_at])
    shown = ", ".join(names[:2] + ["..."] + names[-2:]) if len(names) > 6 else ", ".join(names)
    raise UserError(f"--fine_tune_at must be all, top:N for the last N stages "
                    f"({blocks.describe_points(model)}), a stage's name or a weighted layer of the backbone "
                    f"({shown}). "
                    f"Received: fine_tune_at={fine_tune_at}")


def build_extractor(model: keras.Model, boundaries: list, prefix: keras.Model | None = None):
    """Images -> activations at each of `boundaries` (a backbone boundary of find_split, or HEAD_INPUT),
    in one pass.

    `prefix` is find_split's model for the one backbone boundary, if any.
    """
    inputs = keras.Input(model.input.shape[1:], name="image")
    outputs = {}
    if prefix is not None:
        boundary = next(b for b in boundaries if b != HEAD_INPUT)
        outputs[boundary] = prefix(inputs)
        outputs[HEAD_INPUT] = build_model_from(model, boundary, stop_at=HEAD_INPUT)(outputs[boundary])
    else:
        outputs[HEAD_INPUT] = build_feature_extractor(model)(inputs)
    return keras.Model(inputs, [outputs[b] for b in boundaries], name="extractor")


@dataclasses.dataclass(frozen=True)
class Split:
    """Where a fine-tuning stage's classifier can be cut into "frozen part, then the rest" at one tensor:
    `prefix` maps preprocessed images to the output of the backbone operation `boundary`; `reason`
    says why there is no cut when `prefix` is None. `stored_name` names the boundary in files: its name,
    and where Keras generated that name (ConvNeXt's add_14, whose number depends on what the process
    built before), its position in the backbone too, so that another process never reads another
    boundary's activations under it."""

    prefix: keras.Model | None
    boundary: str | None
    reason: str = ""
    stored_name: str | None = None


def find_split(model: keras.Model, fine_tune_at: str) -> Split:
    """The highest cut below `fine_tune_at` at a single tensor (blocks.boundaries): VGG at any layer,
    ResNet or ConvNeXt between residual blocks, Inception between its mixed blocks; none in NASNet,
    whose cells each read the two cells before them. The frozen part below it runs once; a cut that
    would leave most of the frozen layers above it is refused."""
    backbone = model.get_layer(blocks.BACKBONE)
    weighted = [layer for layer in backbone.layers if layer.weights]
    start = weighted[unfreeze_start(model, fine_tune_at)]
    operations = backbone.operations
    first_trainable = next(i for i, op in enumerate(operations) if op is start)
    # The first layer with weights that can train (not EfficientNet's input normalization): a prefix
    # without one would store the images themselves.
    learnable = next(layer for layer in weighted if not isinstance(layer, keras.layers.Normalization))
    first_weighted = next(i for i, op in enumerate(operations) if op is learnable)
    if first_trainable <= first_weighted:
        return Split(None, None, f"every weighted backbone layer trains from {start.name}: none to cache")
    cuts = [i for i in blocks.boundaries(backbone) if first_weighted <= i < first_trainable]
    if not cuts:
        return Split(None, None, f"no single tensor separates the frozen layers below {start.name} from the "
                                 "rest: skip connections or branches cross every point between them")
    boundary = operations[cuts[-1]]
    # A cut low in the frozen part (NASNet's, above its stem) would store big activations to save little.
    weighted_ops = {id(layer) for layer in weighted}
    below = sum(id(op) in weighted_ops for op in operations[first_weighted:cuts[-1] + 1])
    above = sum(id(op) in weighted_ops for op in operations[cuts[-1] + 1:first_trainable])
    if above > below:
        return Split(None, None, f"the highest single-tensor cut below {start.name}, after {boundary.name}, "
                                 f"would leave {above} of the {above + below} frozen weighted layers to run "
                                 "every step: skip connections or branches cross every point above it")
    if backbones.batchnorm_mode(backbone) == registry.BN_TRAIN:
        random = [op.name for op in operations[:cuts[-1] + 1] if _behaves_differently_in_training(op)]
        if random:
            return Split(None, None, f"with --backbone_bn=train the frozen layers below {start.name} run in "
                                     f"training mode ({', '.join(random[:3])}...), which stored activations "
                                     "cannot reproduce")
    prefix = keras.Model(backbone.input, boundary.output, name=f"prefix_to_{boundary.name}")
    generated = re.fullmatch(rf"{_snake_case(type(boundary).__name__)}(_\d+)?", boundary.name)
    return Split(prefix, boundary.name, stored_name=f"{boundary.name}_at_{cuts[-1]}" if generated
                 else boundary.name)


def _snake_case(name: str) -> str:
    """'MaxPooling2D' -> 'max_pooling2d': how Keras names an operation it was not told to name."""
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def split_at(model: keras.Model, fine_tune_at: str):
    """(prefix, boundary) of find_split, or None where the backbone cannot be cut below `fine_tune_at`."""
    split = find_split(model, fine_tune_at)
    return None if split.prefix is None else (split.prefix, split.boundary)


def _behaves_differently_in_training(operation) -> bool:
    """Dropout and the like (EfficientNet's stochastic depth); not BatchNormalization, which Keras runs
    in inference mode while it is frozen."""
    if isinstance(operation, keras.layers.BatchNormalization):
        return False
    if isinstance(operation, keras.Model):
        return any(map(_behaves_differently_in_training, operation.operations))
    call = getattr(operation, "call", None)
    return call is not None and "training" in inspect.signature(call).parameters


def build_model_from(model: keras.Model, boundary: str, stop_at: str | None = None) -> keras.Model:
    """A model from the output of backbone operation `boundary` (or HEAD_INPUT) onward, sharing weights.

    Above a backbone boundary, the backbone's part above it is a model of its own, pinned to the same
    --backbone_bn mode (backbones.pin_mode), so that it runs exactly as inside the classifier. With
    stop_at=HEAD_INPUT it ends at the pooled features, which turns cached boundary activations into
    phase 1's features without rerunning the whole backbone.
    """
    if boundary == HEAD_INPUT:
        inputs = keras.Input(model.get_layer(HEAD_INPUT).output.shape[1:], name=f"{boundary}_activations")
        x = inputs
        for layer in head_layers(model):
            x = layer(x)
        return keras.Model(inputs, x, name=f"from_{boundary}")
    backbone = model.get_layer(blocks.BACKBONE)
    operation = next(op for op in backbone.operations if op.name == boundary)
    upper = backbones.pin_mode(
        keras.Model(operation.output, backbone.output, name=f"{blocks.BACKBONE}_from_{boundary}"),
        backbones.batchnorm_mode(backbone))
    inputs = keras.Input(operation.output.shape[1:], name=f"{boundary}_activations")
    x = model.get_layer(HEAD_INPUT)(upper(inputs))
    if stop_at != HEAD_INPUT:
        for layer in head_layers(model):
            x = layer(x)
    return keras.Model(inputs, x, name=f"from_{boundary}")
