"""Every export format from one float32 Keras model that takes what serving_default takes.

The deploy model maps uint8 images [N, H, W, 3] of any size to {"logits", "probabilities"}: it
resizes and preprocesses inside, exactly as training did, then divides the classifier's logits by
the calibration temperature. Keras's own `model.export(format="onnx" | "openvino" | "litert")` and
TFLite's converter turn it into the other formats, so no converter here is our own. ONNX needs the
float32 policy, so the classifier given must be a float32 copy, even after a bf16 or float16 run.
"""

import contextlib
import json
import os
import warnings

from absl import logging
import keras
import tensorflow as tf

from tl_keras import files
from tl_keras.model import classifier
from tl_keras.model import registry
from tl_keras.serving import formats

METADATA_FILE = "metadata.json"
INPUT_NAME = "images"
OUTPUTS = ("logits", "probabilities")


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
    whatever precision trained it. Layers keep their names; matmul convolutions become plain ones."""
    def to_float32(layer):
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    with float32_policy():
        copy = keras.models.clone_model(model, clone_function=to_float32, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def build_deploy_model(model: keras.Model, preprocess, image_size: int,
                       temperature: float = 1.0) -> keras.Model:
    """uint8 images -> {"logits": logits / temperature, "probabilities": their softmax}, float32.

    `model` is a float32 classifier (build_classifier's layers); the deploy model shares its weights.
    """
    if model.get_layer(classifier.LOGITS).compute_dtype != "float32" or any(
            layer.compute_dtype != "float32" for layer in model.get_layer("backbone").layers):
        raise ValueError(f"The deploy model needs a float32 classifier. Received: model={model.name}")
    with float32_policy():
        logits_model = keras.Model(model.inputs, model.get_layer(classifier.LOGITS).output, name="classifier")
        images = keras.Input((None, None, 3), dtype="uint8", name=INPUT_NAME)
        logits = logits_model(Preprocess(preprocess, image_size, name="preprocess")(images))
        if temperature != 1.0:
            logits = keras.layers.Rescaling(1.0 / temperature, name="temperature")(logits)
        probabilities = keras.layers.Softmax(name="probabilities")(logits)
        return keras.Model(images, {"logits": logits, "probabilities": probabilities}, name="deploy")


def write_format(name: str, deploy_model: keras.Model, directory: str, representative_images=None):
    """Write format `name` (not the SavedModel: export.write_saved_model) of `deploy_model` into `directory`.

    `representative_images` (uint8 [H, W, 3] arrays, any sizes) calibrate the int8 quantization.
    """
    path = os.path.join(directory, formats.FILES[name])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if name == formats.ONNX:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Keras's numpy 2 patch of tf2onnx asks np.object.
            deploy_model.export(path, format="onnx", verbose=False)
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
        deploy_model.export(path, format="litert", verbose=False, optimizations=[tf.lite.Optimize.DEFAULT],
                            representative_dataset=representative_dataset,
                            target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
                            inference_input_type=tf.uint8, inference_output_type=tf.float32)
    else:
        raise ValueError(f"write_format writes {', '.join(formats.FILES)} but not the SavedModel "
                         f"(export.write_saved_model does). Received: name={name}")
    logging.info("Wrote %s.", path)


def preprocessing_description(backbone: str, image_size: int) -> str:
    return (f"inside every artifact: cast to float32, bilinear resize to {image_size}x{image_size} "
            f"(tf.image.resize), then keras.applications.{registry.BACKBONES[backbone].preprocess_module}"
            f".preprocess_input")


def build_metadata(names, class_names, backbone: str, image_size: int, temperature: float,
                   calibrated: bool, threshold: float | None, target_accuracy: float | None,
                   representative_examples: int = 0, seed: int | None = None) -> dict:
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
            "weights": "int8 weights and activations (TFLITE_BUILTINS_INT8)",
            "representative_examples": representative_examples, "representative_seed": seed}
    if formats.ONNX in names:
        artifacts[formats.ONNX] = {
            "path": formats.FILES[formats.ONNX], "runtime": "ONNX Runtime",
            "input": "images uint8 [N, H, W, 3]", "outputs": list(OUTPUTS), "weights": "float32"}
    if formats.OPENVINO in names:
        artifacts[formats.OPENVINO] = {
            "path": formats.FILES[formats.OPENVINO], "runtime": "OpenVINO Runtime",
            "input": "images uint8 [N, H, W, 3]", "outputs": list(OUTPUTS), "weights": "float32"}
    return {
        "class_names": list(class_names),
        "image_size": image_size,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [None, None, None, 3], "layout": "NHWC",
                  "channels": "RGB", "range": [0, 255],
                  "note": f"any height and width; every format resizes to {image_size}x{image_size} inside"},
        "preprocessing": preprocessing_description(backbone, image_size),
        "outputs": {"logits": "float32 [N, classes]: the classifier's logits divided by the temperature",
                    "probabilities": "float32 [N, classes]: softmax of logits"},
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
