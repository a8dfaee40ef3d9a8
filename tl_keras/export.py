"""SavedModel export whose serving signature takes raw uint8 images and returns class names."""

import os

from absl import logging
import keras
import tensorflow as tf


def next_version_dir(export_root: str) -> str:
    """TF Serving loads the highest integer subdirectory, so each export gets the next number."""
    versions = [int(d) for d in os.listdir(export_root) if d.isdigit()] if os.path.isdir(export_root) else []
    return os.path.join(export_root, str(max(versions, default=0) + 1))


def export_saved_model(model: keras.Model, export_root: str, preprocess, class_names,
                       version_dir: str | None = None) -> str:
    """Write model plus preprocessing and label names as export_root/N; return that path.

    `preprocess` is the very function the training pipeline used, so served inputs are treated exactly
    like training inputs. The directory appears only once complete (written under a temporary name);
    an existing complete `version_dir` (a resumed run's) is kept as is.
    """
    target = version_dir or next_version_dir(export_root)
    if os.path.exists(os.path.join(target, "saved_model.pb")):
        logging.info("Export %s already complete.", target)
        return target
    class_table = tf.constant(list(class_names), dtype=tf.string)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(images):
        probabilities = tf.cast(model(preprocess(images), training=False), tf.float32)
        classes = tf.argmax(probabilities, axis=-1)
        return {
            "probabilities": probabilities,
            "classes": classes,
            "class_names": tf.gather(class_table, classes),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve)
    tmp = os.path.join(export_root, f".tmp-{os.path.basename(target)}")
    tf.io.gfile.makedirs(export_root)
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    archive.write_out(tmp, verbose=False)
    os.replace(tmp, target)
    logging.info("Exported SavedModel to %s", target)
    return target
