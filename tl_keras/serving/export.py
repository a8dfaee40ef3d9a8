"""SavedModel export for TF Serving: one signature on raw uint8 images, one on encoded image bytes."""

import os

from absl import logging
import keras
import tensorflow as tf

from tl_keras import files
from tl_keras.config import Config
from tl_keras.model import classifier

LABELS_FILE = "labels.txt"
TFLITE_FILE = "model.tflite"
# Images of one serve_bytes request decoded at once: memory holds at most this many decoded images.
DECODE_PARALLELISM = 4


def next_version_dir(export_root: str) -> str:
    """TF Serving loads the highest integer subdirectory, so each export gets the next number."""
    latest = latest_version_dir(export_root)
    return os.path.join(export_root, str(int(os.path.basename(latest)) + 1 if latest else 1))


def latest_version_dir(export_root: str) -> str | None:
    """The version TF Serving would serve, or None when nothing was exported yet."""
    versions = [int(d) for d in os.listdir(export_root) if d.isdigit()] if os.path.isdir(export_root) else []
    return os.path.join(export_root, str(max(versions))) if versions else None


def export_saved_model(model: keras.Model, export_root: str, preprocess, class_names,
                       tflite: bool = False, version_dir: str | None = None,
                       max_image_pixels: int = Config.max_image_pixels, temperature: float = 1.0,
                       tta: bool = False) -> str:
    """Write model plus preprocessing and label names as export_root/N; return that path.

    The directory appears only once complete (written under a temporary name), with what
    write_saved_model writes. An existing complete `version_dir` (a resumed run's) is kept as is.
    """
    target = version_dir or next_version_dir(export_root)
    if os.path.exists(os.path.join(target, "saved_model.pb")):
        logging.info("Export %s already complete.", target)
        return target
    os.makedirs(export_root, exist_ok=True)
    with files.atomic_path(target) as tmp:
        write_saved_model(model, tmp, preprocess, class_names, tflite, max_image_pixels, temperature, tta)
    write_labels(export_root, class_names)
    logging.info("Exported SavedModel%s to %s", " and TFLite model" if tflite else "", target)
    return target


def write_labels(export_root: str, class_names):
    """labels.txt beside the versions, for consumers that read class names from there."""
    files.write_text(os.path.join(export_root, LABELS_FILE), "\n".join(class_names) + "\n")


def write_saved_model(model: keras.Model, directory: str, preprocess, class_names, tflite: bool = False,
                      max_image_pixels: int = Config.max_image_pixels, temperature: float = 1.0,
                      tta: bool = False):
    """The SavedModel of `model` (the classifier) in `directory`, which the caller publishes whole:
    labels.txt in its assets/ and, if asked, model.tflite beside saved_model.pb.

    `preprocess` is the very function the training pipeline used, so served inputs are treated exactly
    like training inputs. Both signatures return `logits` (the classifier's, divided by
    `temperature`), `probabilities` (their softmax), `classes` and `class_names`. `serve_bytes`
    refuses images of more than `max_image_pixels` (height x width) from their header, before
    decoding: the limit is part of the export. With `tta` the logits are the mean of the image's and
    its mirror image's (--export_tta), as evaluation.evaluate averages them.
    """
    logits_model = keras.Model(model.inputs, model.get_layer(classifier.LOGITS).output, name="logits")
    class_table = tf.constant(list(class_names), dtype=tf.string)
    example_shape = preprocess(tf.zeros([1, 8, 8, 3], tf.uint8)).shape[1:]

    def classify(inputs):
        logits = tf.cast(logits_model(inputs, training=False), tf.float32)
        if tta:
            mirrored = tf.cast(logits_model(tf.reverse(inputs, axis=[2]), training=False), tf.float32)
            logits = (logits + mirrored) / 2.0
        logits = logits / temperature
        probabilities = tf.nn.softmax(logits)
        classes = tf.argmax(probabilities, axis=-1)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "classes": classes,
            "class_names": tf.gather(class_table, classes),
        }

    def classify_pixels(images, dtype):
        # Servers skip the signature's shape check, so it is repeated in the graph. A failed check is
        # an InvalidArgumentError, which TF Serving answers as a bad request; the server keeps running.
        images = tf.ensure_shape(images, [None, None, None, 3], name="images_must_be_NHW3")
        check = tf.debugging.assert_positive(
            tf.shape(images)[1:3], message="images must be at least 1x1 pixels")
        with tf.control_dependencies([check]):
            return classify(preprocess(tf.cast(images, dtype)))

    images_spec = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")

    @tf.function(input_signature=[images_spec])
    def serve(images):
        # Resizing uint8 gives float32 at the model's size only: no full-size float32 copy.
        return classify_pixels(images, tf.uint8)

    @tf.function(input_signature=[images_spec])
    def serve_tflite(images):
        # TFLite resizes only float input, so its serving_default casts first; the values are the same.
        return classify_pixels(images, tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        # Encoded JPEG/PNG/GIF/BMP/WebP, as TF Serving's REST API decodes {"b64": ...}. Images may differ
        # in size, so each is decoded and preprocessed alone, and only once its header shows it is
        # within the pixel limit; bytes that are no image fail the check or the decode op.
        def decode(data):
            height, width = encoded_image_size(data)
            message = tf.strings.format("{} x {} pixels is over max_image_pixels={}, the limit set at export",
                                        (width, height, max_image_pixels))
            check = tf.debugging.Assert(height * width <= max_image_pixels, [message])
            with tf.control_dependencies([check]):
                image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
            return preprocess(image[tf.newaxis])[0]

        image_bytes = tf.ensure_shape(image_bytes, [None], name="image_bytes_must_be_a_vector")
        inputs = tf.map_fn(decode, image_bytes, parallel_iterations=DECODE_PARALLELISM,
                           fn_output_signature=tf.TensorSpec(example_shape, tf.float32))
        return classify(inputs)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve)
    archive.add_endpoint("serve_bytes", serve_bytes)
    # TF Serving loads only all-digit version directories, so the caller's temporary one is never served.
    archive.write_out(directory, verbose=False)
    os.makedirs(os.path.join(directory, "assets"), exist_ok=True)
    files.write_text(os.path.join(directory, "assets", LABELS_FILE), "\n".join(class_names) + "\n")
    if tflite:
        tflite_model = convert_to_tflite(serve_tflite, model.variables)
        files.write_bytes(os.path.join(directory, TFLITE_FILE), tflite_model)


def convert_to_tflite(serve, variables) -> bytes:
    """serving_default as a TFLite model: uint8 images of any size in, the same three outputs.

    Converting the serving function, not the Keras model, keeps resizing and preprocessing inside. The
    converter saves it as a SavedModel first, which needs an object that tracks the model's variables.
    """
    holder = tf.Module()
    holder.model_variables = [getattr(v, "value", v) for v in variables]  # Keras variables wrap TF ones.
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], holder)
    return converter.convert()


_PNG = b"\x89PNG\r\n\x1a\n"


def encoded_image_size(data: tf.Tensor):
    """(height, width) int64 that an encoded image's header declares, in graph ops, without decoding.

    JPEG, PNG, GIF, BMP and WebP, read as TF's decoders read them. Other bytes fail with TF's
    "Unknown image file format": their size cannot be checked before decoding.
    """
    head = tf.strings.substr(tf.strings.substr(data, 0, 32) + b"\0" * 32, 0, 32)  # Short data reads 0s.
    raw = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

    def starts(pos, magic):
        return tf.equal(tf.strings.substr(head, pos, len(magic)), magic)

    def little(pos, size):
        return sum(raw[pos + i] * 256 ** i for i in range(size))

    def big(pos, size):
        return sum(raw[pos + i] * 256 ** (size - 1 - i) for i in range(size))

    def signed32(value):
        return tf.abs(tf.where(value >= 2 ** 31, value - 2 ** 32, value))  # Negative: stored top-down.

    def unknown():
        check = tf.debugging.Assert(False, ["Unknown image file format. One of JPEG, PNG, GIF, BMP or WebP "
                                            "is required."])
        with tf.control_dependencies([check]):
            return tf.zeros([2], tf.int64)

    webp = starts(0, b"RIFF") & starts(8, b"WEBP")
    vp8l_bits = little(21, 4)
    size = tf.case([
        (starts(0, b"\xff\xd8\xff"), lambda: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)),
        (starts(0, _PNG), lambda: tf.stack([big(20, 4), big(16, 4)])),
        (starts(0, b"GIF8"), lambda: tf.stack([little(8, 2), little(6, 2)])),
        (starts(0, b"BM"), lambda: tf.stack([signed32(little(22, 4)), signed32(little(18, 4))])),
        (webp & starts(12, b"VP8 "), lambda: tf.stack([little(28, 2) % 2 ** 14, little(26, 2) % 2 ** 14])),
        (webp & starts(12, b"VP8L"), lambda: tf.stack([vp8l_bits // 2 ** 14 % 2 ** 14 + 1,
                                                       vp8l_bits % 2 ** 14 + 1])),
        (webp & starts(12, b"VP8X"), lambda: tf.stack([little(27, 3) + 1, little(24, 3) + 1])),
    ], default=unknown, exclusive=False)
    return size[0], size[1]
