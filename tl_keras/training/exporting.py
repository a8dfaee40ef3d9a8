"""The end of --mode=train, and --mode=export: the accuracy gate and the exported artifacts.

Kept apart from the stages, which only train: what is exported, and how it is checked, grows on its own.
"""

import os

import keras

from tl_keras.config import Config
from tl_keras.errors import UserError
from tl_keras.model import backbones
from tl_keras.reporting import evaluation
from tl_keras.serving import export as export_lib
from tl_keras.training import run_dir


def export(model: keras.Model, config: Config, class_names, version_dir: str | None = None) -> str:
    """The SavedModel (and TFLite file) of `model`, with the training pipeline's own preprocessing."""
    return export_lib.export_saved_model(
        model, os.path.join(config.model_dir, run_dir.EXPORT_DIR),
        backbones.get_preprocessing(config.backbone, config.image_size), class_names,
        tflite=config.export_tflite, version_dir=version_dir, max_image_pixels=config.max_image_pixels)


def check_min_accuracy(config: Config, final: dict | None, model: keras.Model, test, eval_steps):
    """Refuse to export a model whose final test accuracy is below --min_accuracy.

    `final` is the last stage's test metrics, or None when no stage ran in this process or before.
    """
    if final is None:  # No stage ran, so nothing measured the model yet.
        result = evaluation.evaluate(model, test, eval_steps, config.label_smoothing)
        final = evaluation.prefixed(result.metrics, "test")
    accuracy = final["test_accuracy"]
    if accuracy < config.min_accuracy:
        raise UserError(f"Test accuracy {accuracy:.4f} is below --min_accuracy, so nothing was exported "
                        f"(checkpoints and metrics.json are kept). "
                        f"Received: min_accuracy={config.min_accuracy}")
