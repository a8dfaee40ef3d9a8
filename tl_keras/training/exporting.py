"""The end of --mode=train, and --mode=export: the accuracy gate, calibration, and the exported
artifacts with the proof that each still gives the trained model's answers.

Kept apart from the stages, which only train: what is exported, and how it is checked, grows on its own.
"""

import os
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tl_keras import files
from tl_keras.config import Config
from tl_keras.data import pipeline
from tl_keras.errors import UserError, first_line
from tl_keras.model import backbones
from tl_keras.reporting import calibration
from tl_keras.reporting import evaluation
from tl_keras.serving import deploy
from tl_keras.serving import export as export_lib
from tl_keras.serving import formats
from tl_keras.serving import parity
from tl_keras.training import run_dir

# Training images that calibrate the int8 TFLite model's activation ranges, drawn by --seed.
REPRESENTATIVE_EXAMPLES = 300


def check_min_accuracy(config: Config, final: dict | None, model: keras.Model, test, eval_steps):
    """Refuse to export a model whose final test accuracy is below --min_accuracy.

    `final` is the last stage's test metrics, or None when no stage ran in this process or before.
    """
    if final is None:  # No stage ran, so nothing measured the model yet.
        result = evaluation.evaluate(model, test, eval_steps, config.label_smoothing, config.tta)
        final = evaluation.split_metrics(result, "test")
    accuracy = final["test_accuracy"]
    if accuracy < config.min_accuracy:
        raise UserError(f"Test accuracy {accuracy:.4f} is below --min_accuracy, so nothing was exported "
                        f"(checkpoints and metrics.json are kept). "
                        f"Received: min_accuracy={config.min_accuracy}")


def export_formats(config: Config) -> tuple:
    """The formats this run writes: --export_formats, the SavedModel always, tflite for --export_tflite."""
    return formats.resolve(config.export_formats, config.export_tflite)


def check_before_training(config: Config, splits: pipeline.Splits | None = None):
    """What would fail the export, checked before training starts: the packages of the formats asked
    for (a one-line UserError naming what to install), and --calibrate=true without a validation split."""
    formats.check_packages(export_formats(config))
    if config.calibrate == "true" and splits is not None and not _has_validation(splits):
        raise UserError("--calibrate=true fits the temperature on the validation split, and this run has "
                        "none; pass --validation_split above 0 or --calibrate=auto. Received: calibrate=true")


def calibrate_and_export(model: keras.Model, config: Config, splits: pipeline.Splits,
                         version_dir: str | None = None, summary_step: int | None = None) -> dict:
    """After the last stage, and for --mode=export: calibrate, report, export, prove, publish.

    1. A float32 copy of `model` runs on the raw validation and test splits (capped by --eval_steps)
       through the deploy model, which takes uint8 images as every artifact does.
    2. With --calibrate, a temperature is fitted on validation. eval/ gets report.json (the test
       split, as served: ECE, NLL before and after, the coverage-accuracy curve, the threshold for
       --target_accuracy chosen on validation) and reliability_diagram.png; with `summary_step`,
       TensorBoard's logs/test gets calibration/* scalars and the diagram at that step.
    3. Every format of export_formats(config) is written into a temporary version directory with
       metadata.json, then loaded by its own runtime and run on the test split (or --parity_examples
       of it): parity.json there, and the table in the log.
    4. A format below --min_accuracy fails the run with a one-line UserError naming it, and the
       temporary directory goes: nothing half-exported is left. Otherwise it becomes `version_dir`
       (default: the next version under model_dir/export).

    Returns what metrics.json keeps: export_path, calibration (calibration.summary's numbers),
    coverage_accuracy (test accuracy at 50%, 80% and 100% coverage) and parity (rows by format).
    A `version_dir` that is already complete (a resumed run) is returned as it is, with its parity.
    """
    names = export_formats(config)
    formats.check_packages(names)
    export_root = os.path.join(config.model_dir, run_dir.EXPORT_DIR)
    target = version_dir or export_lib.next_version_dir(export_root)
    if os.path.exists(os.path.join(target, parity.PARITY_FILE)):
        logging.info("Export %s already complete.", target)
        return _metrics_of_export(target)
    class_names = splits.class_names
    preprocess = backbones.get_preprocessing(config.backbone, config.image_size)
    float_model = deploy.float32_copy(model)
    tta = config.export_tta  # Calibration, the report and parity all see the model as served.
    plain = deploy.build_deploy_model(float_model, preprocess, config.image_size, tta=tta)
    cap = config.eval_steps * config.batch_size if config.eval_steps else None
    validation = _has_validation(splits)
    validation_logits, validation_labels = (
        _logits(plain, splits.validation, cap, config.batch_size)[:2] if validation else (None, None))
    test_logits, test_labels, keras_seconds = _logits(plain, splits.test, cap, config.batch_size)

    fitted = calibrates(config, splits)
    temperature = calibration.fit_temperature(validation_logits, validation_labels) if fitted else 1.0
    report = calibration.build_report(test_logits, test_labels, temperature, validation_logits,
                                      validation_labels, config.target_accuracy)
    report["fitted_on"] = "validation" if fitted else None
    served = calibration.softmax(test_logits, temperature)
    result = evaluation.Evaluation(served, test_labels, evaluation.metrics_of(served, test_labels,
                                                                              config.label_smoothing),
                                   evaluation.worst_mistakes(served, test_labels),
                                   tta=evaluation.TTA_FLIP if tta else None)
    eval_report = evaluation.write_report(result, splits.test, class_names,
                                          os.path.join(config.model_dir, run_dir.EVAL_DIR), config.test_split,
                                          calibration=report)
    if summary_step is not None:
        calibration.write_summaries(os.path.join(config.model_dir, run_dir.LOG_DIR, "test"), summary_step,
                                    report)
    _log_calibration(report, fitted)

    exported = deploy.build_deploy_model(float_model, preprocess, config.image_size, temperature, tta)
    representative = _representative_images(splits, config.seed) if formats.TFLITE_INT8 in names else []
    count = min(len(test_labels), config.parity_examples or len(test_labels))
    keras_row = parity.compare(parity.KERAS, served[:count], test_labels[:count], served[:count],
                               keras_seconds * count / len(test_labels), None)
    os.makedirs(export_root, exist_ok=True)
    with files.atomic_path(target) as tmp:
        export_lib.write_saved_model(float_model, tmp, preprocess, class_names, formats.TFLITE in names,
                                     config.max_image_pixels, temperature, tta)
        for name in names:
            if name not in (formats.SAVED_MODEL, formats.TFLITE):
                _write_format(name, exported, tmp, representative, names)
        metadata = deploy.build_metadata(names, class_names, config.backbone, config.image_size, temperature,
                                         fitted, report["threshold"], config.target_accuracy,
                                         len(representative), config.seed, tta)
        metadata["calibration"] = calibration.summary(report)
        metadata["coverage_accuracy"] = _coverage_points(eval_report["coverage_accuracy"])
        deploy.write_metadata(tmp, metadata)
        rows = [keras_row] + [_parity_row(name, tmp, splits.test, count, served, test_labels,
                                          config.batch_size, names) for name in names]
        files.write_json(os.path.join(tmp, parity.PARITY_FILE), {
            "split": config.test_split, "examples": count, "rows": rows,
            "reference": "the float32 Keras model the artifacts were exported from"})
        logging.info("Export parity on %d %s examples (%s):\n%s", count, config.test_split, target,
                     parity.format_table(rows))
        check_parity(config, rows)
    export_lib.write_labels(export_root, class_names)
    logging.info("Exported %s to %s.", ", ".join(names), target)
    return _metrics(target, metadata, rows)


def check_parity(config: Config, rows):
    """--min_accuracy on every exported format: a one-line UserError naming the ones below it."""
    if config.min_accuracy is None:
        return
    failing = [row for row in rows
               if row["format"] != parity.KERAS and row["accuracy"] < config.min_accuracy]
    if failing:
        names = ", ".join(f"{row['format']} ({row['accuracy']:.4f})" for row in failing)
        raise UserError(f"Exported {names} below --min_accuracy on {failing[0]['examples']} test examples, "
                        f"so nothing was exported (checkpoints and metrics.json are kept). "
                        f"Received: min_accuracy={config.min_accuracy}")


def calibrates(config: Config, splits: pipeline.Splits) -> bool:
    """Whether the export fits a temperature: --calibrate=true, or auto with a validation split."""
    return config.calibrate == "true" or (config.calibrate == "auto" and _has_validation(splits))


def _has_validation(splits: pipeline.Splits) -> bool:
    return splits.validation is not None and splits.num_validation > 0


def _logits(deploy_model: keras.Model, examples: tf.data.Dataset, cap: int | None, batch_size: int):
    """(logits [N, C] float64, labels [N], seconds of inference) of the raw split's first `cap`."""
    if cap:
        examples = examples.take(cap)
    predict = tf.function(lambda images: deploy_model(images, training=False)["logits"],
                          reduce_retracing=True)
    outputs, labels, seconds = [], [], 0.0
    for i, (images, batch_labels) in enumerate(parity.batches_of(examples.as_numpy_iterator(), batch_size)):
        if i == 0:
            predict(tf.constant(images))  # Untimed: tracing happens here.
        start = time.perf_counter()
        outputs.append(np.asarray(predict(tf.constant(images)), np.float64))
        seconds += time.perf_counter() - start
        labels.append(batch_labels)
    return np.concatenate(outputs), np.concatenate(labels), seconds


def _representative_images(splits: pipeline.Splits, seed: int) -> list:
    """REPRESENTATIVE_EXAMPLES training images (all, if fewer), drawn by `seed`."""
    count = min(REPRESENTATIVE_EXAMPLES, splits.num_train)
    indices = np.sort(np.random.default_rng(seed).choice(splits.num_train, count, replace=False))
    return evaluation.fetch_examples(splits.train, indices)


def _write_format(name: str, exported: keras.Model, directory: str, representative, names):
    """deploy.write_format, with a converter's failure as one line naming the format."""
    try:
        deploy.write_format(name, exported, directory, representative)
    except Exception as e:
        raise UserError(f"Could not export {name}: {first_line(e)}. "
                        f"Received: export_formats={','.join(names)}") from e


def _parity_row(name: str, directory: str, test: tf.data.Dataset, count: int, reference: np.ndarray,
                labels: np.ndarray, batch_size: int, names) -> dict:
    """Format `name` run by its own runtime; an artifact that runtime refuses, as one line."""
    try:
        predict = parity.load_predictor(name, directory)
        batches = parity.batches_of(test.take(count).as_numpy_iterator(), batch_size)
        probabilities, seconds = parity.run(predict, batches)
    except Exception as e:  # ONNX Runtime's errors derive from Exception alone.
        raise UserError(f"Could not run the {name} export in its own runtime ({first_line(e)}), so nothing "
                        f"was exported (checkpoints and metrics.json are kept). "
                        f"Received: export_formats={','.join(names)}") from e
    return parity.compare(name, probabilities, labels[:count], reference[:count], seconds,
                          parity.artifact_size(name, directory))


def _log_calibration(report: dict, fitted: bool):
    before, after = report["before"], report["after"]
    if fitted:
        logging.info("Calibration: temperature %.4f fitted on %d validation examples; on %d test examples "
                     "ECE %.4f -> %.4f, NLL %.4f -> %.4f.", report["temperature"],
                     report["validation_examples"], report["test_examples"], before["ece"], after["ece"],
                     before["nll"], after["nll"])
    else:
        logging.info("Calibration off: on %d test examples ECE %.4f, NLL %.4f.", report["test_examples"],
                     before["ece"], before["nll"])
    if report["threshold"] is not None:
        test = report["threshold_test"]
        accuracy = "-" if test["accuracy"] is None else f"{test['accuracy']:.4f}"
        logging.info("Confidence threshold %.4f reaches --target_accuracy=%g on validation; on test it "
                     "answers %.1f%% of examples at accuracy %s.", report["threshold"],
                     report["target_accuracy"], 100 * test["coverage"], accuracy)
    elif report["target_accuracy"] is not None:
        logging.info("No confidence threshold reaches --target_accuracy=%g on the validation split.",
                     report["target_accuracy"])


def _coverage_points(curve) -> dict:
    """Accuracy at 50%, 80% and 100% coverage, as metrics.json keeps it."""
    return {f"{round(point['coverage'] * 100)}%": point["accuracy"] for point in curve
            if round(point["coverage"] * 100) in (50, 80, 100)}


def _metrics(target: str, metadata: dict, rows) -> dict:
    """What metrics.json keeps of an export; with --export_tta, export_tta names the views that its
    numbers (calibration, coverage, parity) average."""
    metrics = {"export_path": target, "calibration": metadata.get("calibration", {}),
               "coverage_accuracy": metadata.get("coverage_accuracy", {}),
               "parity": {row["format"]: row for row in rows}}
    if metadata.get("test_time_augmentation"):
        metrics["export_tta"] = metadata["test_time_augmentation"]
    return metrics


def _metrics_of_export(target: str) -> dict:
    """_metrics of an export that an earlier attempt completed, from its own files."""
    rows = files.read_json(os.path.join(target, parity.PARITY_FILE), {}).get("rows", [])
    return _metrics(target, deploy.read_metadata(target) or {}, rows)
