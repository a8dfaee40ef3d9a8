"""Every export format from one float32 Keras model that takes what serving_default takes.

The deploy model maps uint8 images [N, H, W, 3] of any size to {"logits", "probabilities"}: it
resizes and preprocesses inside, exactly as training did, then divides the classifier's logits by
the calibration temperature. Keras's own `model.export(format="onnx" | "openvino" | "litert")` and
TFLite's converter turn it into the other formats, so no converter here is our own. ONNX needs the
float32 policy, so the classifier given must be a float32 copy, even after a bf16 or float16 run.
"""

import contextlib
import functools
import json
import os
import warnings

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tl_keras import files
from tl_keras.model import classifier
from tl_keras.model import registry
from tl_keras.serving import formats

METADATA_FILE = "metadata.json"
INPUT_NAME = "images"
OUTPUTS = ("logits", "probabilities")
CLASSIFIER = "classifier"  # The deploy model's nested classifier: the trained model up to its logits.
# A head BatchNormalization channel whose output moves by less than this on every representative image
# (in the units of its output, where a live channel varies by about |gamma|) is a constant to the int8
# export: see constant_head_channels_folded.
CONSTANT_CHANNEL_TOLERANCE = 1e-2


class Preprocess(keras.layers.Layer):
    """uint8 images of any size -> the backbone's float input, with the training pipeline's function.

    The cast comes first: tf2onnx gives a resize of uint8 a uint8 output (TF gives float32), which
    ONNX Runtime then refuses. Resizing float32 gives the same values.
    """

    def __init__(self, preprocess, image_size: int, **kwargs):
        super().__init__(**kwargs)
        self.preprocess = preprocess
        self.image_size = image_size

    def call(self, images):
        return self.preprocess(tf.cast(images, tf.float32))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.image_size, self.image_size, 3)


class MirrorImages(keras.layers.Layer):
    """Images [N, H, W, C] -> their mirror images (left and right swapped), for test-time augmentation."""

    def call(self, images):
        return keras.ops.flip(images, axis=2)

    def compute_output_shape(self, input_shape):
        return input_shape


@contextlib.contextmanager
def float32_policy():
    """Layers built inside compute in float32, whatever global policy the run trained with."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def float32_copy(model: keras.Model) -> keras.Model:
    """`model` rebuilt with the float32 policy and its weights: what every format is exported from,
    whatever precision trained it. Layers keep their names; matmul convolutions become plain ones, and
    grouped convolutions with one input channel per group (ConvNeXt's) DepthwiseConv2D: Keras runs
    grouped ones on CPU through XLA, which tf2onnx cannot convert."""
    def to_float32(layer):
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = "float32"
        if _one_channel_groups(layer):
            return keras.layers.DepthwiseConv2D(
                config["kernel_size"], config["strides"], config["padding"], depth_multiplier=1,
                data_format=config["data_format"], dilation_rate=config["dilation_rate"],
                activation=config["activation"], use_bias=config["use_bias"], name=config["name"],
                dtype=config["dtype"], trainable=config["trainable"])
        return layer.__class__.from_config(config)

    with float32_policy():
        copy = keras.models.clone_model(model, clone_function=to_float32, recursive=True)
    values = []
    for value, variable in zip(model.get_weights(), copy.weights):
        if value.shape != tuple(variable.shape):  # A grouped kernel (h, w, 1, C) as a depthwise one (h, w, C, 1).
            value = np.swapaxes(value, 2, 3)
        values.append(value)
    copy.set_weights(values)
    return copy


def _one_channel_groups(layer) -> bool:
    return (type(layer) is keras.layers.Conv2D and layer.groups > 1 and layer.groups == layer.filters
            and layer.kernel.shape[2] == 1)


def build_deploy_model(model: keras.Model, preprocess, image_size: int,
                       temperature: float = 1.0, tta: bool = False) -> keras.Model:
    """uint8 images -> {"logits": logits / temperature, "probabilities": their softmax}, float32.

    `model` is a float32 classifier (build_classifier's layers); the deploy model shares its weights.
    With `tta` (--export_tta) the logits are the mean of the image's and its mirror image's.
    """
    if model.get_layer(classifier.LOGITS).compute_dtype != "float32" or any(
            layer.compute_dtype != "float32" for layer in model.get_layer("backbone").layers):
        raise ValueError(f"The deploy model needs a float32 classifier. Received: model={model.name}")
    with float32_policy():
        logits_model = keras.Model(model.inputs, model.get_layer(classifier.LOGITS).output, name=CLASSIFIER)
        images = keras.Input((None, None, 3), dtype="uint8", name=INPUT_NAME)
        inputs = Preprocess(preprocess, image_size, name="preprocess")(images)
        logits = logits_model(inputs)
        if tta:
            mirrored = logits_model(MirrorImages(name="mirror")(inputs))
            logits = keras.layers.Average(name="tta_flip")([logits, mirrored])
        if temperature != 1.0:
            logits = keras.layers.Rescaling(1.0 / temperature, name="temperature")(logits)
        probabilities = keras.layers.Softmax(name="probabilities")(logits)
        return keras.Model(images, {"logits": logits, "probabilities": probabilities}, name="deploy")


@contextlib.contextmanager
def constant_head_channels_folded(deploy_model: keras.Model, representative_images):
    """While inside, each head BatchNormalization channel that is constant on the representative images
    (to CONSTANT_CHANNEL_TOLERANCE) has gamma 0 and, as beta, the output it gives them; after, the weights
    are back. Yields {layer name: channels made constant}.

    Why: a backbone channel that its ReLU never opens (VGG16 trained on CIFAR-10 has ~100 of 512) leaves
    the head BatchNormalization a moving variance near 0, so a scale gamma / sqrt(variance + epsilon) up
    to 1 / sqrt(epsilon) ~ 32, against ~0.1 for a live channel of VGG-sized activations (variance ~100).
    The int8 converter folds the BatchNormalization into the Dense after it, whose per-output-channel
    weight range the dead channels' rows then set: the live weights round to 0 and the model gives one
    class for every image. A constant channel adds the same to the next layer's input for every image
    whatever its scale, so the float model computes the same on these images, and the int8 weights keep
    their resolution.
    """
    layers = [layer for layer in classifier.head_layers(deploy_model.get_layer(CLASSIFIER))
              if isinstance(layer, keras.layers.BatchNormalization) and layer.scale and layer.center]
    saved = [(layer, layer.gamma.numpy(), layer.beta.numpy()) for layer in layers]
    folded = {}
    try:
        inputs_of = _head_inputs(deploy_model, layers, representative_images)
        for (layer, gamma, beta), inputs in zip(saved, inputs_of):
            scale = gamma / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
            inputs = np.moveaxis(inputs, layer.axis, -1).reshape(-1, len(gamma))  # [examples, channels]
            low, high = inputs.min(axis=0), inputs.max(axis=0)
            constant = (high - low) / 2 * np.abs(scale) <= CONSTANT_CHANNEL_TOLERANCE
            value = beta + scale * ((low + high) / 2 - layer.moving_mean.numpy())
            layer.gamma.assign(np.where(constant, 0.0, gamma))
            layer.beta.assign(np.where(constant, value, beta))
            folded[layer.name] = int(constant.sum())
            logging.info("int8: %d of %d channels of %s are constant on the %d representative images, so "
                         "their scales (up to %.3g; the others' up to %.3g) stay out of the int8 weights "
                         "after it.",
                         folded[layer.name], len(gamma), layer.name, len(representative_images),
                         np.abs(scale[constant]).max(initial=0.0), np.abs(scale[~constant]).max(initial=0.0))
        yield folded
    finally:
        for layer, gamma, beta in saved:
            layer.gamma.assign(gamma)
            layer.beta.assign(beta)


def _head_inputs(deploy_model: keras.Model, layers, images) -> list:
    """What each of `layers` (head layers of the deploy model's classifier) receives for `images`
    (uint8 [H, W, 3], any sizes), and for their mirror images too when the deploy model averages both:
    one array [N, ...] per layer."""
    if not layers:
        return []
    preprocess = deploy_model.get_layer("preprocess")
    logits_model = deploy_model.get_layer(CLASSIFIER)
    probe = keras.Model(logits_model.inputs, [layer.input for layer in layers])
    mirrored = any(isinstance(layer, MirrorImages) for layer in deploy_model.layers)
    by_size = {}
    for image in images:
        by_size.setdefault(np.shape(image), []).append(image)
    outputs = [[] for _ in layers]
    for same_size in by_size.values():
        for start in range(0, len(same_size), 64):
            inputs = preprocess(np.stack(same_size[start:start + 64]))
            for view in [inputs, keras.ops.flip(inputs, axis=2)] if mirrored else [inputs]:
                for output, value in zip(outputs, keras.tree.flatten(probe(view, training=False))):
                    output.append(np.asarray(value))
    return [np.concatenate(output) for output in outputs]


def write_format(name: str, deploy_model: keras.Model, directory: str, representative_images=None):
    """Write format `name` (not the SavedModel: export.write_saved_model) of `deploy_model` into `directory`.

    `representative_images` (uint8 [H, W, 3] arrays, any sizes) calibrate the int8 quantization.
    """
    path = os.path.join(directory, formats.FILES[name])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if name == formats.ONNX:
        _teach_tf2onnx_erfc()
        with warnings.catch_warnings(), _tensor_attributes_as_arrays(deploy_model):
            warnings.simplefilter("ignore", FutureWarning)  # Keras's numpy 2 patch of tf2onnx asks np.object.
            # The signature given: Keras derives it only from a model that was called once.
            deploy_model.export(path, format="onnx", verbose=False, input_signature=[
                tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME)])
    elif name == formats.OPENVINO:
        deploy_model.export(path, format="openvino", verbose=False)
    elif name == formats.TFLITE_INT8:
        if not representative_images:
            raise ValueError("int8 quantization needs representative images. Received: none")

        def representative_dataset():
            for image in representative_images:
                yield [image[None]]

        # Weights and activations int8, calibrated on the images; uint8 pixels in, cast inside (so any
        # pixel value is exact), float32 logits and probabilities out (dequantized at the end).
        with constant_head_channels_folded(deploy_model, representative_images):
            deploy_model.export(path, format="litert", verbose=False,
                                optimizations=[tf.lite.Optimize.DEFAULT],
                                representative_dataset=representative_dataset,
                                target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
                                inference_input_type=tf.uint8, inference_output_type=tf.float32)
    else:
        raise ValueError(f"write_format writes {', '.join(formats.FILES)} but not the SavedModel "
                         f"(export.write_saved_model does). Received: name={name}")
    logging.info("Wrote %s.", path)


@contextlib.contextmanager
def _tensor_attributes_as_arrays(model: keras.Model):
    """Constants that a layer makes when it is built and keeps as eager tensors (a KerasHub ViT's
    position ids) are captured by every traced function as an input of its own, and tf2onnx keeps
    captures as inputs of the ONNX model, which then needs them fed. As numpy arrays they are
    constants of the graph. Restored after."""
    swapped = []
    for layer in model._flatten_layers(include_self=False, recursive=True):  # pylint: disable=protected-access
        for name, value in list(vars(layer).items()):
            if isinstance(value, tf.Tensor) and type(value).__name__ == "EagerTensor":
                swapped.append((layer, name, value))
                setattr(layer, name, value.numpy())
    try:
        yield
    finally:
        for layer, name, value in swapped:
            setattr(layer, name, value)


@functools.cache  # Once a process: the handler registry is tf2onnx's, global.
def _teach_tf2onnx_erfc():
    """Exact GELU (ViT, DINOv2, ConvNeXt's MLPs) runs TF's Erfc, which ONNX has no operator for and
    tf2onnx leaves as it is (ONNX Runtime then refuses the model): converted here as 1 - Erf, through
    tf2onnx's own registry of op handlers, since Keras's exporter takes no custom handlers."""
    from tf2onnx import utils  # pylint: disable=import-outside-toplevel (the deploy extra)
    from tf2onnx.handler import tf_op  # pylint: disable=import-outside-toplevel

    @tf_op("Erfc")
    class Erfc:  # pylint: disable=unused-variable (registered by the decorator)
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            del kwargs
            dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
            node.type = "Erf"
            one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype))
            ctx.insert_new_node_on_output("Sub", node.output[0], name=utils.make_name(f"{node.name}_one_minus"),
                                          inputs=[one.output[0], node.output[0]])


def preprocessing_description(backbone: str, image_size: int) -> str:
    return (f"inside every artifact: cast to float32, bilinear resize to {image_size}x{image_size} "
            f"(tf.image.resize), then {registry.describe_preprocessing(backbone)}")


def build_metadata(names, class_names, backbone: str, image_size: int, temperature: float,
                   calibrated: bool, threshold: float | None, target_accuracy: float | None,
                   representative_examples: int = 0, seed: int | None = None, tta: bool = False) -> dict:
    """metadata.json: what every artifact in the version directory takes and returns, for consumers
    that read no TensorFlow signature (ONNX, OpenVINO, TFLite), and the confidence threshold."""
    artifacts = {formats.SAVED_MODEL: {
        "path": ".", "runtime": "TensorFlow / TF Serving", "signatures": ["serving_default", "serve_bytes"],
        "input": "serving_default: images uint8 [N, H, W, 3]; serve_bytes: image_bytes string [N] "
                 "(JPEG, PNG, GIF, BMP or WebP)",
        "outputs": ["logits", "probabilities", "classes", "class_names"]}}
    if formats.TFLITE in names:
        artifacts[formats.TFLITE] = {
            "path": formats.FILES[formats.TFLITE], "runtime": "TFLite / LiteRT interpreter",
            "signatures": ["serving_default"], "input": "images uint8 [N, H, W, 3]",
            "outputs": ["logits", "probabilities", "classes", "class_names"], "weights": "float32"}
    if formats.TFLITE_INT8 in names:
        artifacts[formats.TFLITE_INT8] = {
            "path": formats.FILES[formats.TFLITE_INT8], "runtime": "TFLite / LiteRT interpreter",
            "signatures": ["serving_default"], "input": "images uint8 [N, H, W, 3], raw pixels (no "
                                                        "quantization parameters: cast inside)",
            "outputs": ["logits", "probabilities"], "output_dtype": "float32",
            "weights": "int8 weights (per output channel) and activations (TFLITE_BUILTINS_INT8); the cast "
                       "and the resize run in float32; logits and probabilities are dequantized int8 "
                       "(probabilities in steps of 1/256); head BatchNormalization channels constant on the "
                       "representative images are constants",
            "representative_examples": representative_examples, "representative_seed": seed}
    if formats.ONNX in names:
        artifacts[formats.ONNX] = {
            "path": formats.FILES[formats.ONNX], "runtime": "ONNX Runtime",
            "input": "images uint8 [N, H, W, 3]", "outputs": list(OUTPUTS), "weights": "float32"}
    if formats.OPENVINO in names:
        artifacts[formats.OPENVINO] = {
            "path": formats.FILES[formats.OPENVINO], "runtime": "OpenVINO Runtime",
            "input": "images uint8 [N, H, W, 3]", "outputs": list(OUTPUTS), "weights": "float32"}
    logits = "float32 [N, classes]: the classifier's logits divided by the temperature"
    if tta:
        logits = ("float32 [N, classes]: the mean of the classifier's logits of each image and of its mirror "
                  "image (test-time augmentation), divided by the temperature")
    return {
        "class_names": list(class_names),
        "image_size": image_size,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [None, None, None, 3], "layout": "NHWC",
                  "channels": "RGB", "range": [0, 255],
                  "note": f"any height and width; every format resizes to {image_size}x{image_size} inside"},
        "preprocessing": preprocessing_description(backbone, image_size),
        "outputs": {"logits": logits, "probabilities": "float32 [N, classes]: softmax of logits"},
        "test_time_augmentation": "flip" if tta else None,
        "temperature": float(temperature),
        "calibrated": bool(calibrated),
        "target_accuracy": target_accuracy,
        "confidence_threshold": threshold,
        "formats": artifacts,
    }


def write_metadata(directory: str, metadata: dict):
    files.write_json(os.path.join(directory, METADATA_FILE), metadata)


def read_metadata(export_dir: str) -> dict | None:
    """The export's metadata.json, or None for exports written before it existed."""
    path = os.path.join(export_dir, METADATA_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)
