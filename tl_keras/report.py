"""The evaluation report a user can act on: which classes fail, what they are mistaken for, and the
images the model gets most confidently wrong. Written by --mode=evaluate to model_dir/eval/."""

import json
import os

from absl import logging
import numpy as np
import tensorflow as tf

from tl_keras import draw
from tl_keras import files

REPORT_FILE = "report.json"
CONFUSION_JSON = "confusion_matrix.json"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
WORST_EXAMPLES = 16
TILE_PIXELS = 96
TEXT_SCALE = 2
NAME_CHARS = 12

_BLUE = np.array([8, 69, 148], dtype=np.float32)
_GRID = (210, 210, 210)
_RED = (190, 0, 0)


def write_report(model, dataset: tf.data.Dataset, examples: tf.data.Dataset, class_names, out_dir: str,
                 split: str, steps: int | None = None) -> dict:
    """Predict `dataset` (preprocessed batches, one-hot labels) once and write every report file.

    `examples` is the same split as raw (image, label) pairs in the same order, from which only the
    worst images are fetched again for the picture.
    """
    probabilities, labels = collect_predictions(model, dataset, steps)
    report = build_report(probabilities, labels, class_names, split)
    confusion = confusion_matrix(labels, probabilities.argmax(axis=1), len(class_names))
    worst = report["worst_misclassified"]
    images = fetch_examples(examples, [w["index"] for w in worst])
    captions = [[f"T: {draw.fit(w['true'], NAME_CHARS)}",
                 f"P: {draw.fit(w['predicted'], NAME_CHARS)} {round(100 * w['probability'])}%"]
                for w in worst]
    os.makedirs(out_dir, exist_ok=True)
    files.write_text(os.path.join(out_dir, REPORT_FILE), json.dumps(report, indent=2) + "\n")
    files.write_text(os.path.join(out_dir, CONFUSION_JSON), json.dumps({
        "split": split, "rows": "true class", "columns": "predicted class",
        "class_names": list(class_names), "matrix": confusion.tolist()}, indent=1) + "\n")
    files.write_bytes(os.path.join(out_dir, CONFUSION_PNG), confusion_png(confusion, class_names, split))
    files.write_bytes(os.path.join(out_dir, MISCLASSIFIED_PNG), misclassified_png(images, captions))
    logging.info("Evaluation of %s: top-1 %.4f, top-%d %.4f on %d examples. Report in %s",
                 split, report["top1_accuracy"], report["top_k"], report["top5_accuracy"],
                 report["num_examples"], out_dir)
    return report


def collect_predictions(model, dataset: tf.data.Dataset, steps: int | None = None):
    """(probabilities [N, C], integer labels [N]) in dataset order."""
    probabilities = model.predict(dataset.map(lambda x, y: x), steps=steps, verbose=0)
    one_hot = dataset.map(lambda x, y: y)
    if steps:
        one_hot = one_hot.take(steps)
    labels = np.concatenate([np.argmax(y, axis=-1) for y in one_hot.as_numpy_iterator()])
    return np.asarray(probabilities, dtype=np.float64), labels[:len(probabilities)]


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


def worst_misclassified(probabilities: np.ndarray, labels, n: int = WORST_EXAMPLES) -> np.ndarray:
    """Indices of wrong predictions, least probability on the true class first."""
    labels = np.asarray(labels)
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != labels)
    true_probability = probabilities[wrong, labels[wrong]]
    return wrong[np.argsort(true_probability, kind="stable")[:n]]


def build_report(probabilities: np.ndarray, labels, class_names, split: str) -> dict:
    labels = np.asarray(labels)
    predictions = probabilities.argmax(axis=1)
    per_class = per_class_metrics(confusion_matrix(labels, predictions, len(class_names)), class_names)
    k = min(5, len(class_names))
    true_probability = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    return {
        "split": split,
        "num_examples": int(len(labels)),
        "top1_accuracy": top_k_accuracy(probabilities, labels, 1),
        "top5_accuracy": top_k_accuracy(probabilities, labels, k),
        "top_k": k,
        "cross_entropy": float(np.mean(-np.log(true_probability))) if len(labels) else 0.0,
        "macro_avg": {metric: float(np.mean([c[metric] for c in per_class.values()]))
                      for metric in ("precision", "recall", "f1")},
        "per_class": per_class,
        "worst_misclassified": [
            {"index": int(i), "true": class_names[labels[i]], "predicted": class_names[predictions[i]],
             "probability": float(probabilities[i, predictions[i]]),
             "true_probability": float(probabilities[i, labels[i]])}
            for i in worst_misclassified(probabilities, labels)],
    }


def fetch_examples(examples: tf.data.Dataset, indices) -> list:
    """The uint8 images at `indices` of the raw split, in the order of `indices`, in one pass."""
    if not len(indices):
        return []
    wanted = tf.constant(sorted(set(indices)), tf.int64)
    found = examples.enumerate().filter(lambda i, example: tf.reduce_any(tf.equal(i, wanted)))
    images = {int(i): example[0].numpy() for i, example in found.take(len(wanted))}
    return [images[i] for i in indices]


def confusion_png(confusion: np.ndarray, class_names, split: str = "") -> bytes:
    """Rows are true classes, columns predicted ones; shading is the fraction of the row, and each
    cell shows its count while the picture stays under ~2400 pixels a side."""
    n = len(class_names)
    char_h, char_w = draw.text_size("0", TEXT_SCALE)
    advance = char_w + TEXT_SCALE
    cell = max(24, len(str(int(confusion.max(initial=0)))) * advance + 8)
    if n * cell > 2400:
        cell = max(2, 2400 // n)
    labelled = cell >= 24
    pad = 8
    row_labels = [f"{i} {draw.fit(name, NAME_CHARS)}" for i, name in enumerate(class_names)]
    row_labels = row_labels if labelled else []
    left = pad + max((draw.text_size(t, TEXT_SCALE)[1] for t in row_labels), default=0) + pad
    title = f"CONFUSION {split}: ROWS TRUE, COLUMNS PREDICTED".replace("  ", " ")
    top = pad + char_h + pad + (char_h + pad if labelled else 0)
    width = max(left + n * cell + pad, 2 * pad + draw.text_size(title, TEXT_SCALE)[1])
    canvas = np.full((top + n * cell + pad, width, 3), 255, dtype=np.uint8)
    draw.draw_text(canvas, title, pad, pad, scale=TEXT_SCALE)
    rows = confusion.sum(axis=1, keepdims=True)
    fractions = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    colors = np.round(255 * (1 - fractions[..., None]) + _BLUE * fractions[..., None]).astype(np.uint8)
    cells = np.repeat(np.repeat(colors, cell, axis=0), cell, axis=1)
    if cell >= 6:
        edge = np.isin(np.arange(n * cell) % cell, (0, cell - 1))
        cells[edge, :] = _GRID
        cells[:, edge] = _GRID
    canvas[top:top + n * cell, left:left + n * cell] = cells
    for i in range(n if labelled else 0):
        y = top + i * cell
        draw.draw_text(canvas, row_labels[i], y + (cell - char_h) // 2, pad, scale=TEXT_SCALE)
        column = str(i)
        draw.draw_text(canvas, column, top - pad - char_h,
                       left + i * cell + (cell - draw.text_size(column, TEXT_SCALE)[1]) // 2,
                       scale=TEXT_SCALE)
        for j in range(n):
            count = str(int(confusion[i, j]))
            draw.draw_text(canvas, count, y + (cell - char_h) // 2,
                           left + j * cell + (cell - draw.text_size(count, TEXT_SCALE)[1]) // 2,
                           color=draw.WHITE if fractions[i, j] > 0.5 else draw.BLACK, scale=TEXT_SCALE)
    return tf.io.encode_png(canvas).numpy()


def misclassified_png(images: list, captions: list) -> bytes:
    """A grid of tiles: each image scaled to TILE_PIXELS (aspect kept) above its caption lines."""
    pad = 6
    line_h = draw.text_size("0", TEXT_SCALE)[0] + 4
    if not images:
        message = "NO MISCLASSIFIED EXAMPLES"
        width = draw.text_size(message, TEXT_SCALE)[1] + 2 * pad
        canvas = np.full((line_h + 2 * pad, width, 3), 255, np.uint8)
        draw.draw_text(canvas, message, pad, pad, scale=TEXT_SCALE)
        return tf.io.encode_png(canvas).numpy()
    lines = max(len(c) for c in captions)
    tile_w = max([TILE_PIXELS] + [draw.text_size(t, TEXT_SCALE)[1] for c in captions for t in c]) + 2 * pad
    tile_h = TILE_PIXELS + 2 * pad + lines * line_h
    columns = int(np.ceil(np.sqrt(len(images))))
    grid_rows = int(np.ceil(len(images) / columns))
    canvas = np.full((grid_rows * tile_h, columns * tile_w, 3), 255, dtype=np.uint8)
    for k, (image, caption) in enumerate(zip(images, captions)):
        y, x = (k // columns) * tile_h + pad, (k % columns) * tile_w + pad
        canvas[y:y + TILE_PIXELS, x:x + TILE_PIXELS] = _tile(image)
        for n, text in enumerate(caption):
            draw.draw_text(canvas, text, y + TILE_PIXELS + 4 + n * line_h, x,
                           color=draw.BLACK if n == 0 else _RED, scale=TEXT_SCALE)
    return tf.io.encode_png(canvas).numpy()


def _tile(image: np.ndarray) -> np.ndarray:
    # Nearest-neighbour keeps small images' pixels sharp when enlarged; area averages when shrinking.
    method = "nearest" if max(image.shape[:2]) <= TILE_PIXELS else "area"
    tile = tf.image.resize_with_pad(image, TILE_PIXELS, TILE_PIXELS, method=method)
    return np.clip(np.round(tile.numpy()), 0, 255).astype(np.uint8)
