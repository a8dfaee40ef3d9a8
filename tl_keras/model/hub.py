"""KerasHub image backbones, --backbone=hub:PRESET. The one module that imports keras_hub, and only when
a hub backbone is built: keras-hub is an optional extra (registry.HUB_INSTALL).

A preset gives two things: its Backbone, built here headless for image_size x image_size images, and
its ImageConverter, whose scale and offset become the backbone's preprocess_input. The training
pipeline and the export resize first, as for every backbone, so the converter's own resizing is unused.

ViT and DINOv2 keep their transformer layers inside one encoder layer. They are rebuilt here as a flat
functional graph of the very same layers (same weights, same computation, in keras_hub's call order), so
that each transformer layer is a layer of the backbone: blocks.py finds the blocks that
--fine_tune_at=top:N, --unfreeze_schedule and --layerwise_lr_decay count, and the feature cache can cut
between two of them. Their output is the token sequence, which the classifier pools by the class token
(model/pooling.py). Other backbones keep keras_hub's own graph; their feature maps are averaged.

load_backbone and load_image_converter are the only functions that fetch a preset; tests replace them
with small configurations, so that no test downloads anything.
"""

import contextlib
import difflib
import os

from absl import logging
import keras
import numpy as np

from tl_keras.errors import UserError, first_line
from tl_keras.model import pooling
from tl_keras.model import registry


def load_backbone(preset: str, image_size: int, load_weights: bool) -> keras.Model:
    """keras_hub's Backbone of `preset` for image_size x image_size RGB images, with the preset's weights
    or (load_weights=False) its architecture alone, in the global dtype policy."""
    keras_hub = _import(preset)
    check_preset(preset)
    return keras_hub.models.Backbone.from_preset(preset, load_weights=load_weights,
                                                 image_shape=(image_size, image_size, 3))


def load_image_converter(preset: str) -> keras.layers.Layer:
    """keras_hub's ImageConverter of `preset`: the preprocessing its weights expect."""
    keras_hub = _import(preset)
    check_preset(preset)
    return keras_hub.layers.ImageConverter.from_preset(preset)


def check_preset(preset: str):
    """A UserError unless `preset` is a built-in KerasHub preset with an image converter (every image
    backbone's), a handle such as kaggle://... or hf://..., or a directory; raised before any download."""
    if "://" in preset or os.path.isdir(preset):
        return
    known = _import(preset).layers.ImageConverter.presets
    if preset not in known:
        near = difflib.get_close_matches(preset, known, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(near)}?)" if near else ""
        raise UserError(f"--backbone=hub:PRESET needs a KerasHub image preset{hint}: a name of "
                        "keras_hub.layers.ImageConverter.presets, a handle such as kaggle://... or hf://..., "
                        f"or a preset directory. Received: backbone={registry.HUB}{preset}")


def get_preprocess_input(preset: str):
    """The preset's image converter as a preprocess_input: float RGB pixels -> pixels * scale + offset,
    per channel, in ops that run on numpy arrays, in tf.data and inside the exported graph."""
    with _user_errors(preset, f"Could not load the image converter of KerasHub preset {preset}"):
        converter = load_image_converter(preset)
    scale, offset = converter_affine(converter, preset)

    def preprocess_input(images):
        return images * scale + offset

    return preprocess_input


def converter_affine(converter, preset: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) of `preset`'s ImageConverter, each a float32 scalar or one value per channel. A
    converter that does more than resize, scale and offset has no such pair: a UserError."""
    if type(converter).call is not _import(preset).layers.ImageConverter.call:
        raise UserError(f"The image converter of KerasHub preset {preset}, {type(converter).__name__}, does "
                        "more than scale and offset pixels, which tl_keras cannot put into its pipeline. "
                        f"Received: backbone={registry.HUB}{preset}")
    scale = 1.0 if converter.scale is None else converter.scale
    offset = 0.0 if converter.offset is None else converter.offset
    return np.asarray(scale, np.float32), np.asarray(offset, np.float32)


def build_backbone(preset: str, image_size: int, load_weights: bool):
    """(inputs, outputs, pooling) of the backbone of `preset`: the graph that backbones.build_backbone
    names "backbone", and how the classifier pools its output (one of pooling.POOLINGS)."""
    with _user_errors(preset, f"Could not build the backbone of KerasHub preset {preset} for "
                              f"{image_size}x{image_size} images", lambda: _size_hint(preset, image_size)):
        hub_backbone = load_backbone(preset, image_size, load_weights)
    keras_hub = _import(preset)
    received = f"Received: backbone={registry.HUB}{preset}"
    inputs = keras.tree.flatten(hub_backbone.inputs)
    outputs = keras.tree.flatten(hub_backbone.outputs)
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) != 1:
        raise UserError(f"{type(hub_backbone).__name__} is not an image backbone with one image input and "
                        f"one output, which tl_keras needs. {received}")
    layers = _transformer_layers(hub_backbone, keras_hub)
    if layers is not None:
        layers, mode = layers
        image = keras.Input(inputs[0].shape[1:], name="images")
        x = image
        for layer in layers:
            copy = _copy(layer)
            x = copy(x)
            unused = _UNUSED.get(type(layer).__name__, ({}, ()))[1]
            copy.set_weights([value for variable, value in zip(layer.weights, layer.get_weights())
                              if variable.name not in unused])
        return image, x, mode
    rank = len(outputs[0].shape)
    if rank == 4:
        return inputs[0], outputs[0], pooling.AVERAGE
    if rank == 3:
        logging.info("%s gives tokens and tl_keras knows no class token of it: the head gets their mean.",
                     type(hub_backbone).__name__)
        return inputs[0], outputs[0], pooling.TOKEN_MEAN
    raise UserError(f"{type(hub_backbone).__name__} gives outputs of shape {outputs[0].shape}; tl_keras "
                    f"pools feature maps [N, H, W, C] and tokens [N, T, C]. {received}")


def _transformer_layers(hub_backbone, keras_hub):
    """(layers in call order, pooling) of a backbone whose transformer layers keras_hub keeps inside one
    encoder layer, or None for the others."""
    if isinstance(hub_backbone, keras_hub.models.ViTBackbone):
        # ViTBackbone: patching and embedding, then ViTEncoder: dropout, its blocks, a LayerNormalization.
        embedding = hub_backbone.get_layer("vit_patching_and_embedding")
        encoder = hub_backbone.get_layer("vit_encoder")
        mode = pooling.CLASS_TOKEN if hub_backbone.use_class_token else pooling.TOKEN_MEAN
        return [embedding, encoder.dropout, *encoder.encoder_layers, encoder.layer_norm], mode
    if isinstance(hub_backbone, keras_hub.models.DINOV2Backbone):
        # Embeddings (class token, registers after it), DINOV2Encoder's layers, a LayerNormalization.
        layers = [hub_backbone.embeddings, *hub_backbone.encoder.layers, hub_backbone.layernorm]
        return layers, pooling.CLASS_TOKEN
    return None


# What classifying images never uses, left out of the copies so that no optimizer warns of weights
# without gradients: class name -> (config values that leave it out, the weights that go). DINOv2 masks
# patches only in its self-supervised training.
_UNUSED = {"DINOV2Embedding": ({"use_mask_token": False}, ("mask_token",))}

# keras_hub 0.32 layers whose get_config lists derived values that their constructor refuses, or leaves
# arguments out: class name -> (keys to drop, attributes to add). Keras can clone them only with these.
_CONFIG_FIXES = {
    "ViTPatchingAndEmbedding": (("num_patches", "num_positions"), ("use_patch_bias", "data_format")),
    "ViTEncoderBlock": (("key_dim",), ()),
}


def _copy(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A new, unbuilt instance of `layer`, from its config, for the flat graph. Not `layer` itself: Keras
    reads a layer's input and output from its first call (the feature cache's cuts do), which was in
    keras_hub's graph. The copy's config rebuilds it (_CONFIG_FIXES), as the export's float32 copy needs,
    and leaves out what images never use (_UNUSED)."""
    _rebuildable(layer)
    overrides = _UNUSED.get(type(layer).__name__, ({}, ()))[0]
    copy = type(layer).from_config(dict(layer.get_config(), **overrides))
    _rebuildable(copy)
    return copy


def _rebuildable(layer):
    """Make `layer.get_config()` rebuild it, where _CONFIG_FIXES says how. Only the instance changes (as
    backbones.pin_mode changes a model's call): its class stays keras_hub's."""
    if type(layer).__name__ not in _CONFIG_FIXES:
        return
    drop, add = _CONFIG_FIXES[type(layer).__name__]
    own = layer.get_config

    def get_config():
        config = {key: value for key, value in own().items() if key not in drop}
        return dict(config, **{name: getattr(layer, name) for name in add})

    layer.get_config = get_config


def _import(preset: str):
    try:
        import keras_hub
    except ImportError:
        raise UserError(f"--backbone=hub:PRESET needs KerasHub, an optional extra: {registry.HUB_INSTALL}. "
                        f"Received: backbone={registry.HUB}{preset}") from None
    return keras_hub


def _size_hint(preset: str, image_size: int) -> str:
    """Where the preset's image converter resizes to another size than `image_size` (a ViT's position
    embeddings fit that size only), a hint to use it."""
    try:
        size = load_image_converter(preset).image_size
    except (OSError, ValueError, UserError):
        size = None
    if not size or tuple(size) == (image_size, image_size):
        return ""
    return f"; its image converter resizes to {size[0]}x{size[1]}: try --image_size={size[0]}"


@contextlib.contextmanager
def _user_errors(preset: str, failed: str, hint=lambda: ""):
    """A preset that cannot be fetched (offline, a wrong handle) or built (an image size its architecture
    refuses) as one line, as the ImageNet weights are. `hint()` adds to a build's error."""
    received = f"Received: backbone={registry.HUB}{preset}"
    try:
        yield
    except OSError as e:  # requests' ConnectionError, kagglehub's and huggingface_hub's HTTP errors.
        if os.path.isdir(preset):
            raise UserError(f"Could not read KerasHub preset directory {preset} ({first_line(e)}). "
                            f"{received}") from None
        raise UserError(
            f"Could not download KerasHub preset {preset} ({first_line(e)}). To run offline, pass "
            f"--backbone=hub:DIR, a copy of the preset's directory (keras_hub downloads presets into "
            f"~/.cache/kagglehub). {received}") from None
    except ValueError as e:
        raise UserError(f"{failed} ({first_line(e)}){hint()}. {received}") from None
