"""The evaluation report: metrics against hand-computed cases, the pictures, and --mode=evaluate."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tl_keras import draw
from tl_keras import models
from tl_keras import report
from tl_keras import train

from conftest import CLASS_NAMES, make_splits

# 7 examples of 3 classes, worked out by hand below.
LABELS = [0, 0, 1, 1, 1, 2, 2]
PREDICTIONS = [0, 1, 1, 1, 0, 2, 1]


def test_confusion_matrix_counts_match_a_hand_computed_case():
    # True 0: one right, one called 1. True 1: two right, one called 0. True 2: one right, one called 1.
    expected = [[1, 1, 0],
                [1, 2, 0],
                [0, 1, 1]]
    np.testing.assert_array_equal(report.confusion_matrix(LABELS, PREDICTIONS, 3), expected)
    # A class that never occurs and is never predicted keeps its empty row and column.
    np.testing.assert_array_equal(report.confusion_matrix([0, 2], [2, 2], 4),
                                  [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def test_per_class_precision_recall_f1_by_hand():
    metrics = report.per_class_metrics(report.confusion_matrix(LABELS, PREDICTIONS, 3), CLASS_NAMES)
    # cat: predicted twice (1 right), 2 examples. dog: predicted 4 times (2 right), 3 examples.
    # frog: predicted once (right), 2 examples.
    hand = {"cat": (1 / 2, 1 / 2, 2), "dog": (2 / 4, 2 / 3, 3), "frog": (1 / 1, 1 / 2, 2)}
    for name, (precision, recall, support) in hand.items():
        assert metrics[name]["precision"] == pytest.approx(precision)
        assert metrics[name]["recall"] == pytest.approx(recall)
        assert metrics[name]["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
        assert metrics[name]["support"] == support


def test_undefined_precision_is_zero():
    metrics = report.per_class_metrics(report.confusion_matrix([0, 1], [0, 0], 2), ["a", "b"])
    assert metrics["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_top_k_and_worst_misclassified():
    probabilities = np.array([[0.7, 0.2, 0.1],   # label 0: right.
                              [0.5, 0.4, 0.1],   # label 1: wrong, true class second.
                              [0.1, 0.8, 0.1],   # label 2: wrong, true class tied last.
                              [0.3, 0.3, 0.4]])  # label 0: wrong, true class tied second.
    labels = [0, 1, 2, 0]
    assert report.top_k_accuracy(probabilities, labels, 1) == pytest.approx(1 / 4)
    assert report.top_k_accuracy(probabilities, labels, 2) == pytest.approx(3 / 4)
    np.testing.assert_array_equal(report.worst_misclassified(probabilities, labels), [2, 3, 1])
    np.testing.assert_array_equal(report.worst_misclassified(probabilities, labels, n=1), [2])


def _decode(png: bytes) -> np.ndarray:
    return tf.io.decode_png(png).numpy()


def test_confusion_png_shades_rows_and_prints_counts():
    confusion = report.confusion_matrix(LABELS, PREDICTIONS, 3)
    picture = _decode(report.confusion_png(confusion, CLASS_NAMES, "test"))
    assert picture.ndim == 3 and picture.shape[2] == 3
    # The darkest blue in the picture is the largest row fraction: dog's 2 of 3 right.
    blue = np.all(picture == np.round(255 * (1 - 2 / 3) + report._BLUE * 2 / 3).astype(np.uint8), axis=-1)
    assert blue.sum() > 100
    # More classes make a bigger picture, and past ~2400 pixels cells shrink instead.
    big = _decode(report.confusion_png(np.eye(10, dtype=int) * 1000, [f"c{i}" for i in range(10)]))
    assert big.shape[0] > picture.shape[0]
    huge = _decode(report.confusion_png(np.eye(1000, dtype=int), [str(i) for i in range(1000)]))
    assert max(huge.shape[:2]) <= 2500


def test_text_is_drawn_where_asked():
    canvas = np.full((20, 40, 3), 255, np.uint8)
    draw.draw_text(canvas, "HI", 2, 3)
    dark = np.argwhere(canvas[..., 0] == 0)
    assert dark.min(axis=0).tolist() == [2, 3]
    assert dark.max(axis=0).tolist() == [6, 9]  # 5 rows; two 3-pixel glyphs and a 1-pixel gap.
    draw.draw_text(canvas, "CLIPPED AT THE EDGE", 18, 30)  # Must not raise.


def test_evaluate_mode_writes_a_report_that_matches_the_model(make_config):
    splits = make_splits(num_test=12)
    # A checkpoint is all that evaluate needs; an untrained one makes mistakes to report.
    keras.utils.set_random_seed(0)
    model = models.build_classifier("tiny", 32, 3, "none", head_units=(8,))
    os.makedirs(os.path.join(make_config().model_dir, "checkpoints"))
    model.save_weights(os.path.join(make_config().model_dir, "checkpoints", "latest.weights.h5"))
    result = train.run(make_config(mode="evaluate"), splits=splits)
    eval_dir = os.path.join(make_config().model_dir, "eval")
    assert sorted(os.listdir(eval_dir)) == ["confusion_matrix.json", "confusion_matrix.png",
                                            "misclassified.png", "report.json"]

    # Independently: the same weights in Keras, on the raw test images.
    images, labels = (np.stack(a) for a in zip(*splits.test.as_numpy_iterator()))
    predicted = model.predict(models.get_preprocessing("tiny", 32)(images), verbose=0).argmax(1)
    expected = np.zeros((3, 3), int)
    for true, guess in zip(labels, predicted):
        expected[true, guess] += 1

    with open(os.path.join(eval_dir, "confusion_matrix.json")) as f:
        confusion = json.load(f)
    assert confusion["class_names"] == CLASS_NAMES
    np.testing.assert_array_equal(confusion["matrix"], expected)
    with open(os.path.join(eval_dir, "report.json")) as f:
        written = json.load(f)
    assert written["num_examples"] == 12
    assert written["top1_accuracy"] == pytest.approx(np.trace(expected) / 12)
    assert written["top5_accuracy"] == 1.0  # Three classes: top-3 always holds the label.
    assert set(written["per_class"]) == set(CLASS_NAMES)
    assert 0 < len(written["worst_misclassified"]) == min(report.WORST_EXAMPLES, 12 - np.trace(expected))
    for worst in written["worst_misclassified"]:
        assert worst["true"] == CLASS_NAMES[labels[worst["index"]]]
        assert worst["predicted"] == CLASS_NAMES[predicted[worst["index"]]]
    with open(os.path.join(make_config().model_dir, "metrics.json")) as f:
        assert json.load(f)["test"]["test_accuracy"] == written["top1_accuracy"]
    assert result["test"]["test_accuracy"] == written["top1_accuracy"]
    for name in ("confusion_matrix.png", "misclassified.png"):
        with open(os.path.join(eval_dir, name), "rb") as f:
            assert _decode(f.read()).shape[2] == 3


def test_misclassified_grid_has_a_tile_per_image():
    images = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(5)]
    picture = _decode(report.misclassified_png(images, [["T: CAT", "P: DOG 90%"]] * 5))
    tile_h = report.TILE_PIXELS + 12 + 2 * (draw.text_size("0", report.TEXT_SCALE)[0] + 4)
    assert picture.shape[0] == 2 * tile_h  # 5 tiles: a 3-column grid of 2 rows.
    assert np.all(picture[6:6 + report.TILE_PIXELS, 6:6 + report.TILE_PIXELS] == 0)  # First image, black.
    empty = _decode(report.misclassified_png([], []))
    assert empty.shape[0] > 0
