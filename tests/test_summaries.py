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

from tl_keras import config as config_lib
from tl_keras import flags as tl_flags
from tl_keras.data import pipeline
from tl_keras.errors import UserError
from tl_keras.model import backbones
from tl_keras.model import classifier
from tl_keras.model import registry
from tl_keras.reporting import evaluation
from tl_keras.reporting import images
from tl_keras.reporting import summaries
from tl_keras.training import schedule
from tl_keras.training import run as train

from helpers import CLASS_NAMES, make_splits

STEPS_PER_EPOCH = 3
LOG_EVERY = 2
EPOCH_TAGS = {"epoch_loss", "epoch_accuracy", "epoch_top5_accuracy"}
TRAIN_TAGS = EPOCH_TAGS | {
    "epoch_learning_rate", "epoch_throughput", "epoch_time", "epoch_input_wait", "epoch_stage",
    "batch_loss", "batch_accuracy", "batch_top5_accuracy", "batch_learning_rate", "batch_throughput",
    "batch_input_wait", "batch_stage", "augmented_inputs"}


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


def test_tags_and_steps_continue_across_stages(run):
    _, _, logs = run
    train_run, validation, test = (_read(os.path.join(logs, d)) for d in ("train", "validation", "test"))
    assert set(train_run) == TRAIN_TAGS
    assert set(validation) == EPOCH_TAGS | {"epoch_throughput", "epoch_time"}
    # Once, after the last stage: calibration's scalars and its reliability diagram.
    calibration = {tag for tag in test if tag.startswith("calibration/")} | {"reliability_diagram"}
    assert {"calibration/temperature", "calibration/ece_before", "calibration/ece_after"} <= calibration
    assert set(test) - calibration == EPOCH_TAGS | {"epoch_stage", "confusion_matrix",
                                                    "confusion_matrix_counts", "misclassified"}
    for tag in TRAIN_TAGS - {"augmented_inputs"}:
        expected = [0, 1, 2, 3] if tag.startswith("epoch_") else [2, 4, 6, 8, 10, 12]
        assert _steps(train_run[tag]) == expected, tag
    for tag in validation:
        assert _steps(validation[tag]) == [0, 1, 2, 3], tag
    for tag in ("epoch_accuracy", "confusion_matrix", "confusion_matrix_counts"):
        assert _steps(test[tag]) == [1, 3], tag  # The last epoch of each stage.
    assert _values(train_run["epoch_stage"]) == [0, 0, 1, 1]
    assert _values(train_run["batch_stage"]) == [0, 0, 0, 1, 1, 1]


def test_learning_rate_drops_while_fine_tuning_as_configured(run):
    config, _, logs = run
    scalars = _read(os.path.join(logs, "train"))
    expected = schedule.warmup_cosine(config.finetune_learning_rate,
                                      int(config.finetune_warmup_epochs * STEPS_PER_EPOCH),
                                      config.finetune_epochs * STEPS_PER_EPOCH)
    head_steps = config.head_epochs * STEPS_PER_EPOCH
    for step, value in scalars["batch_learning_rate"]:
        if step <= head_steps:
            assert value == pytest.approx(config.head_learning_rate)
        else:  # The schedule's value at the step taken: warmup from 0 to the peak, then cosine decay.
            assert value == pytest.approx(float(expected(step - head_steps - 1)), rel=1e-5)
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
    # batch_* are means over the steps since the previous point: per stage they add up to the epochs.
    for stage, batch_points, epochs in ((0, slice(0, 3), slice(0, 2)), (1, slice(3, 6), slice(2, 4))):
        for name in ("loss", "accuracy"):
            from_points = LOG_EVERY * sum(_values(train_run[f"batch_{name}"])[batch_points])
            from_epochs = STEPS_PER_EPOCH * sum(_values(train_run[f"epoch_{name}"])[epochs])
            assert from_points == pytest.approx(from_epochs, rel=1e-4), (stage, name)
    # The test run's last points are what metrics.json reports.
    assert _values(test["epoch_accuracy"]) == pytest.approx(
        [metrics["stages"]["head"]["test_accuracy"], metrics["stages"]["finetune"]["test_accuracy"]])


def test_images(run):
    _, metrics, logs = run
    (step, grid), = _read(os.path.join(logs, "train"))["augmented_inputs"]
    # 16 examples of 32 px shown at 96 px in a 4 x 4 grid, each with one caption line.
    tile = 32 * 3
    assert step == 0 and grid.shape == (4 * (tile + images.LINE_HEIGHT + 4) + 4, 4 * (tile + 4) + 4, 3)
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
        assert np.trace(counts) / 8 == pytest.approx(metrics["stages"][phase]["test_accuracy"])
    wrong_steps = [step for step, _ in test.get("misclassified", [])]
    stages = metrics["stages"]
    expected = [step for step, name in ((1, "head"), (3, "finetune")) if stages[name]["test_accuracy"] < 1]
    assert wrong_steps == expected


def test_text_hparams_and_profile(run):
    config, _, logs = run
    root = _read(logs)
    (_, flags_text), = root["flags"]
    assert "| `--batch_size` | `4` |" in flags_text and "| `--profile_steps` | `2,3` |" in flags_text
    assert _steps(root["model_summary"]) == [0, 2]
    finetune_summary = root["model_summary"][1][1]
    assert "Stage 1 (finetune) fits" in finetune_summary and "predictions (Dense)" in finetune_summary

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
    assert {"stage_end/test_accuracy", "stage_end/validation_loss", "stage_end/train_throughput"} <= (
        metric_tags)
    for tag in metric_tags:
        assert _steps(root[tag]) == [1, 3], tag  # Written at the end of each stage.
    validation = dict(_read(os.path.join(logs, "validation"))["epoch_accuracy"])
    assert _values(root["stage_end/validation_accuracy"]) == pytest.approx([validation[1], validation[3]])

    traces = glob.glob(os.path.join(logs, "train", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


@pytest.mark.slow
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
                 "sliceSize": 10, "colParams": [{"metric": {"group": "", "tag": "stage_end/test_accuracy"}}]}
        request = urllib.request.Request(f"{url}data/plugin/hparams/session_groups",
                                         json.dumps(query).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            group, = json.load(response)["sessionGroups"]
        assert group["hparams"]["backbone"] == "tiny" and group["hparams"]["batch_size"] == 4
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        final = metrics["stages"]["finetune"]["test_accuracy"]
        assert values["stage_end/test_accuracy"] == pytest.approx(final)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _plain_model(learning_rate=1e-3):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax", name="d")])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="categorical_crossentropy",
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    return model


def _fit_with_summaries(tmp_path, make_config, dataset, steps=8):
    """The train/ scalars of one fit() of `steps` steps of a plain model, a point every steps / 2."""
    config = make_config(model_dir=str(tmp_path / "fit"), log_every_steps=steps // 2, steps_per_epoch=steps)
    board = summaries.RunSummaries(config, make_splits(), steps)
    model = _plain_model()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0,
              callbacks=[board.stage_callback(0, "head", model, 0, 1e-3)])
    board.close()
    return _read(str(tmp_path / "fit" / "logs" / "train"))


def _input_wait(tmp_path, make_config, dataset, steps=8):
    """batch_input_wait over the last half of `steps` steps (after the step function's tracing)."""
    return dict(_fit_with_summaries(tmp_path, make_config, dataset, steps)["batch_input_wait"])[steps]


def test_input_wait_shows_a_starving_pipeline(tmp_path, make_config):
    batch = (tf.zeros([4, 4]), tf.one_hot([0, 1, 2, 0], 3))
    ready = tf.data.Dataset.from_tensors(batch).repeat().prefetch(2)

    def slow(x, y):
        delayed = tf.numpy_function(lambda a: (time.sleep(0.1), a)[1], [x], tf.float32, stateful=True)
        return tf.ensure_shape(delayed, x.shape), y

    starving = tf.data.Dataset.from_tensors(batch).repeat().map(slow).prefetch(1)
    assert _input_wait(tmp_path / "slow", make_config, starving) > 0.8
    assert _input_wait(tmp_path / "fast", make_config, ready) < 0.5


def test_another_keras_trains_untimed(tmp_path, make_config, monkeypatch, caplog):
    """The timed train_function is only installed on the Keras it was written for; elsewhere
    training runs as Keras wrote it and no input wait is claimed."""
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    batch = (tf.zeros([4, 4]), tf.one_hot([0, 1, 2, 0], 3))
    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    with caplog.at_level("WARNING", logger="absl"):
        scalars = _fit_with_summaries(tmp_path, make_config, dataset)
    assert "batch_loss" in scalars and "epoch_throughput" in scalars
    assert not {"batch_input_wait", "epoch_input_wait"} & set(scalars)
    assert sum("input-wait timing was written for Keras 3.15" in r.getMessage() for r in caplog.records) == 1


def test_a_resumed_partial_epoch_carries_its_last_steps_into_the_next_point(tmp_path, make_config):
    """A resumed stage fits the rest of a partial epoch, then the remaining epochs, each fit() with
    its own callback; the steps after the partial epoch's last point still count towards the next."""
    steps, log_every = 4, 3
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(4, 4)).astype(np.float32),  # batches[k] is global step k + 1.
                np.eye(3, dtype=np.float32)[rng.integers(0, 3, 4)]) for _ in range(2 * steps)]
    model = _plain_model(learning_rate=0.0)  # Fixed weights: each step's loss depends only on its batch.
    config = make_config(model_dir=str(tmp_path / "run"), log_every_steps=log_every, steps_per_epoch=steps)
    board = summaries.RunSummaries(config, make_splits(), steps)

    def data(first, last):
        return tf.data.Dataset.from_generator(lambda: iter(batches[first - 1:last]), output_signature=(
            tf.TensorSpec((4, 4), tf.float32), tf.TensorSpec((4, 3), tf.float32)))

    # Resumed after step 1 of epoch 0: steps 2-4, then epoch 1 (steps 5-8).
    model.fit(data(2, 4), initial_epoch=0, epochs=1, steps_per_epoch=steps - 1, verbose=0,
              callbacks=[board.stage_callback(0, "head", model, 0, 0.0, step_offset=1)])
    model.fit(data(5, 8), initial_epoch=1, epochs=2, steps_per_epoch=steps, verbose=0,
              callbacks=[board.stage_callback(0, "head", model, 0, 0.0)])
    board.close()
    scalars = _read(str(tmp_path / "run" / "logs" / "train"))
    losses = [float(keras.losses.categorical_crossentropy(y, model(x)).numpy().mean()) for x, y in batches]
    assert _steps(scalars["batch_loss"]) == [3, 6]
    # Step 3: steps 2-3 of the first fit(). Step 6: step 4, carried over, and steps 5-6.
    expected = [np.mean(losses[1:3]), np.mean(losses[3:6])]
    assert _values(scalars["batch_loss"]) == pytest.approx(expected, rel=1e-5)
    assert _steps(scalars["epoch_loss"]) == [0, 1]
    assert _steps(_read(str(tmp_path / "run" / "logs"))["model_summary"]) == [0]  # Once per stage.


def test_tensorboard_and_eval_show_the_same_mistakes(tmp_path, make_config):
    """One definition of the worst mistakes and one renderer: TensorBoard's misclassified image is
    eval/misclassified.png, pixel for pixel, and report.json lists the same examples."""
    splits = make_splits(num_test=12)
    keras.utils.set_random_seed(0)
    model = classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,))  # Untrained: mistakes.
    preprocess = backbones.get_preprocessing("tiny", 32)
    batches = pipeline.build_eval_dataset(splits.test, preprocess, 4, 3, cache=False)
    result = evaluation.evaluate(model, batches)
    assert len(result.mistakes) > 1
    config = make_config(model_dir=str(tmp_path / "run"))
    board = summaries.RunSummaries(config, splits, 1)
    shown = board.write_stage_end(0, "head", 0, result, evaluation.prefixed(result.metrics, "test"))
    board.close()
    report = evaluation.write_report(result, splits.test, CLASS_NAMES, str(tmp_path / "eval"), "test")
    np.testing.assert_array_equal(shown, [w["index"] for w in report["worst_misclassified"]])
    np.testing.assert_array_equal(shown, result.mistakes[:summaries.GRID_EXAMPLES])
    test = _read(str(tmp_path / "run" / "logs" / "test"))
    (_, board_image), = test["misclassified"]
    with open(tmp_path / "eval" / evaluation.MISCLASSIFIED_PNG, "rb") as f:
        np.testing.assert_array_equal(board_image, np.asarray(Image.open(f)))
    assert dict(test["epoch_accuracy"])[0] == pytest.approx(result.metrics["accuracy"])


def _events(log_dir):
    """[(tag, step)] of every summary in the event files under `log_dir`, in file order."""
    out = []
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = tf.compat.v1.Event.FromString(record)
            out += [(value.tag, event.step) for value in event.summary.value]
    return out


def test_trim_logs_drops_what_a_resumed_run_writes_again(tmp_path):
    log_dir = str(tmp_path / "logs")
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
    with writer.as_default():
        tf.summary.text("flags", "the run's flags", step=0)
        for step in range(1, 7):
            tf.summary.scalar("batch_loss", 1.0 / step, step=step)
        for epoch in range(3):
            tf.summary.scalar("epoch_loss", 1.0 / (epoch + 1), step=epoch)
    writer.close()
    untouched = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))
    with untouched.as_default():
        tf.summary.scalar("epoch_loss", 0.5, step=0)
    untouched.close()
    (validation_file,) = glob.glob(os.path.join(log_dir, "validation", "events.out.tfevents.*"))
    before = os.stat(validation_file).st_mtime_ns

    summaries.trim_logs(log_dir, epoch=1, global_step=3)  # Resuming epoch 1 after global step 3.
    kept = _events(os.path.join(log_dir, "train"))
    assert [step for tag, step in kept if tag == "batch_loss"] == [1, 2, 3]
    assert [step for tag, step in kept if tag == "epoch_loss"] == [0]
    assert ("flags", 0) in kept  # Written at run start, never again.
    assert os.stat(validation_file).st_mtime_ns == before  # Nothing to drop: not rewritten.
    assert not glob.glob(os.path.join(log_dir, "**", "*.tmp"), recursive=True)
    scalars = _read(os.path.join(log_dir, "train"))  # Still a valid event file for TensorBoard.
    assert _values(scalars["batch_loss"]) == pytest.approx([1.0, 0.5, 1 / 3])


def test_trim_logs_keeps_what_a_truncated_event_file_holds(tmp_path):
    """A kill or a full disk during a flush leaves a torn last record; TensorBoard reads past it, and
    a resume must too, instead of failing with DataLossError at every attempt."""
    log_dir = str(tmp_path / "logs")
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
    with writer.as_default():
        for epoch in range(4):
            tf.summary.scalar("epoch_loss", 1.0 / (epoch + 1), step=epoch)
    writer.close()
    (path,) = glob.glob(os.path.join(log_dir, "train", "events.out.tfevents.*"))
    with open(path, "rb+") as f:
        f.truncate(os.path.getsize(path) - 7)  # The last record loses its tail.
    summaries.trim_logs(log_dir, epoch=2, global_step=6)
    assert [step for tag, step in _events(os.path.join(log_dir, "train")) if tag == "epoch_loss"] == [0, 1]
    summaries.trim_logs(log_dir, epoch=2, global_step=6)  # Idempotent, and now a clean file.


@pytest.mark.parametrize("backbone", sorted(registry.BACKBONES))
def test_inverse_preprocessing_restores_the_image(backbone):
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    preprocessed = backbones.get_preprocessing(backbone, 8)(images).numpy()
    np.testing.assert_array_equal(backbones.get_inverse_preprocessing(backbone)(preprocessed), images)


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
