"""The LR range test on a tiny softmax model over 8x8 images: the rates it applies, the losses it
records, when it stops, what it suggests, and what it writes."""

import logging
import math

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from tl_keras import errors, files
from tl_keras.reporting import images
from tl_keras.training import lr_finder

from helpers import make_examples

SIZE, CLASSES, BATCH = 8, 3, 8


@pytest.fixture(autouse=True)
def seeded():
    """The same start weights every run: the curves, and so where they stop, are reproducible."""
    keras.utils.set_random_seed(0)


def _model():
    """For tests only: rescale, flatten, softmax."""
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny_softmax")


def _batches(seed=0, n=64):
    images, labels = make_examples(n, seed, size=SIZE, num_classes=CLASSES)
    one_hot = np.eye(CLASSES, dtype=np.float32)[labels]
    return tf.data.Dataset.from_tensor_slices((images.astype(np.float32), one_hot)).batch(BATCH).repeat()


def _compile_with(optimizer_class):
    def compile_fn(model, learning_rate):
        model.compile(optimizer=optimizer_class(learning_rate), loss="categorical_crossentropy")
    return compile_fn


def test_rate_rises_exponentially_from_min_to_max():
    steps = 12
    applied = tf.Variable(tf.zeros([steps]), trainable=False)

    class RecordingSGD(keras.optimizers.SGD):
        """Writes the rate each step's update really uses, at that step's index."""

        def update_step(self, gradient, variable, learning_rate):
            step = tf.reshape(tf.cast(self.iterations.value, tf.int32), [1, 1])
            applied.scatter_nd_update(step, tf.reshape(tf.cast(learning_rate, tf.float32), [1]))
            super().update_step(gradient, variable, learning_rate)

    finding = lr_finder.find(_model(), _batches(), _compile_with(RecordingSGD), min_lr=1e-5, max_lr=1e-1,
                             steps=steps)
    expected = 1e-5 * 10.0 ** (4 * np.arange(steps) / (steps - 1))
    np.testing.assert_allclose(applied.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(finding.learning_rates, expected, rtol=1e-5)
    assert (finding.stopped_reason, finding.steps_run, len(finding.losses)) == ("max_lr", steps, steps)


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_each_loss_is_its_own_batch(strategy, mirrored_strategy):
    """Keras logs running means; the finder must record each batch's own loss. At rates near zero
    the weights stay put, so every recorded loss must equal that batch's loss under the start weights
    (the batches alternate between easy and hard labels, so a running mean would differ)."""
    images, labels = make_examples(BATCH * 4, 0, size=SIZE, num_classes=CLASSES)
    labels[BATCH:2 * BATCH] = (labels[BATCH:2 * BATCH] + 1) % CLASSES
    one_hot = np.eye(CLASSES, dtype=np.float32)[labels]
    batches = tf.data.Dataset.from_tensor_slices((images.astype(np.float32), one_hot)).batch(BATCH)
    scope = mirrored_strategy if strategy == "mirrored" else tf.distribute.get_strategy()
    with scope.scope():
        model = _model()
        model.layers[-1].kernel.assign(np.linspace(-0.02, 0.02, SIZE * SIZE * 3 * CLASSES)
                                       .reshape(-1, CLASSES).astype(np.float32))
    start = [float(keras.losses.categorical_crossentropy(y, model(x)).numpy().mean())
             for x, y in batches.take(4)]
    finding = lr_finder.find(model, batches.repeat(), _compile_with(keras.optimizers.SGD), min_lr=1e-12,
                             max_lr=1e-11, steps=12)
    if strategy == "mirrored":
        assert model.distribute_strategy is mirrored_strategy
    assert len(set(np.round(start, 3))) > 1
    np.testing.assert_allclose(finding.losses, (start * 3)[:12], rtol=1e-4)


def _diverging():
    """Adam from 1e-4 to 1e4 over 60 steps: the loss falls, then blows up around the top."""
    return lr_finder.find(_model(), _batches(), _compile_with(keras.optimizers.Adam), min_lr=1e-4,
                          max_lr=1e4, steps=60)


def test_divergence_stops_early_and_the_suggestion_lies_below_it(caplog):
    with caplog.at_level(logging.INFO, logger="absl"):
        finding = _diverging()
    assert finding.stopped_reason in ("diverged", "not_finite")
    assert finding.steps_run < 60
    last = finding.smoothed[-1]
    assert not math.isfinite(last) or last > 4 * min(finding.smoothed[:-1])
    # The suggestion is an explored rate, below the one that diverged, by the recorded rule.
    assert finding.learning_rates[0] <= finding.suggestion < finding.learning_rates[-2]
    assert finding.rule == lr_finder.RULE
    usable = lr_finder.usable_steps(finding.steps_run, finding.stopped_reason)
    rate, _ = lr_finder.suggest(finding.learning_rates[:usable], finding.losses[:usable])
    assert finding.suggestion == pytest.approx(rate)
    assert f"Suggested learning rate {finding.suggestion:.3g}" in caplog.text


def test_smoothing_is_bias_corrected():
    finding = lr_finder.find(_model(), _batches(), _compile_with(keras.optimizers.Adam), min_lr=1e-4,
                             max_lr=1e-2, steps=12, beta=0.9)
    assert finding.smoothed[0] == pytest.approx(finding.losses[0])  # Not 0.1 x it.
    expected, average = [], 0.0
    for i, loss in enumerate(finding.losses):
        average = 0.9 * average + 0.1 * loss
        expected.append(average / (1 - 0.9 ** (i + 1)))
    np.testing.assert_allclose(finding.smoothed, expected, rtol=1e-6)
    np.testing.assert_allclose(lr_finder.smooth(finding.losses, 0.9), expected, rtol=1e-12)


def test_works_with_a_multi_optimizer():
    """MultiOptimizer has no learning_rate to read or set: the schedule goes to each sub-optimizer."""
    def compile_fn(model, learning_rate):
        optimizers = keras.optimizers.OptimizerMap(keras.optimizers.Adam(learning_rate),
                                                   {"predictions/bias": keras.optimizers.SGD(learning_rate)})
        model.compile(optimizer=keras.optimizers.MultiOptimizer(optimizers), loss="categorical_crossentropy")

    model = _model()
    finding = lr_finder.find(model, _batches(), compile_fn, min_lr=1e-5, max_lr=1e-1, steps=12)
    assert isinstance(model.optimizer, keras.optimizers.MultiOptimizer)
    assert [int(o.iterations.numpy()) for o in model.optimizer.optimizers] == [12, 12]
    np.testing.assert_allclose(finding.learning_rates, 1e-5 * 10.0 ** (4 * np.arange(12) / 11), rtol=1e-5)
    assert finding.learning_rates[0] <= finding.suggestion <= finding.learning_rates[-1]


def test_write_finding_writes_a_plot_and_json_that_round_trips(tmp_path):
    finding = _diverging()
    paths = lr_finder.write_finding(finding, str(tmp_path / "lr_find"), "head")
    assert paths == {"json": str(tmp_path / "lr_find" / "head.json"),
                     "png": str(tmp_path / "lr_find" / "head.png")}
    data = files.read_json(paths["json"])
    assert data == finding.to_dict()
    assert lr_finder.Finding.from_dict(data).to_dict() == data
    assert data["suggestion"] == finding.suggestion and data["rule"] == lr_finder.RULE
    pixels = np.asarray(Image.open(paths["png"]).convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 10
    # The curve (blue) and the marker (red) are both drawn.
    assert np.any(np.all(pixels == (31, 119, 180), axis=-1))
    assert np.any(np.all(pixels == (200, 30, 30), axis=-1))


def test_non_finite_losses_are_json_null(tmp_path):
    finding = lr_finder.Finding(
        learning_rates=list(np.geomspace(1e-3, 1, 11)), losses=[1.0] * 10 + [math.nan],
        smoothed=[1.0] * 10 + [math.nan], suggestion=1e-3, rule=lr_finder.RULE, stopped_reason="not_finite",
        steps_run=11, min_lr=1e-3, max_lr=1.0, steps=20, beta=0.98, diverge_factor=4.0)
    paths = lr_finder.write_finding(finding, str(tmp_path), "nan")
    data = files.read_json(paths["json"])
    assert data["losses"][-1] is None and data["smoothed"][-1] is None


def _one_line_error(error, *needles):
    message = str(error.value)
    assert "\n" not in message and "Received: " in message, message
    for needle in needles:
        assert needle in message, message


def test_too_short_curves_are_one_line_errors():
    with pytest.raises(errors.UserError) as error:  # Diverges at once.
        lr_finder.find(_model(), _batches(), _compile_with(keras.optimizers.Adam), min_lr=1e3, max_lr=1e6,
                       steps=20)
    _one_line_error(error, "(diverged) after", "too few", "Received: steps_run=")
    with pytest.raises(errors.UserError) as error, pytest.warns(UserWarning, match="ran out of data"):
        lr_finder.find(_model(), _batches().take(6), _compile_with(keras.optimizers.Adam), steps=20)
    _one_line_error(error, "(out_of_data) after 6 steps", "Received: steps_run=6")
    with pytest.raises(errors.UserError) as error:
        lr_finder.find(_model(), _batches(), _compile_with(keras.optimizers.Adam), steps=5)
    _one_line_error(error, "Received: steps=5")
    with pytest.raises(errors.UserError) as error:
        lr_finder.suggest(np.geomspace(1e-5, 1, 9), np.ones(9))
    _one_line_error(error, "Received: steps=9")


def test_a_rising_curve_is_suggested_its_first_rate():
    rates = np.geomspace(1e-7, 10, 40)
    losses = 1 + 3 * np.linspace(0, 1, 40)  # Lowest at the start: it only rose.
    suggestion, rule = lr_finder.suggest(rates, losses)
    assert suggestion == pytest.approx(1e-7) and "clamped" in rule


def test_a_flat_curve_is_suggested_a_tenth_of_where_it_starts_to_rise():
    """Fine-tuning a trained model: flat (with noise) up to 1e-3, then diverging. Its lowest point is
    noise, at the start here; the suggestion comes from where the plateau ends."""
    rates = np.geomspace(1e-7, 10, 100)
    noise = np.random.default_rng(0).normal(0, 0.05, 100)
    losses = 2.1 + noise + np.where(rates > 1e-3, 3 * np.log10(rates / 1e-3), 0.0)
    losses[:5] -= 0.1  # The lowest losses, at the first steps: noise, not a valley.
    suggestion, rule = lr_finder.suggest(rates, losses)
    # Not the first rate (where the noise is lowest), and below a tenth of the rise; the smoothing's
    # half-decade time constant lets the rise show up to a decade early.
    assert 1e-6 <= suggestion <= 1e-4 and rule == lr_finder.RULE


def test_a_valley_is_suggested_about_a_tenth_of_its_floor():
    rates = np.geomspace(1e-7, 10, 100)
    losses = 2.3 - 0.8 * np.exp(-(np.log10(rates / 1e-3) ** 2) / 0.5) + np.where(
        rates > 1e-2, 2 * np.log10(rates / 1e-2), 0.0)
    suggestion, _ = lr_finder.suggest(rates, losses)
    assert 8e-5 <= suggestion <= 2.5e-4


def test_schedule_serializes():
    schedule = lr_finder.ExponentialRange(1e-6, 1.0, 7)
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    np.testing.assert_allclose([float(restored(s)) for s in (0, 3, 6, 9)], [1e-6, 1e-3, 1.0, 1.0], rtol=1e-5)


def test_line_chart_puts_a_marker_where_the_log_axis_says():
    """10 is halfway between 1 and 100 on a log axis (and far left of halfway on a linear one)."""
    blue, red = (31, 119, 180), images.WRONG
    for log_x, where in ((True, 0.5), (False, 9 / 99)):
        picture = images.line_chart([("line", [1, 100], [0, 1], blue, 3)], log_x=log_x, marker=10.0,
                                    marker_label="ten", y_label="y", title="t")
        # The legend's sample is blue too: measure the plotted line below the header.
        body = picture[3 * images.LINE_HEIGHT:]
        line_columns = np.nonzero(np.all(body == blue, axis=-1).any(axis=0))[0]
        left, right = line_columns.min(), line_columns.max()
        marker_columns = np.nonzero(np.all(body == red, axis=-1).sum(axis=0) > 20)[0]
        assert abs(marker_columns.mean() - (left + where * (right - left))) <= 3, (log_x, marker_columns)


def test_line_chart_breaks_lines_and_refuses_mismatches():
    nan = math.nan
    picture = images.line_chart([("gap", [0, 1, 2, 3, 4], [0, 1, nan, 1, 0], (0, 128, 0), 1)])
    body = np.all(picture[3 * images.LINE_HEIGHT:] == (0, 128, 0), axis=-1)
    columns = np.nonzero(body.any(axis=0))[0]
    middle = (columns.min() + columns.max()) // 2  # x=2, where the NaN is.
    assert body[:, columns.min() + 5].any() and body[:, columns.max() - 5].any()
    assert not body[:, middle - 5:middle + 6].any()
    assert images.line_chart([("empty", [1.0], [nan])]).shape[0] < 50  # "Nothing to plot".
    with pytest.raises(ValueError, match="as many xs as ys"):
        images.line_chart([("bad", [1, 2], [1])])
