"""How the classifier turns the backbone's output into one feature vector per image: a feature map
[N, H, W, C] by its average (GlobalAveragePooling2D, every keras.applications backbone), a transformer's
tokens [N, T, C] by its class token (ViT, DINOv2) or, for one without a class token, by their mean.

A backbone says which by its `pooling` attribute (backbones.build_backbone sets it, from model/hub.py for
KerasHub presets); one without the attribute gives feature maps.
"""

import keras

AVERAGE = "average"  # GlobalAveragePooling2D over a feature map.
CLASS_TOKEN = "class_token"  # Token 0 of [N, T, C], where ViT and DINOv2 put the class token.
TOKEN_MEAN = "token_mean"  # The mean of [N, T, C] over its tokens.
POOLINGS = (AVERAGE, CLASS_TOKEN, TOKEN_MEAN)


@keras.saving.register_keras_serializable(package="tl_keras")
class TokenPooling(keras.layers.Layer):
    """Tokens [N, T, C] -> [N, C]: the class token (token 0), or the mean of the tokens."""

    def __init__(self, mode: str = CLASS_TOKEN, **kwargs):
        super().__init__(**kwargs)
        if mode not in (CLASS_TOKEN, TOKEN_MEAN):
            raise ValueError(f"mode must be {CLASS_TOKEN} or {TOKEN_MEAN}. Received: mode={mode}")
        self.mode = mode

    def call(self, tokens):
        return tokens[:, 0] if self.mode == CLASS_TOKEN else keras.ops.mean(tokens, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return dict(super().get_config(), mode=self.mode)


def get_pooling(backbone: keras.Model) -> str:
    """The backbone's pooling, one of POOLINGS."""
    return getattr(backbone, "pooling", AVERAGE)


def build_pooling(backbone: keras.Model, name: str) -> keras.layers.Layer:
    """The pooling layer, named `name`, for the backbone's output."""
    mode = get_pooling(backbone)
    if mode == AVERAGE:
        return keras.layers.GlobalAveragePooling2D(name=name)
    return TokenPooling(mode, name=name)
