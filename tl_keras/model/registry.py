"""Backbone registry as plain data, so config validation and --backbone=list need no TensorFlow.

Every image model of keras.applications (Keras 3.15) has an entry under a snake_case name;
tests/test_backbones.py compares the registry with keras.applications itself and names what it lacks.
The parameter counts are those of the headless model (include_top=False; trainable and not), which
do not depend on the input size; the same test checks them against built models.

KerasHub presets (--backbone=hub:PRESET) are not listed: keras_hub knows them (model/hub.py), and only
the name's form and whether keras_hub is installed are checked here, without importing it.
"""

import dataclasses
import difflib
import importlib.util

# --backbone_bn: how the backbone's BatchNormalization layers behave while fine-tuning.
# frozen: the backbone always runs in inference mode and BatchNormalization layers never train, as the
# Keras transfer-learning guide prescribes; train: unfrozen BatchNormalization layers normalise with
# batch statistics and update their moving statistics (and the backbone's own dropout is active).
BN_FROZEN = "frozen"
BN_TRAIN = "train"
BACKBONE_BN = (BN_FROZEN, BN_TRAIN)

LIST = "list"  # --backbone=list prints the registry and exits.

# --backbone=hub:PRESET: a KerasHub image backbone preset (tl_keras/model/hub.py), from an optional extra.
HUB = "hub:"
HUB_INSTALL = 'pip install -e ".[hub]" (or pip install "keras-hub>=0.32")'


@dataclasses.dataclass(frozen=True)
class Family:
    """What the backbones of one keras.applications module share."""

    title: str
    # How the family's preprocess_input maps RGB pixels: a key of PREPROCESSING.
    preprocessing: str
    # How tl_keras/model/blocks.py finds the family's stages (see its docstring).
    stages: str


CAFFE, TF, TORCH, RAW = "caffe", "tf", "torch", "raw"
PREPROCESSING = {  # keras.applications' own modes.
    CAFFE: "RGB -> BGR, minus the ImageNet mean per channel, no scaling",
    TF: "scaled to [-1, 1]",
    TORCH: "scaled to [0, 1], then standardised by the ImageNet mean and std per channel",
    RAW: "raw 0-255 pixels: the model rescales them inside, and preprocess_input is the identity",
}

FAMILIES = {
    "vgg": Family("VGG16/19", CAFFE, "name prefixes block1_ ... block5_"),
    "resnet": Family("ResNet50/101/152", CAFFE, "name prefixes conv1_ ... conv5_ (the stem, 4 stages)"),
    "resnet_v2": Family("ResNet50V2/101V2/152V2", TF,
                        "name prefixes conv1_ ... conv5_; post_bn joins conv5"),
    "inception_v3": Family("InceptionV3", TF,
                           "the stem up to its last single-tensor boundary, then one stage per mixed0 ... "
                           "mixed10 output (each branch layer joins the block its concatenation ends)"),
    "inception_resnet_v2": Family("InceptionResNetV2", TF,
                                  "the stem, mixed_5b, block35 (10 repeats), mixed_6a, block17 (20), "
                                  "mixed_7a, block8 (10), conv_7b"),
    "xception": Family("Xception", TF, "name prefixes block1_ ... block14_"),
    "mobilenet": Family("MobileNet", TF,
                        "conv1 (the stem), then a stage at each strided depthwise block: conv_dw_1, "
                        "conv_dw_2, conv_dw_4, conv_dw_6, conv_dw_12"),
    "mobilenet_v2": Family("MobileNetV2", TF,
                           "Conv1 (the stem), then a stage at each block without a residual add (the "
                           "paper's 7 stages), then Conv_1"),
    "mobilenet_v3": Family("MobileNetV3Small/Large", RAW,
                           "conv (the stem), then a stage at each expanded_conv block without a residual "
                           "add, then conv_1"),
    "densenet": Family("DenseNet121/169/201", TORCH,
                       "name prefixes conv1_ ... conv5_ (a dense block with the transition after it)"),
    "nasnet": Family("NASNetMobile/Large", TF,
                     "stem, the two reduction stem cells, then the normal cells between reductions "
                     "and each reduction cell (layer-name suffixes name the cell)"),
    "efficientnet": Family("EfficientNetB0-B7", RAW,
                           "name prefixes stem_, block1 ... block7, top_"),
    "efficientnet_v2": Family("EfficientNetV2B0-B3/S/M/L", RAW,
                              "name prefixes stem_, block1 ... block6 or block7, top_"),
    "convnext": Family("ConvNeXtTiny/Small/Base/Large/XLarge", RAW,
                       "the stem, then stage0 ... stage3 (each downsampling layer starts its stage)"),
    "tiny": Family("tiny (for tests only)", TF, "name prefixes block1_ ... block3_"),
}


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    # Attribute of keras.applications that builds it, or None for the test-only backbone.
    application: str | None
    # Key of FAMILIES.
    family: str
    # Module under keras.applications whose preprocess_input the backbone was trained with.
    preprocess_module: str
    # Smallest input side the architecture accepts (keras.applications' own minimum).
    min_image_size: int
    # Input side of its ImageNet weights.
    default_image_size: int
    # Parameters of the headless model, trainable and not.
    parameters: int

    @property
    def raw_pixels(self) -> bool:
        """Whether the model takes 0-255 pixels and rescales them itself."""
        return FAMILIES[self.family].preprocessing == RAW


def _specs(family: str, module: str, min_size: int, rows) -> dict:
    return {name: BackboneSpec(application, family, module, min_size, size, parameters)
            for name, application, size, parameters in rows}


BACKBONES = {
    # The five of earlier versions keep their preprocess_module: feature caches are keyed by it.
    **_specs("vgg", "vgg16", 32, [("vgg16", "VGG16", 224, 14_714_688)]),
    **_specs("vgg", "vgg19", 32, [("vgg19", "VGG19", 224, 20_024_384)]),
    **_specs("resnet", "resnet50", 32, [("resnet50", "ResNet50", 224, 23_587_712)]),
    **_specs("resnet", "resnet", 32, [
        ("resnet101", "ResNet101", 224, 42_658_176),
        ("resnet152", "ResNet152", 224, 58_370_944),
    ]),
    **_specs("resnet_v2", "resnet_v2", 32, [
        ("resnet50_v2", "ResNet50V2", 224, 23_564_800),
        ("resnet101_v2", "ResNet101V2", 224, 42_626_560),
        ("resnet152_v2", "ResNet152V2", 224, 58_331_648),
    ]),
    **_specs("inception_v3", "inception_v3", 75, [("inception_v3", "InceptionV3", 299, 21_802_784)]),
    **_specs("inception_resnet_v2", "inception_resnet_v2", 75, [
        ("inception_resnet_v2", "InceptionResNetV2", 299, 54_336_736)]),
    **_specs("xception", "xception", 71, [("xception", "Xception", 299, 20_861_480)]),
    **_specs("mobilenet", "mobilenet", 32, [("mobilenet", "MobileNet", 224, 3_228_864)]),
    **_specs("mobilenet_v2", "mobilenet_v2", 32, [("mobilenet_v2", "MobileNetV2", 224, 2_257_984)]),
    **_specs("mobilenet_v3", "mobilenet_v3", 32, [
        ("mobilenet_v3_small", "MobileNetV3Small", 224, 939_120),
        ("mobilenet_v3_large", "MobileNetV3Large", 224, 2_996_352),
    ]),
    **_specs("densenet", "densenet", 32, [
        ("densenet121", "DenseNet121", 224, 7_037_504),
        ("densenet169", "DenseNet169", 224, 12_642_880),
        ("densenet201", "DenseNet201", 224, 18_321_984),
    ]),
    **_specs("nasnet", "nasnet", 32, [
        ("nasnet_mobile", "NASNetMobile", 224, 4_269_716),
        ("nasnet_large", "NASNetLarge", 331, 84_916_818),
    ]),
    **_specs("efficientnet", "efficientnet", 32, [
        ("efficientnet_b0", "EfficientNetB0", 224, 4_049_571),
        ("efficientnet_b1", "EfficientNetB1", 240, 6_575_239),
        ("efficientnet_b2", "EfficientNetB2", 260, 7_768_569),
        ("efficientnet_b3", "EfficientNetB3", 300, 10_783_535),
        ("efficientnet_b4", "EfficientNetB4", 380, 17_673_823),
        ("efficientnet_b5", "EfficientNetB5", 456, 28_513_527),
        ("efficientnet_b6", "EfficientNetB6", 528, 40_960_143),
        ("efficientnet_b7", "EfficientNetB7", 600, 64_097_687),
    ]),
    **_specs("efficientnet_v2", "efficientnet_v2", 32, [
        ("efficientnet_v2_b0", "EfficientNetV2B0", 224, 5_919_312),
        ("efficientnet_v2_b1", "EfficientNetV2B1", 240, 6_931_124),
        ("efficientnet_v2_b2", "EfficientNetV2B2", 260, 8_769_374),
        ("efficientnet_v2_b3", "EfficientNetV2B3", 300, 12_930_622),
        ("efficientnet_v2_s", "EfficientNetV2S", 384, 20_331_360),
        ("efficientnet_v2_m", "EfficientNetV2M", 480, 53_150_388),
        ("efficientnet_v2_l", "EfficientNetV2L", 480, 117_746_848),
    ]),
    **_specs("convnext", "convnext", 32, [
        ("convnext_tiny", "ConvNeXtTiny", 224, 27_820_128),
        ("convnext_small", "ConvNeXtSmall", 224, 49_454_688),
        ("convnext_base", "ConvNeXtBase", 224, 87_566_464),
        ("convnext_large", "ConvNeXtLarge", 224, 196_230_336),
        ("convnext_xlarge", "ConvNeXtXLarge", 224, 348_147_968),
    ]),
    # For tests only: a few small conv blocks with VGG-style layer names.
    **_specs("tiny", "mobilenet_v2", 8, [("tiny", None, 32, 3_712)]),
}


def is_hub(name: str) -> bool:
    """Whether `name` is --backbone=hub:PRESET."""
    return name.startswith(HUB)


def hub_preset(name: str) -> str:
    """'hub:dinov2_small' -> 'dinov2_small': a KerasHub preset name, handle or directory."""
    return name[len(HUB):]


def hub_installed() -> bool:
    """Whether keras_hub can be imported; finds it without importing it (nor TensorFlow)."""
    return importlib.util.find_spec("keras_hub") is not None


def check_backbone(name: str, needs_package: bool = True) -> str | None:
    """None for a registered backbone or hub:PRESET, else what is wrong with `name`, with the nearest
    names. `needs_package`: hub:PRESET also needs keras_hub installed (not to read an export)."""
    if is_hub(name):
        if not hub_preset(name).strip():
            return "--backbone=hub:PRESET needs a KerasHub preset, such as hub:dinov2_small"
        if needs_package and not hub_installed():
            return f"--backbone=hub:PRESET needs KerasHub, an optional extra: {HUB_INSTALL}"
        return None
    if name in BACKBONES:
        return None
    near = difflib.get_close_matches(name, BACKBONES, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(near)}?)" if near else ""
    return f"--backbone must be a name that --backbone=list prints, or hub:PRESET{hint}"


def min_image_size(name: str) -> int:
    """The smallest --image_size the backbone takes; 1 for hub presets, whose build checks the size."""
    return 1 if is_hub(name) else BACKBONES[name].min_image_size


def preprocessing_id(name: str) -> str:
    """What names the backbone's preprocessing in feature cache keys: the keras.applications module, or
    for hub presets their own image converter (the preset is in the key as the backbone)."""
    return "keras_hub_image_converter" if is_hub(name) else BACKBONES[name].preprocess_module


def describe_preprocessing(name: str) -> str:
    """The backbone's preprocessing after resizing, for export metadata."""
    if is_hub(name):
        return (f"the image converter of KerasHub preset {hub_preset(name)}: pixels * scale + offset, per "
                "channel")
    return f"keras.applications.{BACKBONES[name].preprocess_module}.preprocess_input"


def describe() -> str:
    """--backbone=list: every backbone with its family, parameters and input sizes; builds nothing."""
    lines = ["Backbones (--backbone=NAME): parameters of the headless model; sizes are input sides in",
             "pixels, the default being that of the ImageNet weights.", "",
             f"{'name':<22}{'family':<22}{'parameters':>12}{'default':>9}{'min':>6}  preprocessing"]
    for name, spec in sorted(BACKBONES.items(), key=lambda item: (item[1].family == "tiny", item[0])):
        lines.append(f"{name:<22}{spec.family:<22}{_millions(spec.parameters):>12}"
                     f"{spec.default_image_size:>9}{spec.min_image_size:>6}  "
                     f"{FAMILIES[spec.family].preprocessing}")
    lines += ["", f"{len(BACKBONES) - 1} keras.applications models, and tiny (for tests only).",
              "Preprocessing:"]
    lines += [f"  {mode:<6} {meaning}" for mode, meaning in PREPROCESSING.items()]
    lines += ["Stages (--fine_tune_at=top:N): see tl_keras/model/blocks.py.",
              f"{HUB}PRESET: any KerasHub image backbone preset, such as {HUB}dinov2_small "
              '(pip install -e ".[hub]").']
    return "\n".join(lines) + "\n"


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 100_000 else f"{count:,}"
