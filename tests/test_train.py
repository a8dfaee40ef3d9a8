"""The stages on a tiny backbone: what trains when, strategies, outputs and the export."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorboard.backend.event_processing import event_accumulator

from tl_keras.errors import UserError
from tl_keras.model import backbones
from tl_keras.model import classifier
from tl_keras.training import stages
from tl_keras.training import run as train

from helpers import make_examples, make_image_folder, make_splits


def _weights(layer):
    return [w.numpy().copy() for w in layer.weights]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


class StageRecorder:
    """Wraps stages.train_stage to snapshot weights and trainable counts before and after each stage."""

    def __init__(self, monkeypatch):
        self.snapshots = {}
        real = stages.train_stage

        def wrapped(model, stage_data, stage, *args, **kwargs):
            self.snapshots[f"before_{stage.name}"] = self._snap(model)
            result = real(model, stage_data, stage, *args, **kwargs)
            self.snapshots[f"after_{stage.name}"] = self._snap(model)
            return result

        monkeypatch.setattr(stages, "train_stage", wrapped)

    @staticmethod
    def _snap(model):
        backbone = model.get_layer("backbone")
        return {
            "trainable": len(model.trainable_weights),
            "layers": {layer.name: _weights(layer) for layer in backbone.layers if layer.weights},
            "head": _weights(model.get_layer("predictions")),
        }


def test_train_and_export_on_tfds_mock_data(make_config):
    """The whole train mode in process, the way flax's train_test.py runs one short
    train_and_evaluate: TFDS's own loader on mock CIFAR-10, both stages, evaluation and the export."""
    config = make_config(dataset="cifar10", validation_split=0.25)
    with tfds.testing.mock_data(num_examples=16):
        metrics = train.run(config)
    for name in ("head", "finetune"):
        assert 0.0 <= metrics["stages"][name]["test_accuracy"] <= 1.0
        assert np.isfinite(metrics["stages"][name]["test_loss"])
    served = tf.saved_model.load(metrics["export_path"]).signatures["serving_default"](
        images=tf.zeros([2, 40, 24, 3], tf.uint8))
    assert served["probabilities"].shape == (2, 10)
    with open(os.path.join(config.model_dir, "labels.txt")) as f:
        labels = f.read().split()
    assert len(labels) == 10 and served["class_names"].numpy()[0].decode() in labels


@pytest.mark.parametrize("cache_features", ["false", "true"])
def test_stages_train_the_right_weights(make_config, tiny_splits, monkeypatch, cache_features):
    recorder = StageRecorder(monkeypatch)
    config = make_config(cache_features=cache_features, finetune_learning_rate=1e-2,
                         finetune_warmup_epochs=0, steps_per_epoch=2)
    train.run(config, splits=tiny_splits)
    before, after_head, after_tune = (recorder.snapshots[k] for k in
                                      ("before_head", "after_head", "after_finetune"))
    # The head stage: the head moved, the backbone is bit-identical.
    assert not _same(before["head"], after_head["head"])
    for name, weights in before["layers"].items():
        assert _same(weights, after_head["layers"][name]), name
    # Fine-tuning: more trainable weights; below fine_tune_at unchanged, from it upward changed.
    assert after_tune["trainable"] > after_head["trainable"]
    assert _same(after_head["layers"]["block1_conv1"], after_tune["layers"]["block1_conv1"])
    assert not _same(after_head["layers"]["block2_conv1"], after_tune["layers"]["block2_conv1"])
    assert not _same(after_head["layers"]["block3_conv1"], after_tune["layers"]["block3_conv1"])


def test_outputs_in_model_dir(make_config, tiny_splits):
    config = make_config()
    metrics = train.run(config, splits=tiny_splits)
    files = set(os.listdir(config.model_dir))
    assert {"logs", "flags.txt", "metrics.json", "labels.txt", "export", "checkpoints"} <= files
    written = json.load(open(os.path.join(config.model_dir, "metrics.json")))
    assert {name: stage["index"] for name, stage in written["stages"].items()} == {"head": 0, "finetune": 1}
    for stage in written["stages"].values():
        assert set(stage) >= {"test_accuracy", "test_top5_accuracy", "wall_seconds", "steps"}
        assert 0.0 <= stage["test_accuracy"] <= 1.0
        assert stage["wall_seconds"] > 0
    assert written["export_path"] == metrics["export_path"] == os.path.join(config.model_dir, "export", "1")
    labels = open(os.path.join(config.model_dir, "labels.txt")).read().split()
    assert labels == tiny_splits.class_names


def _scalars(log_dir):
    acc = event_accumulator.EventAccumulator(log_dir, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return {tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"] if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"}


def test_tensorboard_has_continuous_curves_and_learning_rate(make_config, tiny_splits):
    config = make_config(head_epochs=2, finetune_epochs=2, finetune_learning_rate=1e-3)
    train.run(config, splits=tiny_splits)
    logs = os.path.join(config.model_dir, "logs")
    train_scalars = _scalars(os.path.join(logs, "train"))
    validation_scalars = _scalars(os.path.join(logs, "validation"))
    for tag in ("epoch_loss", "epoch_accuracy", "epoch_learning_rate"):
        assert [step for step, _ in train_scalars[tag]] == [0, 1, 2, 3], tag
    for tag in ("epoch_loss", "epoch_accuracy"):
        assert [step for step, _ in validation_scalars[tag]] == [0, 1, 2, 3], tag
    learning_rates = [value for _, value in train_scalars["epoch_learning_rate"]]
    assert learning_rates[0] == pytest.approx(config.head_learning_rate)
    assert max(learning_rates[2:]) <= config.finetune_learning_rate + 1e-9


def test_both_stages_under_mirrored_strategy(make_config, mirrored_strategy):
    splits = make_splits(num_train=16, validation_split=0.25)
    config = make_config(steps_per_epoch=2)
    metrics = train.run(config, strategy=mirrored_strategy, splits=splits)
    assert mirrored_strategy.num_replicas_in_sync == 2
    assert set(metrics["stages"]) == {"head", "finetune"} and metrics["export_path"]


def test_batch_must_divide_across_replicas(make_config, tiny_splits, mirrored_strategy):
    with pytest.raises(UserError, match="Received: batch_size=5"):
        train.run(make_config(batch_size=5), strategy=mirrored_strategy, splits=tiny_splits)


def test_export_matches_keras_model(make_config, tiny_splits):
    config = make_config(calibrate="false")  # A fitted temperature would change the probabilities.
    export_path = train.run(config, splits=tiny_splits)["export_path"]
    model = classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,))
    model.load_weights(os.path.join(config.model_dir, "checkpoints", "latest.weights.h5"))
    images, _ = make_examples(5, seed=9, size=40)  # Another size: the signature resizes.
    expected = model.predict(backbones.get_preprocessing("tiny", 32)(images), verbose=0)
    served = tf.saved_model.load(export_path).signatures["serving_default"](images=tf.constant(images))
    assert np.max(np.abs(served["probabilities"].numpy() - expected)) <= 1e-5
    np.testing.assert_array_equal(served["classes"].numpy(), expected.argmax(1))
    names = [name.decode() for name in served["class_names"].numpy()]
    assert names == [tiny_splits.class_names[i] for i in expected.argmax(1)]


def test_evaluate_and_export_modes_reuse_the_run(make_config, tiny_splits):
    train.run(make_config(), splits=tiny_splits)
    evaluated = train.run(make_config(mode="evaluate"), splits=tiny_splits)
    assert 0.0 <= evaluated["test"]["test_accuracy"] <= 1.0
    exported = train.run(make_config(mode="export"), splits=tiny_splits)
    assert exported["export_path"].endswith(os.path.join("export", "2"))


def test_evaluate_without_training_is_a_user_error(make_config, tiny_splits):
    with pytest.raises(UserError, match="train first"):
        train.run(make_config(mode="evaluate"), splits=tiny_splits)


def test_cached_head_matches_uncached_training(make_config):
    """Same seed, same data, no augmentation: cached features give the same head accuracy."""
    splits = make_splits(num_train=64, num_test=32, validation_split=0.25, seed=5)
    results = {}
    for cache in ("false", "true"):
        config = make_config(model_dir=make_config().model_dir + cache, cache_features=cache,
                             head_epochs=3, finetune_epochs=0, steps_per_epoch=None, batch_size=8,
                             head_learning_rate=1e-2)
        results[cache] = train.run(config, splits=splits)["stages"]["head"]["test_accuracy"]
    assert abs(results["true"] - results["false"]) <= 0.01 + 1e-9


def test_model_dir_that_cannot_be_created_is_a_user_error(make_config, tiny_splits, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    with pytest.raises(UserError, match="model_dir"):
        train.run(make_config(model_dir=str(blocker / "run")), splits=tiny_splits)
    assert blocker.read_text() == "keep me"


def test_a_diverging_run_stops_at_the_first_non_finite_loss(make_config, tiny_splits):
    """A learning rate of 3e38 sends the weights to infinity; the run must stop there, say where, keep
    the last good checkpoint and export nothing, instead of exporting a model that outputs NaN."""
    config = make_config(finetune_learning_rate=3e38, finetune_warmup_epochs=0, steps_per_epoch=3,
                         finetune_epochs=2)
    with pytest.raises(UserError, match=r"stage 1 \(finetune\) diverged at step \d+ of epoch 2 \(global step "
                                        r"\d+\): the loss is (nan|inf) at learning rate [0-9.e+]+\. .*"
                                        r"Received: finetune_learning_rate=3e\+38$"):
        train.run(config, splits=tiny_splits)
    assert not os.path.exists(os.path.join(config.model_dir, "export"))
    with open(os.path.join(config.model_dir, "metrics.json")) as f:
        metrics = json.load(f, parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}"))
    assert list(metrics["stages"]) == ["head"]
    with open(os.path.join(config.model_dir, "checkpoints", "state.json")) as f:
        state = json.load(f)
    assert (state["stage"], state["stage_name"], state["epoch"], state["step"]) == (1, "finetune", 1, 0)


def test_a_bad_fine_tune_at_is_refused_before_any_training(make_config, tiny_splits, monkeypatch):
    """Found before the head stage runs, not after it (which on CIFAR-10 is half an hour in)."""
    monkeypatch.setattr(stages, "train_stage", lambda *a, **k: pytest.fail("a stage ran"))
    with pytest.raises(UserError, match=r"block1_conv1, block2_conv1, block3_conv1\). "
                       r"Received: fine_tune_at=block9_conv9"):
        train.run(make_config(fine_tune_at="block9_conv9"), splits=tiny_splits)


def _folder_run(make_config, root, **overrides):
    settings = dict(dataset=f"folder:{root}", validation_split=0.25, test_split_fraction=0.25,
                    finetune_epochs=0)
    settings.update(overrides)
    return make_config(**settings)


def test_evaluate_and_export_use_the_classes_the_run_trained_on(make_config, tmp_path):
    """A renamed class folder must not relabel the export; a changed class count is one line."""
    root = tmp_path / "photos"
    make_image_folder(root, {"cat": 6, "dog": 6}, bad=False)
    config = _folder_run(make_config, root)
    train.run(config)
    labels = os.path.join(config.model_dir, "labels.txt")
    with open(labels) as f:
        trained = f.read()
    os.rename(root / "dog", root / "wolf")
    for mode in ("export", "evaluate"):
        with pytest.raises(UserError, match=r"classes differ from the run's \(cat, dog -> cat, wolf\)"):
            train.run(_folder_run(make_config, root, mode=mode))
    make_image_folder(root, {"cat": 6, "dog": 6, "owl": 6}, bad=False)
    with pytest.raises(UserError, match=r"classes differ from the run's \(cat, dog -> cat, dog, owl, wolf\)"):
        train.run(_folder_run(make_config, root, mode="export"))
    with open(labels) as f:
        assert f.read() == trained


def test_resume_refuses_a_folder_whose_images_changed(make_config, tmp_path, monkeypatch):
    root = tmp_path / "photos"
    make_image_folder(root, {"cat": 6, "dog": 6}, bad=False)
    config = _folder_run(make_config, root, finetune_epochs=1, head_epochs=1)
    real = stages.train_stage

    def crash_when_fine_tuning(model, data, stage, *args, **kwargs):
        if stage.fine_tunes:
            raise RuntimeError("crash")
        return real(model, data, stage, *args, **kwargs)

    with monkeypatch.context() as patch:  # The run stops in its second stage...
        patch.setattr(stages, "train_stage", crash_when_fine_tuning)
        with pytest.raises(RuntimeError, match="crash"):
            train.run(config)
    make_image_folder(root, {"cat": 7, "dog": 6}, bad=False, seed=3)  # ...and a photo is added.
    with pytest.raises(UserError, match=r"images of --dataset changed since the run began.*--overwrite"):
        train.run(config)
    assert train.run(dataclasses.replace(config, overwrite=True))["export_path"]


def test_seed_zero_trains(make_config):
    """TensorFlow's seed check compares (global, op) seeds with (0, 0) in Python, which fails in graph
    mode for the pipeline's tensor seeds when the global seed is 0."""
    metrics = train.run(make_config(seed=0, finetune_epochs=0), splits=make_splits(num_train=16))
    assert 0.0 <= metrics["stages"]["head"]["test_accuracy"] <= 1.0
