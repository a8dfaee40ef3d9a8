"""Backbone registry as plain data, so config validation needs no TensorFlow."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    # Attribute of keras.applications that builds it, or None for the test-only backbone.
    application: str | None
    # Module under keras.applications whose preprocess_input the backbone was trained with.
    preprocess_module: str
    # Smallest input side the architecture accepts.
    min_image_size: int


BACKBONES = {
    "vgg16": BackboneSpec("VGG16", "vgg16", 32),
    "vgg19": BackboneSpec("VGG19", "vgg19", 32),
    "resnet50": BackboneSpec("ResNet50", "resnet50", 32),
    "mobilenet_v2": BackboneSpec("MobileNetV2", "mobilenet_v2", 32),
    "efficientnet_b0": BackboneSpec("EfficientNetB0", "efficientnet", 32),
    # For tests only: a few small conv blocks with VGG-style layer names.
    "tiny": BackboneSpec(None, "mobilenet_v2", 8),
}
