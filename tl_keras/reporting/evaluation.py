"""The one evaluation path. Phase-end evaluation, TensorBoard and --mode=evaluate all call `evaluate`,
so a metric or a "worst mistake" means the same everywhere; `write_report` turns its result into what
a user can act on (which classes fail, what they are mistaken for, the images the model gets most
confidently wrong) in model_dir/eval/."""

import dataclasses
import json
import os

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tl_keras import files
from tl_keras.reporting import images

REPORT_FILE = "report.json"
CONFUSION_JSON = "confusion_matrix.json"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
WORST_EXAMPLES = 16  # Mistakes listed in report.json and drawn in misclassified.png.


@dataclasses.dataclass
class Evaluation:
    """One prediction pass over a split, and everything derived from it."""

    probabilities: np.ndarray  # [N, C] float64, in dataset order.
    labels: np.ndarray  # [N] int.
    metrics: dict  # loss (as compiled), accuracy, top5_accuracy (top-min(5, C)).
    mistakes: np.ndarray  # Indices of every wrong prediction, worst first (see worst_mistakes).

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


def evaluate(model: keras.Model, dataset: tf.data.Dataset, steps: int | None = None,
             label_smoothing: float = 0.0) -> Evaluation:
    """Predict (images, one_hot) batches once, with the model's compiled predict step, and derive the
    metrics from those predictions. `label_smoothing` must be the compiled loss's, so that the loss
    equals what model.evaluate reports."""
    probabilities, labels = _predict(model, dataset, steps)
    return Evaluation(probabilities, labels, metrics_of(probabilities, labels, label_smoothing),
                      worst_mistakes(probabilities, labels))


def _predict(model: keras.Model, dataset: tf.data.Dataset, steps: int | None):
    probabilities = model.predict(dataset.map(lambda x, y: x), steps=steps, verbose=0)
    one_hot = dataset.map(lambda x, y: y)
    if steps:
        one_hot = one_hot.take(steps)
    labels = np.concatenate([np.argmax(y, axis=-1) for y in one_hot.as_numpy_iterator()])
    return np.asarray(probabilities, dtype=np.float64), labels[:len(probabilities)]


def metrics_of(probabilities: np.ndarray, labels, label_smoothing: float = 0.0) -> dict:
    """The compiled loss and metrics, computed from predictions already made."""
    labels = np.asarray(labels)
    num_classes = probabilities.shape[-1]
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)(one_hot, probabilities)
    return {
        "loss": float(loss),
        "accuracy": top_k_accuracy(probabilities, labels, 1),
        "top5_accuracy": top_k_accuracy(probabilities, labels, min(5, num_classes)),
    }


def prefixed(metrics: dict, split: str) -> dict:
    """{"loss": x} -> {"test_loss": x}: the names metrics.json and TensorBoard's phase_end/ use."""
    return {f"{split}_{name}": value for name, value in metrics.items()}


def worst_mistakes(probabilities: np.ndarray, labels, n: int | None = None) -> np.ndarray:
    """Indices of the `n` worst mistakes (all of them when `n` is None), worst first.

    A mistake is an example whose most probable class is not its label. The worst mistakes are the
    ones the model is most sure of: they are ranked by the probability the model gives its (wrong)
    predicted class, highest first, and equal confidences keep the dataset's order. Confident
    mistakes are the ones worth looking at: a mislabelled example, two classes the model cannot tell
    apart, or a shortcut it has learned. Ranking by the lowest probability of the true class instead
    would favour examples the model finds hard, which a near-uniform guess also produces.
    """
    labels = np.asarray(labels)
    predictions = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predictions != labels)
    ranked = wrong[np.argsort(-probabilities[wrong, predictions[wrong]], kind="stable")]
    return ranked if n is None else ranked[:n]


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """counts[i, j]: examples of true class i predicted as class j."""
    labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    return np.bincount(labels * num_classes + predictions,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_metrics(confusion: np.ndarray, class_names) -> dict:
    """Precision, recall and F1 per class; 0 where undefined (no predictions or no examples)."""
    true_positives = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, actual, out=np.zeros_like(true_positives), where=actual > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(actual[i])} for i, name in enumerate(class_names)}


def top_k_accuracy(probabilities: np.ndarray, labels, k: int) -> float:
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1))) if len(top) else 0.0


def build_report(result: Evaluation, class_names, split: str) -> dict:
    """report.json's content: the metrics under their own names, per-class scores, the worst mistakes."""
    labels, predictions, probabilities = result.labels, result.predictions, result.probabilities
    per_class = per_class_metrics(confusion_matrix(labels, predictions, len(class_names)), class_names)
    return {
        "split": split,
        "num_examples": int(len(labels)),
        **result.metrics,
        "top_k": min(5, len(class_names)),
        "macro_avg": {metric: float(np.mean([c[metric] for c in per_class.values()]))
                      for metric in ("precision", "recall", "f1")},
        "per_class": per_class,
        "worst_misclassified": [
            {"index": int(i), "true": class_names[labels[i]], "predicted": class_names[predictions[i]],
             "probability": float(probabilities[i, predictions[i]]),
             "true_probability": float(probabilities[i, labels[i]])}
            for i in result.mistakes[:WORST_EXAMPLES]],
    }


def write_report(result: Evaluation, examples: tf.data.Dataset, class_names, out_dir: str,
                 split: str) -> dict:
    """Write report.json, the confusion matrix (JSON and PNG) and misclassified.png to `out_dir`.

    `examples` is the evaluated split as raw (image, label) pairs in the same order, from which only
    the worst mistakes' images are read again for the picture. Returns the report.
    """
    report = build_report(result, class_names, split)
    confusion = confusion_matrix(result.labels, result.predictions, len(class_names))
    grid, _ = misclassified_image(result, examples, class_names, WORST_EXAMPLES)
    os.makedirs(out_dir, exist_ok=True)
    # Written in this order, not sorted: the summary first, then the details, classes by index.
    files.write_text(os.path.join(out_dir, REPORT_FILE), json.dumps(report, indent=2) + "\n")
    files.write_text(os.path.join(out_dir, CONFUSION_JSON), json.dumps({
        "split": split, "rows": "true class", "columns": "predicted class",
        "class_names": list(class_names), "matrix": confusion.tolist()}, indent=1) + "\n")
    files.write_bytes(os.path.join(out_dir, CONFUSION_PNG),
                      images.encode_png(images.confusion_matrix_image(confusion, class_names, split)))
    files.write_bytes(os.path.join(out_dir, MISCLASSIFIED_PNG), images.encode_png(grid))
    logging.info("Evaluation of %s: accuracy %.4f, top-%d %.4f, loss %.4f on %d examples. Report in %s",
                 split, report["accuracy"], report["top_k"], report["top5_accuracy"], report["loss"],
                 report["num_examples"], out_dir)
    return report


def misclassified_image(result: Evaluation, examples: tf.data.Dataset, class_names, n: int):
    """(the grid of the `n` worst mistakes, their indices): the one picture of mistakes that both
    TensorBoard and eval/ show. `examples` is the evaluated split, raw and in the same order."""
    shown = result.mistakes[:n]
    predictions = result.predictions
    grid = images.misclassified_grid(
        fetch_examples(examples, shown), [class_names[result.labels[i]] for i in shown],
        [class_names[predictions[i]] for i in shown],
        [result.probabilities[i, predictions[i]] for i in shown])
    return grid, shown


def fetch_examples(examples: tf.data.Dataset, indices) -> list:
    """The uint8 images at `indices` of the raw split, in the order of `indices`, in one pass."""
    if not len(indices):
        return []
    wanted = tf.constant(sorted(set(int(i) for i in indices)), tf.int64)
    found = examples.enumerate().filter(lambda i, example: tf.reduce_any(tf.equal(i, wanted)))
    images_by_index = {int(i): example[0].numpy() for i, example in found.take(len(wanted))}
    return [images_by_index[int(i)] for i in indices]
