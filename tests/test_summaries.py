"""TensorBoard logs, read back from the event files a real run wrote, and through a real server."""

import glob
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

from absl.testing import flagsaver
import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from tl_keras import backbones
from tl_keras import config as config_lib
from tl_keras import flags as tl_flags
from tl_keras import models
from tl_keras import report
from tl_keras import summaries
from tl_keras import train
from tl_keras.errors import UserError

from conftest import CLASS_NAMES, make_splits

STEPS_PER_EPOCH = 3
LOG_EVERY = 2
EPOCH_TAGS = {"epoch_loss", "epoch_accuracy", "epoch_top5_accuracy"}
TRAIN_TAGS = EPOCH_TAGS | {
    "epoch_learning_rate", "epoch_throughput", "epoch_time", "epoch_input_wait", "epoch_phase",
    "batch_loss", "batch_accuracy", "batch_top5_accuracy", "batch_learning_rate", "batch_throughput",
    "batch_input_wait", "batch_phase", "augmented_inputs"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run shared by the tests below: 2 + 2 epochs of 3 steps, a point every 2 steps, a profile.

    16 training examples in batches of 4: every batch is full, so the step-mean checks are exact.
    """
    config = config_lib.Config(
        model_dir=str(tmp_path_factory.mktemp("summaries") / "run"), backbone="tiny", weights="none",
        image_size=32, batch_size=4, head_units=(8,), distribution_strategy="default",
        augment="flip_translate", cache_features="false", fine_tune_at="block2_conv1",
        head_epochs=2, finetune_epochs=2, steps_per_epoch=STEPS_PER_EPOCH, head_learning_rate=1e-3,
        finetune_learning_rate=1e-4, finetune_warmup_epochs=1, log_every_steps=LOG_EVERY,
        profile_steps=(2, 3))
    splits = make_splits(num_train=20, num_test=8, validation_split=0.2)
    metrics = train.run(config, splits=splits)
    return config, metrics, os.path.join(config.model_dir, "logs")


def _read(log_dir):
    """{tag: [(step, value)]} for every summary in one TensorBoard run (one folder)."""
    acc = event_accumulator.EventAccumulator(log_dir, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        values = []
        for event in acc.Tensors(tag):
            value = tf.make_ndarray(event.tensor_proto)
            if plugin == "scalars":
                value = float(value)
            elif plugin == "images":
                value = np.asarray(Image.open(io.BytesIO(value[2])))
            elif plugin == "text":
                value = value.item().decode()
            values.append((event.step, value))
        out[tag] = values
    return out


def _steps(series):
    return [step for step, _ in series]


def _values(series):
    return [value for _, value in series]


def test_tags_and_steps_continue_across_phases(run):
    _, _, logs = run
    train_run, validation, test = (_read(os.path.join(logs, d)) for d in ("train", "validation", "test"))
    assert set(train_run) == TRAIN_TAGS
    assert set(validation) == EPOCH_TAGS | {"epoch_throughput", "epoch_time"}
    assert set(test) == EPOCH_TAGS | {"epoch_phase", "confusion_matrix", "confusion_matrix_counts",
                                      "misclassified"}
    for tag in TRAIN_TAGS - {"augmented_inputs"}:
        expected = [0, 1, 2, 3] if tag.startswith("epoch_") else [2, 4, 6, 8, 10, 12]
        assert _steps(train_run[tag]) == expected, tag
    for tag in validation:
        assert _steps(validation[tag]) == [0, 1, 2, 3], tag
    for tag in ("epoch_accuracy", "confusion_matrix", "confusion_matrix_counts"):
        assert _steps(test[tag]) == [1, 3], tag  # The last epoch of each phase.
    assert _values(train_run["epoch_phase"]) == [1, 1, 2, 2]
    assert _values(train_run["batch_phase"]) == [1, 1, 1, 2, 2, 2]


def test_learning_rate_drops_in_phase_two_as_configured(run):
    config, _, logs = run
    scalars = _read(os.path.join(logs, "train"))
    schedule = train.finetune_schedule(config, STEPS_PER_EPOCH)
    phase_one_steps = config.head_epochs * STEPS_PER_EPOCH
    for step, value in scalars["batch_learning_rate"]:
        if step <= phase_one_steps:
            assert value == pytest.approx(config.head_learning_rate)
        else:  # The schedule's value at the step taken: warmup from 0 to the peak, then cosine decay.
            assert value == pytest.approx(float(schedule(step - phase_one_steps - 1)), rel=1e-5)
    by_step = dict(scalars["batch_learning_rate"])
    assert by_step[10] == pytest.approx(config.finetune_learning_rate)  # Warmup ends after 3 steps.
    assert by_step[8] < by_step[10] and by_step[12] < by_step[10]
    epochs = _values(scalars["epoch_learning_rate"])
    assert epochs[:2] == pytest.approx([config.head_learning_rate] * 2)
    assert max(epochs[2:]) <= config.finetune_learning_rate * (1 + 1e-6) < config.head_learning_rate


def test_scalars_are_sensible(run):
    config, metrics, logs = run
    train_run, validation, test = (_read(os.path.join(logs, d)) for d in ("train", "validation", "test"))
    for scalars in (train_run, validation, test):
        for tag in ("epoch_accuracy", "epoch_top5_accuracy"):
            assert all(0.0 <= v <= 1.0 for v in _values(scalars[tag])), tag
        assert all(np.isfinite(v) and v > 0 for v in _values(scalars["epoch_loss"]))
    for scalars in (train_run, validation):
        assert all(v > 0 for v in _values(scalars["epoch_throughput"]) + _values(scalars["epoch_time"]))
    for tag in ("epoch_input_wait", "batch_input_wait"):
        assert all(0.0 <= v <= 1.0 for v in _values(train_run[tag])), tag
    # batch_* are means over the steps since the previous point: per phase they add up to the epochs.
    for phase, batch_points, epochs in ((1, slice(0, 3), slice(0, 2)), (2, slice(3, 6), slice(2, 4))):
        for name in ("loss", "accuracy"):
            from_points = LOG_EVERY * sum(_values(train_run[f"batch_{name}"])[batch_points])
            from_epochs = STEPS_PER_EPOCH * sum(_values(train_run[f"epoch_{name}"])[epochs])
            assert from_points == pytest.approx(from_epochs, rel=1e-4), (phase, name)
    # The test run's last points are what metrics.json reports.
    assert _values(test["epoch_accuracy"]) == pytest.approx(
        [metrics["head"]["test_accuracy"], metrics["finetune"]["test_accuracy"]])


def test_images(run):
    _, metrics, logs = run
    (step, grid), = _read(os.path.join(logs, "train"))["augmented_inputs"]
    # 16 examples of 32 px shown at 96 px in a 4 x 4 grid, each with one caption line.
    tile = 32 * 3
    assert step == 0 and grid.shape == (4 * (tile + summaries.LINE_HEIGHT + 4) + 4, 4 * (tile + 4) + 4, 3)
    assert grid.std() > 10  # Real pictures, not a blank or saturated canvas.
    test = _read(os.path.join(logs, "test"))
    for step, image in test["confusion_matrix"]:
        # 3 classes in 40 px cells, after a 120 px label column and a 30 px header, with a 4 px margin.
        assert image.shape == (30 + 3 * 40 + 4, 120 + 3 * 40 + 4, 3)
    for (step, table), phase in zip(test["confusion_matrix_counts"], ("head", "finetune")):
        counts = np.array([[int(c) for c in re.findall(r"\| (\d+)(?= \|)", row)]
                           for row in table.splitlines()[2:]])
        assert counts.shape == (3, 3)
        assert counts.sum() == 8  # Every test example, once.
        assert np.trace(counts) / 8 == pytest.approx(metrics[phase]["test_accuracy"])
    wrong_steps = [step for step, _ in test.get("misclassified", [])]
    expected = [step for step, phase in ((1, "head"), (3, "finetune")) if metrics[phase]["test_accuracy"] < 1]
    assert wrong_steps == expected


def test_text_hparams_and_profile(run):
    config, _, logs = run
    root = _read(logs)
    (_, flags_text), = root["flags"]
    assert "| `--batch_size` | `4` |" in flags_text and "| `--profile_steps` | `2,3` |" in flags_text
    assert _steps(root["model_summary"]) == [0, 2]
    phase_two_summary = root["model_summary"][1][1]
    assert "Phase 2 fits" in phase_two_summary and "predictions (Dense)" in phase_two_summary

    acc = event_accumulator.EventAccumulator(logs)
    acc.Reload()
    content = acc.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
    hparams = hparams_metadata.parse_session_start_info_plugin_data(content).hparams
    assert hparams["batch_size"].number_value == 4
    assert hparams["backbone"].string_value == "tiny"
    assert hparams["head_batchnorm"].bool_value is True
    assert "model_dir" not in hparams
    content = acc.SummaryMetadata(hparams_metadata.EXPERIMENT_TAG).plugin_data.content
    experiment = hparams_metadata.parse_experiment_plugin_data(content)
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {m.name.group for m in experiment.metric_infos} == {""}  # In the session's own folder.
    assert {"phase_end/test_accuracy", "phase_end/validation_loss", "phase_end/train_throughput"} <= (
        metric_tags)
    for tag in metric_tags:
        assert _steps(root[tag]) == [1, 3], tag  # Written at the end of each phase.
    validation = dict(_read(os.path.join(logs, "validation"))["epoch_accuracy"])
    assert _values(root["phase_end/validation_accuracy"]) == pytest.approx([validation[1], validation[3]])

    traces = glob.glob(os.path.join(logs, "train", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_tensorboard_server_serves_the_scalars(run, tmp_path):
    """The real `tensorboard` on a free localhost port, read through its HTTP data API."""
    _, metrics, logs = run
    expected = _read(os.path.join(logs, "train"))["epoch_learning_rate"]
    log_file = tmp_path / "tensorboard.log"
    with open(log_file, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", f"--logdir={logs}", "--host=127.0.0.1", "--port=0",
             "--load_fast=false"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        url = None
        while url is None and time.time() < deadline and server.poll() is None:
            match = re.search(r"at (http://127\.0\.0\.1:\d+/)", log_file.read_text())
            url = match.group(1) if match else time.sleep(0.5)
        assert url, log_file.read_text()[-2000:]
        series = []
        while len(series) < len(expected) and time.time() < deadline:
            with urllib.request.urlopen(f"{url}data/plugin/scalars/scalars?run=train&tag=epoch_learning_rate",
                                        timeout=10) as response:
                series = json.load(response)  # [[wall_time, step, value], ...]
            time.sleep(0 if len(series) >= len(expected) else 0.5)
        assert [(step, pytest.approx(value)) for _, step, value in series] == expected
        with urllib.request.urlopen(f"{url}data/runs", timeout=10) as response:
            assert {"train", "validation", "test"} <= set(json.load(response))
        # The HParams table: this run's settings and its final test accuracy.
        query = {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN"], "startIndex": 0,
                 "sliceSize": 10, "colParams": [{"metric": {"group": "", "tag": "phase_end/test_accuracy"}}]}
        request = urllib.request.Request(f"{url}data/plugin/hparams/session_groups",
                                         json.dumps(query).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            group, = json.load(response)["sessionGroups"]
        assert group["hparams"]["backbone"] == "tiny" and group["hparams"]["batch_size"] == 4
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert values["phase_end/test_accuracy"] == pytest.approx(metrics["finetune"]["test_accuracy"])
    finally:
        server.terminate()
        server.wait(timeout=30)


def _fit_with_summaries(tmp_path, make_config, dataset, steps=8):
    """batch_input_wait over the last half of `steps` steps of a plain model (after its tracing)."""
    config = make_config(model_dir=str(tmp_path / "fit"), log_every_steps=steps // 2, steps_per_epoch=steps)
    board = summaries.RunSummaries(config, make_splits(), steps)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax", name="d")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0,
              callbacks=[board.phase_callback(1, model, 0, 1e-3)])
    board.close()
    return dict(_read(str(tmp_path / "fit" / "logs" / "train"))["batch_input_wait"])[steps]


def test_input_wait_shows_a_starving_pipeline(tmp_path, make_config):
    batch = (tf.zeros([4, 4]), tf.one_hot([0, 1, 2, 0], 3))
    ready = tf.data.Dataset.from_tensors(batch).repeat().prefetch(2)

    def slow(x, y):
        delayed = tf.numpy_function(lambda a: (time.sleep(0.1), a)[1], [x], tf.float32, stateful=True)
        return tf.ensure_shape(delayed, x.shape), y

    starving = tf.data.Dataset.from_tensors(batch).repeat().map(slow).prefetch(1)
    assert _fit_with_summaries(tmp_path / "slow", make_config, starving) > 0.8
    assert _fit_with_summaries(tmp_path / "fast", make_config, ready) < 0.5


@pytest.mark.parametrize("backbone", sorted(backbones.BACKBONES))
def test_inverse_preprocessing_restores_the_image(backbone):
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    preprocessed = models.get_preprocessing(backbone, 8)(images).numpy()
    np.testing.assert_array_equal(models.get_inverse_preprocessing(backbone)(preprocessed), images)


def test_confusion_matrix_and_its_image():
    matrix = report.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    image = summaries.confusion_matrix_image(np.diag([5, 0, 5]), CLASS_NAMES)
    cell = summaries.confusion_cell_size(3)
    corner = (summaries.CM_HEADER + 2, summaries.CM_LABEL_WIDTH + 2)  # Inside cell (0, 0).

    def pixel(i, j):
        return image[corner[0] + i * cell, corner[1] + j * cell].astype(int)

    assert pixel(0, 0).sum() < pixel(0, 1).sum()  # A full row share is darker than an empty one.
    np.testing.assert_array_equal(pixel(1, 1), [255, 255, 255])  # An empty row stays white.
    many = summaries.confusion_matrix_image(np.zeros((100, 100), int), [str(i) for i in range(100)])
    assert many.shape[0] == summaries.CM_HEADER + 100 * summaries.CM_MIN_CELL + summaries.PAD


def _parse(argv):
    with flagsaver.flagsaver():
        tl_flags.FLAGS.unparse_flags()
        tl_flags.FLAGS(["prog"] + argv)
        return tl_flags.get_config()


def test_tensorboard_flags(make_config, tmp_path):
    config = _parse(["--model_dir=/tmp/x", "--profile_steps=5,10", "--log_every_steps=0"])
    assert config.profile_steps == (5, 10) and config.log_every_steps == 0
    assert _parse(["--model_dir=/tmp/x"]).profile_steps == ()
    path = tmp_path / "flags.txt"
    config = make_config(profile_steps=(3, 4), log_every_steps=7)
    path.write_text(config.to_flagfile())
    assert _parse([f"--flagfile={path}"]) == config
    with pytest.raises(UserError, match="Received: profile_steps=a,b"):
        _parse(["--model_dir=/tmp/x", "--profile_steps=a,b"])
    for bad in ((0, 3), (5, 4), (3,), (1, 2, 3)):
        with pytest.raises(UserError, match=f"Received: profile_steps={','.join(map(str, bad))}"):
            make_config(profile_steps=bad)
    with pytest.raises(UserError, match="Received: log_every_steps=-1"):
        make_config(log_every_steps=-1)
