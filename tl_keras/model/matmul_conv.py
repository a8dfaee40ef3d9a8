"""Convolutions on tiny feature maps as one matmul, because TF's CPU kernels are slow there.

At 32x32 input, VGG16's block 4 and 5 run on 4x4 and 2x2 maps. There, TF's CPU kernel for the
kernel gradient (Conv2DBackpropFilter, oneDNN on) manages 5 GMAC/s at 2x2 and 30 at 4x4, against
~60 for a plain matmul; measured per layer at batch 64 on a 2-core AMD EPYC:

    block5_conv1 (2x2, 512->512):  fwd+grads 557 ms -> 167 ms for three layers
    block4_conv2 (4x4, 512->512):  fwd+grads 713 ms -> 465 ms for three layers
    block3_conv2 (8x8, 256->256):  391 ms -> 675 ms, so larger maps keep the native kernel

Written as gathered patches times the reshaped kernel, the forward pass and both gradients are
matmuls. Only the layer's convolution_op (Conv2D's hook for this) changes: the class, config and
weight paths stay Conv2D's, so checkpoints and exports do not know the difference.
"""

import functools

import keras
from keras import ops

# Feature maps of at most this many positions (4x4) use the matmul form.
MAX_POSITIONS = 16


def matmul_convolution(layer: keras.layers.Conv2D, inputs, kernel):
    """A stride-1 'same' convolution as patches @ kernel."""
    kh, kw = layer.kernel_size
    height, width, channels = inputs.shape[1], inputs.shape[2], inputs.shape[3]
    padded = ops.pad(inputs, [[0, 0], [kh // 2, kh // 2], [kw // 2, kw // 2], [0, 0]])
    # Patch layout (dy, dx, channel) matches the kernel's (kh, kw, in, out) layout.
    patches = ops.concatenate(
        [padded[:, i:i + height, j:j + width, :] for i in range(kh) for j in range(kw)], axis=-1)
    outputs = ops.matmul(ops.reshape(patches, (-1, kh * kw * channels)),
                         ops.reshape(kernel, (kh * kw * channels, layer.filters)))
    return ops.reshape(outputs, (-1, height, width, layer.filters))


def eligible(layer) -> bool:
    """A plain Conv2D that the matmul form computes identically, on a map small enough to gain."""
    if type(layer) is not keras.layers.Conv2D:
        return False
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError):  # Never called, or shared between several inputs.
        return False
    kh, kw = layer.kernel_size
    return (layer.strides == (1, 1) and layer.dilation_rate == (1, 1) and layer.groups == 1
            and layer.padding == "same" and layer.data_format == "channels_last"
            and kh % 2 == 1 and kw % 2 == 1
            and None not in shape[1:] and shape[1] * shape[2] <= MAX_POSITIONS)


def is_converted(layer) -> bool:
    return isinstance(vars(layer).get("convolution_op"), functools.partial)


def convert(model: keras.Model) -> int:
    """Switch the eligible Conv2D layers of `model` to the matmul form, in place; return how many."""
    layers = [layer for layer in model.layers if eligible(layer) and not is_converted(layer)]
    for layer in layers:
        layer.convolution_op = functools.partial(matmul_convolution, layer)
    return len(layers)
