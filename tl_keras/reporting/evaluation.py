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
RELIABILITY_PNG = "reliability_diagram.png"
CALIBRATION_BINS = 15  # Equal-width confidence bins of the expected calibration error, as in Guo et al.
# Coverages of the coverage-accuracy curve: the most confident 5%, 10%, ..., 100% of a split.
COVERAGES = tuple(round(0.05 * i, 2) for i in range(1, 21))


@dataclasses.dataclass
class Evaluation:
    """One prediction pass over a split, and everything derived from it."""

    probabilities: np.ndarray  # [N, C] float64, in dataset order.
    labels: np.ndarray  # [N] int.
    metrics: dict  # loss (as compiled), accuracy, top5_accuracy (top-min(5, C)).
    mistakes: np.ndarray  # Indices of every wrong prediction, worst first (see worst_mistakes).
    tta: str | None = None  # The test-time augmentation the probabilities average over, if any.
    single_view_metrics: dict | None = None  # With tta: the metrics of the images alone.

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


TTA_FLIP = "flip"


def tta_of(mode: str | None) -> str | None:
    """--tta's value as evaluate takes it: None for none."""
    return None if mode in (None, "none") else mode


def evaluate(model: keras.Model, dataset: tf.data.Dataset, steps: int | None = None,
             label_smoothing: float = 0.0, tta: str | None = None) -> Evaluation:
    """Predict (images, one_hot) batches once, with the model's compiled predict step, and derive the
    metrics from those predictions. `label_smoothing` must be the compiled loss's, so that the loss
    equals what model.evaluate reports.

    tta="flip" predicts each image and its mirror image and averages their logits (the normalised
    geometric mean of their probabilities), as the export does with --export_tta, so that a
    calibration temperature divides the averaged logits as it would one view's. The result's metrics
    are then those of the average, and `single_view_metrics` those of the images alone, from the same
    pass. The dataset's images must be images (preprocessed), not cached activations.
    """
    tta = tta_of(tta)
    if tta not in (None, TTA_FLIP):
        raise ValueError(f"tta must be none or {TTA_FLIP}. Received: tta={tta}")
    probabilities, labels = _predict(model, dataset, steps)
    single_view = None
    if tta:
        mirrored, _ = _predict(model, dataset, steps, flip=True)
        single_view = metrics_of(probabilities, labels, label_smoothing)
        probabilities = average_views([probabilities, mirrored])
    return Evaluation(probabilities, labels, metrics_of(probabilities, labels, label_smoothing),
                      worst_mistakes(probabilities, labels), tta, single_view)


def average_views(probabilities) -> np.ndarray:
    """Softmax of the mean logits of several views, from their probabilities: log p is the logits up
    to a per-example constant, which softmax ignores. A probability that underflowed to 0 counts as
    the smallest positive float32."""
    logs = np.mean([np.log(np.maximum(np.asarray(p, np.float64), np.finfo(np.float32).smallest_subnormal))
                    for p in probabilities], axis=0)
    logs -= logs.max(axis=1, keepdims=True)
    averaged = np.exp(logs)
    return averaged / averaged.sum(axis=1, keepdims=True)


def split_metrics(result: Evaluation, split: str) -> dict:
    """A split's metrics as metrics.json keeps them: test_loss, test_accuracy, ... and, when they
    average TTA views, "tta" naming the views and single_view_test_* beside them."""
    metrics = prefixed(result.metrics, split)
    if result.tta:
        metrics["tta"] = result.tta
        metrics.update(prefixed(result.single_view_metrics, f"single_view_{split}"))
    return metrics


def _predict(model: keras.Model, dataset: tf.data.Dataset, steps: int | None, flip: bool = False):
    inputs = dataset.map(lambda x, y: tf.image.flip_left_right(x) if flip else x)
    probabilities = model.predict(inputs, steps=steps, verbose=0)
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


def negative_log_likelihood(probabilities: np.ndarray, labels) -> float:
    """Mean -log p(true class), without label smoothing: the score temperature scaling minimises.

    A probability that underflowed to 0 counts as the smallest positive float32, not as infinity.
    """
    labels = np.asarray(labels)
    if not len(labels):
        return 0.0
    true = np.asarray(probabilities, np.float64)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(true, np.finfo(np.float32).smallest_subnormal))))


def reliability_bins(probabilities: np.ndarray, labels, bins: int = CALIBRATION_BINS) -> list:
    """The top confidence against accuracy in `bins` equal-width bins (lower, upper]: a list of
    {"lower", "upper", "count", "confidence", "accuracy"}, the last two None for an empty bin."""
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels)
    confidence = probabilities.max(axis=1) if len(labels) else np.zeros(0)
    correct = probabilities.argmax(axis=1) == labels if len(labels) else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        out.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
                    "confidence": float(confidence[members].mean()) if count else None,
                    "accuracy": float(correct[members].mean()) if count else None})
    return out


def expected_calibration_error(probabilities: np.ndarray, labels, bins: int = CALIBRATION_BINS) -> float:
    """Sum over confidence bins of |accuracy - mean confidence|, weighted by the bin's share of examples:
    0 when "90% sure" is right 90% of the time."""
    total = len(np.asarray(labels))
    if not total:
        return 0.0
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(probabilities, labels, bins) if b["count"]))


def coverage_curve(probabilities: np.ndarray, labels, coverages=COVERAGES) -> list:
    """Accuracy on the most confident share of a split, for each share in `coverages`: a list of
    {"coverage", "examples", "accuracy", "threshold"}, threshold being the lowest confidence kept.

    Equal confidences keep the split's order, so the answer is the same on every run.
    """
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels)
    if not len(labels):
        return []
    confidence = probabilities.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    correct = (probabilities.argmax(axis=1) == labels)[order]
    out = []
    for coverage in coverages:
        kept = max(1, int(np.ceil(coverage * len(labels) - 1e-9)))
        out.append({"coverage": float(coverage), "examples": kept, "accuracy": float(correct[:kept].mean()),
                    "threshold": float(confidence[order[kept - 1]])})
    return out


def confidence_threshold(probabilities: np.ndarray, labels, target_accuracy: float) -> float | None:
    """The lowest top-class confidence t such that predictions with confidence >= t reach
    `target_accuracy`: the most answers at that accuracy. None when no threshold reaches it."""
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels)
    if not len(labels):
        return None
    confidence = probabilities.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    hits = np.cumsum(probabilities.argmax(axis=1)[order] == labels[order])
    # Only the last of equal confidences is a possible cut: a threshold keeps all of them or none.
    last = np.append(sorted_confidence[1:] != sorted_confidence[:-1], True)
    accuracy = hits / np.arange(1, len(labels) + 1)
    reaching = np.flatnonzero(last & (accuracy >= target_accuracy - 1e-12))
    return float(sorted_confidence[reaching[-1]]) if len(reaching) else None


def selective_metrics(probabilities: np.ndarray, labels, threshold: float) -> dict:
    """{"coverage", "accuracy"} of the predictions whose top confidence is at least `threshold`;
    accuracy is None when none is."""
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels)
    kept = probabilities.max(axis=1) >= threshold if len(labels) else np.zeros(0, bool)
    correct = probabilities.argmax(axis=1)[kept] == labels[kept] if kept.any() else np.zeros(0, bool)
    return {"coverage": float(kept.mean()) if len(kept) else 0.0,
            "accuracy": float(correct.mean()) if len(correct) else None}


def build_report(result: Evaluation, class_names, split: str, calibration: dict | None = None) -> dict:
    """report.json's content: the metrics under their own names, per-class scores, the worst mistakes,
    calibration (ECE and NLL) and the coverage-accuracy curve.

    `calibration` (see reporting/calibration.py) replaces the calibration section with one that has
    the fitted temperature, the scores before and after it, and the confidence threshold. A result
    of averaged TTA views adds "tta" (their name) and "single_view" (the images' own metrics).
    """
    labels, predictions, probabilities = result.labels, result.predictions, result.probabilities
    per_class = per_class_metrics(confusion_matrix(labels, predictions, len(class_names)), class_names)
    views = {"tta": result.tta} if result.tta else {}
    if result.single_view_metrics:
        views["single_view"] = result.single_view_metrics
    return {
        "split": split,
        "num_examples": int(len(labels)),
        **result.metrics,
        **views,
        "top_k": min(5, len(class_names)),
        "macro_avg": {metric: float(np.mean([c[metric] for c in per_class.values()]))
                      for metric in ("precision", "recall", "f1")},
        "per_class": per_class,
        "worst_misclassified": [
            {"index": int(i), "true": class_names[labels[i]], "predicted": class_names[predictions[i]],
             "probability": float(probabilities[i, predictions[i]]),
             "true_probability": float(probabilities[i, labels[i]])}
            for i in result.mistakes[:WORST_EXAMPLES]],
        "calibration": calibration or {
            "ece": expected_calibration_error(probabilities, labels),
            "nll": negative_log_likelihood(probabilities, labels), "bins": CALIBRATION_BINS},
        "coverage_accuracy": coverage_curve(probabilities, labels),
    }


def write_report(result: Evaluation, examples: tf.data.Dataset, class_names, out_dir: str,
                 split: str, calibration: dict | None = None) -> dict:
    """Write report.json, the confusion matrix (JSON and PNG) and misclassified.png to `out_dir`, and
    with `calibration` (see build_report) the reliability diagram, before and after the temperature.

    `examples` is the evaluated split as raw (image, label) pairs in the same order, from which only
    the worst mistakes' images are read again for the picture. Returns the report.
    """
    report = build_report(result, class_names, split, calibration)
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
    if calibration:
        diagram = images.reliability_diagram(calibration["before"]["reliability"],
                                             calibration["after"]["reliability"],
                                             f"{split}: accuracy against confidence, temperature "
                                             f"{calibration['temperature']:.3g}")
        files.write_bytes(os.path.join(out_dir, RELIABILITY_PNG), images.encode_png(diagram))
    logging.info("Evaluation of %s: accuracy %.4f, top-%d %.4f, loss %.4f on %d examples%s. Report in %s",
                 split, report["accuracy"], report["top_k"], report["top5_accuracy"], report["loss"],
                 report["num_examples"], f", averaged over {result.tta} views" if result.tta else "", out_dir)
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
