"""The classifier: a backbone, pooling and the head; which layers train in each phase; where the
model can be cut for the feature cache."""

from absl import logging
import keras

from tl_keras.errors import UserError
from tl_keras.model import backbones

HEAD_INPUT = "gap"  # Everything after this layer is the head; its output is what phase 1 caches.
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
) -> keras.Model:
    """Frozen backbone, GAP, then the head: Dense logits named "predictions", then a Softmax, both
    float32 under mixed precision.

    The softmax is a layer of its own so that exports can return the logits beside the probabilities
    and divide them by a temperature. It has no weights, and the Dense layer keeps its name, so
    checkpoints written when that layer applied the softmax itself load unchanged.
    """
    backbone = backbones.build_backbone(backbone_name, image_size, weights, matmul_small_convs)
    backbone.trainable = False
    inputs = keras.Input((image_size, image_size, 3), name="image")
    # training=False keeps BatchNormalization in inference mode even after unfreezing.
    x = backbone(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D(name=HEAD_INPUT)(x)
    if head_batchnorm:
        x = keras.layers.BatchNormalization(name="head_batchnorm")(x)
    for i, units in enumerate(head_units, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"head_dense_{i}")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    logits = keras.layers.Dense(num_classes, dtype="float32", name=LOGITS)(x)
    outputs = keras.layers.Softmax(dtype="float32", name=PROBABILITIES)(logits)
    return keras.Model(inputs, outputs, name=f"{backbone_name}_classifier")


def head_layers(model: keras.Model) -> list:
    """The layers after pooling, in order: the part phase 1 trains."""
    names = [layer.name for layer in model.layers]
    return model.layers[names.index(HEAD_INPUT) + 1:]


def build_feature_extractor(model: keras.Model) -> keras.Model:
    """Images to pooled backbone features, sharing layers with `model`."""
    return keras.Model(model.inputs, model.get_layer(HEAD_INPUT).output, name="feature_extractor")


def freeze_backbone(model: keras.Model):
    """Phase 1: only the head trains. Recompile afterwards."""
    model.get_layer("backbone").trainable = False


def unfreeze_backbone(model: keras.Model, fine_tune_at: str):
    """Phase 2: unfreeze backbone layers from `fine_tune_at` upward. Recompile afterwards.

    Setting trainable on a model sets it on every sublayer, so the backbone flag goes first and the
    per-layer flags after it. BatchNormalization layers stay frozen: their statistics suit the weights.
    """
    backbone = model.get_layer("backbone")
    layers = [layer for layer in backbone.layers if layer.weights]
    start = unfreeze_start(model, fine_tune_at)
    backbone.trainable = True
    for i, layer in enumerate(layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    logging.info("Unfroze %d of %d weighted backbone layers from %s.",
                 sum(layer.trainable for layer in layers), len(layers), layers[start].name)


def unfreeze_start(model: keras.Model, fine_tune_at: str) -> int:
    """Index among the backbone's weighted layers where phase 2 starts; a UserError if there is none,
    raised before training so that a typo costs seconds, not a phase."""
    names = [layer.name for layer in model.get_layer("backbone").layers if layer.weights]
    if fine_tune_at == "all":
        return 0
    if fine_tune_at in names:
        return names.index(fine_tune_at)
    shown = ", ".join(names[:3] + ["..."] + names[-3:]) if len(names) > 8 else ", ".join(names)
    raise UserError(f"--fine_tune_at must be 'all' or a weighted layer of the backbone ({shown}). "
                    f"Received: fine_tune_at={fine_tune_at}")


def build_extractor(model: keras.Model, boundaries: list, prefix: keras.Model | None = None):
    """Images -> activations at each of `boundaries` (backbone layer names or HEAD_INPUT), one pass.

    `prefix` is split_at's model for the one backbone boundary, if any.
    """
    inputs = keras.Input(model.input.shape[1:], name="image")
    outputs = {}
    if prefix is not None:
        boundary = prefix.layers[-1].name
        outputs[boundary] = prefix(inputs)
        outputs[HEAD_INPUT] = build_model_from(model, boundary, stop_at=HEAD_INPUT)(outputs[boundary])
    else:
        outputs[HEAD_INPUT] = build_feature_extractor(model)(inputs)
    return keras.Model(inputs, [outputs[b] for b in boundaries], name="extractor")


def split_at(model: keras.Model, fine_tune_at: str):
    """(prefix, boundary) for caching the frozen part below `fine_tune_at`, or None.

    prefix maps preprocessed images to the input of `fine_tune_at`. Only a backbone that is a plain
    chain of layers (VGG) can be cut there; with skip connections (ResNet) a cut would lose them.
    """
    backbone = model.get_layer("backbone")
    layers = backbone.layers
    names = [layer.name for layer in layers]
    if fine_tune_at not in names or names.index(fine_tune_at) < 2:
        return None
    for previous, layer in zip(layers, layers[1:]):
        if layer.input is not previous.output:
            return None
    boundary = layers[names.index(fine_tune_at) - 1]
    prefix = keras.Model(backbone.input, boundary.output, name=f"prefix_to_{boundary.name}")
    return prefix, boundary.name


def build_model_from(model: keras.Model, boundary: str, stop_at: str | None = None) -> keras.Model:
    """A model from the output of backbone layer `boundary` (or HEAD_INPUT) onward, sharing weights.

    With stop_at=HEAD_INPUT it ends at the pooled features, which turns cached boundary activations
    into phase 1's features without rerunning the whole backbone.
    """
    backbone = model.get_layer("backbone")
    if boundary == HEAD_INPUT:
        layers, shape = head_layers(model), model.get_layer(HEAD_INPUT).output.shape[1:]
    else:
        names = [layer.name for layer in backbone.layers]
        layers = backbone.layers[names.index(boundary) + 1:] + [model.get_layer(HEAD_INPUT)]
        if stop_at != HEAD_INPUT:
            layers += head_layers(model)
        shape = backbone.get_layer(boundary).output.shape[1:]
    inputs = keras.Input(shape, name=f"{boundary}_activations")
    x = inputs
    for layer in layers:
        # Backbone layers run in inference mode, exactly as inside the classifier.
        x = layer(x, training=False) if layer in backbone.layers else layer(x)
    return keras.Model(inputs, x, name=f"from_{boundary}")
