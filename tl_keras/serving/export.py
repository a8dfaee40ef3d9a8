"""SavedModel export for TF Serving: one signature on raw uint8 images, one on encoded image bytes."""

import os

from absl import logging
import keras
import tensorflow as tf

from tl_keras import files

LABELS_FILE = "labels.txt"
TFLITE_FILE = "model.tflite"


def next_version_dir(export_root: str) -> str:
    """TF Serving loads the highest integer subdirectory, so each export gets the next number."""
    latest = latest_version_dir(export_root)
    return os.path.join(export_root, str(int(os.path.basename(latest)) + 1 if latest else 1))


def latest_version_dir(export_root: str) -> str | None:
    """The version TF Serving would serve, or None when nothing was exported yet."""
    versions = [int(d) for d in os.listdir(export_root) if d.isdigit()] if os.path.isdir(export_root) else []
    return os.path.join(export_root, str(max(versions))) if versions else None


def export_saved_model(model: keras.Model, export_root: str, preprocess, class_names,
                       tflite: bool = False, version_dir: str | None = None) -> str:
    """Write model plus preprocessing and label names as export_root/N; return that path.

    `preprocess` is the very function the training pipeline used, so served inputs are treated exactly
    like training inputs. The directory appears only once complete (written under a temporary name),
    with labels.txt in its assets/ and, if asked, model.tflite beside saved_model.pb. An existing
    complete `version_dir` (a resumed run's) is kept as is.
    """
    target = version_dir or next_version_dir(export_root)
    if os.path.exists(os.path.join(target, "saved_model.pb")):
        logging.info("Export %s already complete.", target)
        return target
    class_table = tf.constant(list(class_names), dtype=tf.string)
    example_shape = preprocess(tf.zeros([1, 8, 8, 3], tf.float32)).shape[1:]

    def classify(inputs):
        probabilities = tf.cast(model(inputs, training=False), tf.float32)
        classes = tf.argmax(probabilities, axis=-1)
        return {
            "probabilities": probabilities,
            "classes": classes,
            "class_names": tf.gather(class_table, classes),
        }

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(images):
        # Servers skip the signature's shape check, so it is repeated in the graph. A failed check is
        # an InvalidArgumentError, which TF Serving answers as a bad request; the server keeps running.
        images = tf.ensure_shape(images, [None, None, None, 3], name="images_must_be_NHW3")
        check = tf.debugging.assert_positive(
            tf.shape(images)[1:3], message="images must be at least 1x1 pixels")
        with tf.control_dependencies([check]):
            # TFLite resizes only float input; the values equal those of resizing the uint8 image.
            return classify(preprocess(tf.cast(images, tf.float32)))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        # Encoded JPEG/PNG/GIF/BMP, as TF Serving's REST API decodes {"b64": ...}. Images may differ in
        # size, so each is decoded and preprocessed alone; bytes that are no image fail the decode op.
        def decode(data):
            image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
            return preprocess(tf.cast(image[tf.newaxis], tf.float32))[0]

        image_bytes = tf.ensure_shape(image_bytes, [None], name="image_bytes_must_be_a_vector")
        inputs = tf.map_fn(decode, image_bytes,
                           fn_output_signature=tf.TensorSpec(example_shape, tf.float32))
        return classify(inputs)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve)
    archive.add_endpoint("serve_bytes", serve_bytes)
    os.makedirs(export_root, exist_ok=True)
    labels = "\n".join(class_names) + "\n"
    # TF Serving loads only all-digit version directories, so the temporary one is never served.
    with files.atomic_path(target) as tmp:
        archive.write_out(tmp, verbose=False)
        os.makedirs(os.path.join(tmp, "assets"), exist_ok=True)
        files.write_text(os.path.join(tmp, "assets", LABELS_FILE), labels)
        if tflite:
            files.write_bytes(os.path.join(tmp, TFLITE_FILE), convert_to_tflite(tmp))
    files.write_text(os.path.join(export_root, LABELS_FILE), labels)
    logging.info("Exported SavedModel%s to %s", " and TFLite model" if tflite else "", target)
    return target


def convert_to_tflite(saved_model_dir: str) -> bytes:
    """serving_default as a TFLite model: uint8 images of any size in, the same three outputs.

    Converting the written SavedModel, not the Keras model, keeps resizing and preprocessing inside.
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=["serving_default"])
    return converter.convert()
