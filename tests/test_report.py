"""The one evaluation path and the one renderer: metrics against hand-computed cases and against
model.evaluate, the pictures, and --mode=evaluate."""

import io
import json
import os

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from tl_keras.data import pipeline
from tl_keras.model import backbones
from tl_keras.model import classifier
from tl_keras.reporting import evaluation
from tl_keras.reporting import images
from tl_keras.training import run as train

from helpers import CLASS_NAMES, make_examples, make_splits

# 7 examples of 3 classes, worked out by hand below.
LABELS = [0, 0, 1, 1, 1, 2, 2]
PREDICTIONS = [0, 1, 1, 1, 0, 2, 1]


def test_confusion_matrix_counts_match_a_hand_computed_case():
    # True 0: one right, one called 1. True 1: two right, one called 0. True 2: one right, one called 1.
    expected = [[1, 1, 0],
                [1, 2, 0],
                [0, 1, 1]]
    np.testing.assert_array_equal(evaluation.confusion_matrix(LABELS, PREDICTIONS, 3), expected)
    # A class that never occurs and is never predicted keeps its empty row and column.
    np.testing.assert_array_equal(evaluation.confusion_matrix([0, 2], [2, 2], 4),
                                  [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def test_per_class_precision_recall_f1_by_hand():
    metrics = evaluation.per_class_metrics(evaluation.confusion_matrix(LABELS, PREDICTIONS, 3), CLASS_NAMES)
    # cat: predicted twice (1 right), 2 examples. dog: predicted 4 times (2 right), 3 examples.
    # frog: predicted once (right), 2 examples.
    hand = {"cat": (1 / 2, 1 / 2, 2), "dog": (2 / 4, 2 / 3, 3), "frog": (1 / 1, 1 / 2, 2)}
    for name, (precision, recall, support) in hand.items():
        assert metrics[name]["precision"] == pytest.approx(precision)
        assert metrics[name]["recall"] == pytest.approx(recall)
        assert metrics[name]["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
        assert metrics[name]["support"] == support


def test_undefined_precision_is_zero():
    metrics = evaluation.per_class_metrics(evaluation.confusion_matrix([0, 1], [0, 0], 2), ["a", "b"])
    assert metrics["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_worst_mistakes_rank_by_confidence_in_the_wrong_class():
    probabilities = np.array([[0.70, 0.20, 0.10],   # label 0: right.
                              [0.48, 0.47, 0.05],   # label 2: wrong, unsure (48%), true class hopeless.
                              [0.90, 0.10, 0.00],   # label 1: wrong, and sure of it (90%).
                              [0.30, 0.60, 0.10],   # label 0: wrong at 60%...
                              [0.30, 0.60, 0.10]])  # label 0: ...and a tie, which keeps dataset order.
    labels = [0, 2, 1, 0, 0]
    np.testing.assert_array_equal(evaluation.worst_mistakes(probabilities, labels), [2, 3, 4, 1])
    np.testing.assert_array_equal(evaluation.worst_mistakes(probabilities, labels, 1), [2])
    # Not the other definition: by the lowest probability of the true class, example 1 would lead.
    wrong = np.array([1, 2, 3, 4])
    by_true_class = wrong[np.argsort(probabilities[wrong, np.array(labels)[wrong]], kind="stable")]
    assert by_true_class[0] == 1
    assert evaluation.worst_mistakes(np.eye(3), [0, 1, 2]).size == 0
    assert evaluation.top_k_accuracy(probabilities, labels, 1) == pytest.approx(1 / 5)
    assert evaluation.top_k_accuracy(probabilities, labels, 2) == pytest.approx(4 / 5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_evaluate_metrics_match_keras_evaluate(label_smoothing):
    """One prediction pass gives what model.evaluate reports with the compiled loss and metrics."""
    keras.utils.set_random_seed(0)
    model = classifier.build_classifier("tiny", 32, 7, "none", head_units=(8,))
    model.compile(loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                           keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy")])
    pictures, labels = make_examples(40, seed=3, num_classes=7)
    batches = pipeline.build_eval_dataset(tf.data.Dataset.from_tensor_slices((pictures, labels)),
                                          backbones.get_preprocessing("tiny", 32), 16, 7, cache=False)
    result = evaluation.evaluate(model, batches, label_smoothing=label_smoothing)
    np.testing.assert_array_equal(result.labels, labels)
    assert result.probabilities.shape == (40, 7) and result.probabilities.dtype == np.float64
    expected = model.evaluate(batches, return_dict=True, verbose=0)
    assert set(result.metrics) == {"loss", "accuracy", "top5_accuracy"}
    for name, value in result.metrics.items():
        assert value == pytest.approx(expected[name], abs=1e-5), name
    assert result.metrics["top5_accuracy"] > result.metrics["accuracy"]  # 7 classes: top-5 differs.
    np.testing.assert_array_equal(result.mistakes, evaluation.worst_mistakes(result.probabilities, labels))
    assert evaluation.prefixed(result.metrics, "test") == {
        "test_loss": result.metrics["loss"], "test_accuracy": result.metrics["accuracy"],
        "test_top5_accuracy": result.metrics["top5_accuracy"]}
    # eval_steps caps the pass, and the labels with it.
    capped = evaluation.evaluate(model, batches, steps=2, label_smoothing=label_smoothing)
    np.testing.assert_array_equal(capped.labels, labels[:32])


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_confusion_image_shades_each_cell_by_its_row_share():
    confusion = evaluation.confusion_matrix(LABELS, PREDICTIONS, 3)
    picture = _decode(images.encode_png(images.confusion_matrix_image(confusion, CLASS_NAMES, "test")))
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.dtype == np.uint8
    cell = images.confusion_cell_size(3)

    def inside(i, j):  # A pixel inside cell (i, j), clear of its outline and its centred count.
        return picture[images.CM_HEADER + i * cell + 3, images.CM_LABEL_WIDTH + j * cell + 3].astype(int)

    rows = confusion.sum(axis=1)
    for i in range(3):
        for j in range(3):
            share = confusion[i, j] / rows[i]
            np.testing.assert_array_equal(inside(i, j), np.round(255 + (images.BLUE - 255) * share), (i, j))
    # The counts are drawn: the centre of dog's 2-of-3 cell holds white (count) and blue pixels.
    centre = picture[images.CM_HEADER + cell: images.CM_HEADER + 2 * cell,
                     images.CM_LABEL_WIDTH + cell: images.CM_LABEL_WIDTH + 2 * cell]
    assert (centre.min(axis=-1) > 200).any()
    # An empty row stays white.
    empty = images.confusion_matrix_image(np.diag([5, 0, 5]), CLASS_NAMES)
    assert empty[images.CM_HEADER + cell + 3, images.CM_LABEL_WIDTH + cell + 3].tolist() == [255, 255, 255]


def test_confusion_image_size_stays_bounded():
    small = images.confusion_matrix_image(np.eye(3, dtype=int), CLASS_NAMES)
    ten = images.confusion_matrix_image(np.eye(10, dtype=int) * 1000, [f"c{i}" for i in range(10)])
    assert ten.shape[0] > small.shape[0]
    hundred = images.confusion_matrix_image(np.eye(100, dtype=int), [str(i) for i in range(100)])
    thousand = images.confusion_matrix_image(np.eye(1000, dtype=int), [str(i) for i in range(1000)])
    for picture in (ten, hundred, thousand):
        assert max(picture.shape[:2]) <= images.CM_MAX_SIDE + images.CM_LABEL_WIDTH + images.CM_HEADER
    # A thousand 1-pixel cells: the diagonal is the full blue, everything else white.
    matrix_area = thousand[images.CM_HEADER:images.CM_HEADER + 1000, images.PAD:images.PAD + 1000]
    diagonal = matrix_area[np.arange(1000), np.arange(1000)]
    np.testing.assert_array_equal(diagonal, np.tile(images.BLUE, (1000, 1)))
    assert (matrix_area.sum(axis=-1) == 3 * 255).sum() == 1000 * 1000 - 1000


def test_captioned_grid_has_a_tile_per_image_and_its_captions():
    pictures = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(5)]
    captions = [[("true: cat", images.INK), ("pred: dog", images.WRONG)]] * 5
    grid = _decode(images.encode_png(images.captioned_grid(pictures, captions)))
    tile = 96  # 32-pixel images enlarged 3 times.
    cell_h = tile + 2 * images.LINE_HEIGHT + images.PAD
    # 3 columns, 2 rows.
    assert grid.shape == (2 * cell_h + images.PAD, 3 * (tile + images.PAD) + images.PAD, 3)
    pad = images.PAD
    assert np.all(grid[pad:pad + tile, pad:pad + tile] == 0)  # The first image, black, fills its tile.
    first_line = grid[pad + tile:pad + tile + images.LINE_HEIGHT, pad:pad + tile].astype(int)
    second_line = grid[pad + tile + images.LINE_HEIGHT:pad + cell_h - pad, pad:pad + tile].astype(int)
    assert (first_line.max(axis=-1) < 100).any()  # Black text.
    assert ((second_line[..., 0] - second_line[..., 1]) > 100).any()  # Red text.
    assert not ((first_line[..., 0] - first_line[..., 1]) > 100).any()
    # Photos of any size share one bounded tile size, aspect kept.
    mixed = images.captioned_grid([np.zeros((3000, 4000, 3), np.uint8), np.zeros((20, 30, 1), np.uint8)],
                                  [[("a", images.INK)]] * 2)
    assert images.tile_size([np.zeros((3000, 4000, 3))]) == images.MAX_TILE
    assert mixed.shape[1] == 2 * (images.MAX_TILE + pad) + pad


def test_no_mistakes_still_make_a_picture():
    picture = _decode(images.encode_png(images.misclassified_grid([], [], [], [])))
    assert picture.shape[0] > 0 and picture.shape[2] == 3
    assert (picture.max(axis=-1) < 100).any()  # The message is drawn.


def test_evaluate_mode_writes_a_report_that_matches_the_model(make_config):
    splits = make_splits(num_test=12)
    # A checkpoint is all that evaluate needs; an untrained one makes mistakes to report.
    keras.utils.set_random_seed(0)
    model = classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,))
    os.makedirs(os.path.join(make_config().model_dir, "checkpoints"))
    model.save_weights(os.path.join(make_config().model_dir, "checkpoints", "latest.weights.h5"))
    result = train.run(make_config(mode="evaluate"), splits=splits)
    eval_dir = os.path.join(make_config().model_dir, "eval")
    assert sorted(os.listdir(eval_dir)) == ["confusion_matrix.json", "confusion_matrix.png",
                                            "misclassified.png", "report.json"]

    # Independently: the same weights in Keras, on the raw test images.
    raw, labels = (np.stack(a) for a in zip(*splits.test.as_numpy_iterator()))
    probabilities = model.predict(backbones.get_preprocessing("tiny", 32)(raw), verbose=0)
    predicted = probabilities.argmax(1)
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
    assert written["accuracy"] == pytest.approx(np.trace(expected) / 12)
    assert written["top5_accuracy"] == 1.0  # Three classes: top-3 always holds the label.
    assert written["loss"] == pytest.approx(
        float(keras.losses.CategoricalCrossentropy()(np.eye(3)[labels], probabilities)), abs=1e-5)
    assert "top1_accuracy" not in written and "cross_entropy" not in written
    assert set(written["per_class"]) == set(CLASS_NAMES)
    worst = written["worst_misclassified"]
    assert 0 < len(worst) == min(evaluation.WORST_EXAMPLES, 12 - np.trace(expected))
    for mistake in worst:
        assert mistake["true"] == CLASS_NAMES[labels[mistake["index"]]]
        assert mistake["predicted"] == CLASS_NAMES[predicted[mistake["index"]]]
    confidences = [mistake["probability"] for mistake in worst]
    assert confidences == sorted(confidences, reverse=True)  # Worst first: the most confident.
    with open(os.path.join(make_config().model_dir, "metrics.json")) as f:
        assert json.load(f)["test"]["test_accuracy"] == written["accuracy"]
    assert result["test"] == evaluation.prefixed(
        {name: written[name] for name in ("loss", "accuracy", "top5_accuracy")}, "test")
    for name in ("confusion_matrix.png", "misclassified.png"):
        with open(os.path.join(eval_dir, name), "rb") as f:
            assert _decode(f.read()).shape[2] == 3
