"""The run as a list of stages: gradual unfreezing, the shared schedule, early stopping, the range test,
and model_dirs of the two-phase version."""

import dataclasses
import json
import logging
import os

from absl.testing import flagsaver
import numpy as np
import pytest

from tl_keras import flags as tl_flags
from tl_keras.errors import UserError
from tl_keras.model import classifier
from tl_keras.training import checkpointing
from tl_keras.training import guards
from tl_keras.training import run as train
from tl_keras.training import schedule
from tl_keras.training import stages

from helpers import config_from_flagfile, make_splits

GRADUAL = "block3_conv1=1,block2_conv1=2,all=1"


def _snapshot(model):
    backbone = model.get_layer("backbone")
    return {layer.name: [w.numpy().copy() for w in layer.weights]
            for layer in backbone.layers if layer.weights}


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_the_two_phase_flags_are_two_stages(make_config):
    config = make_config(head_epochs=2, finetune_epochs=3, fine_tune_at="block2_conv1")
    assert [(s.index, s.name, s.trains_from, s.epochs) for s in schedule.build_stages(config)] == [
        (0, "head", None, 2), (1, "finetune", "block2_conv1", 3)]
    assert [s.name for s in schedule.build_stages(make_config(head_epochs=0))] == ["finetune"]
    assert [s.name for s in schedule.build_stages(make_config(finetune_epochs=0))] == ["head"]


def test_an_unfreeze_schedule_is_one_stage_per_item(make_config):
    config = make_config(unfreeze_schedule=GRADUAL)
    assert [(s.index, s.name, s.trains_from, s.epochs) for s in schedule.build_stages(config)] == [
        (0, "head", None, 1), (1, "unfreeze_block3_conv1", "block3_conv1", 1),
        (2, "unfreeze_block2_conv1", "block2_conv1", 2), (3, "unfreeze_all", "all", 1)]
    # It replaces --fine_tune_at and --finetune_epochs, and flags.txt repeats what it implies.
    assert (config.fine_tune_at, config.finetune_epochs) == ("block3_conv1", 4)


@pytest.mark.parametrize("value, reason", [
    ("block5_conv1", "is not LAYER=EPOCHS"), ("block5_conv1=0", "needs at least 1"),
    ("block5_conv1=x", "not a whole number"), ("a=1,a=2", "appears twice"), ("=1", "is not LAYER=EPOCHS")])
def test_a_bad_unfreeze_schedule_is_one_line(make_config, value, reason):
    with pytest.raises(UserError, match=f"{reason}.*Received: unfreeze_schedule={value}$"):
        make_config(unfreeze_schedule=value)


def test_an_unfreeze_schedule_with_other_fine_tuning_flags_is_refused(make_config):
    with pytest.raises(UserError, match=r"replaces --fine_tune_at and --finetune_epochs; give one or the "
                                        r"other\. Received: finetune_epochs=7$"):
        make_config(unfreeze_schedule=GRADUAL, finetune_epochs=7)
    with flagsaver.flagsaver():  # On the command line, even a value equal to the default counts.
        tl_flags.FLAGS.unparse_flags()
        tl_flags.parse(["prog", "--model_dir=x", f"--unfreeze_schedule={GRADUAL}",
                        "--fine_tune_at=block4_conv1"])
        with pytest.raises(UserError, match=r"Received: fine_tune_at=block4_conv1$"):
            tl_flags.get_config()


def test_an_unfreeze_schedule_replaces_a_flagfiles_fine_tuning(tmp_path):
    """configs/*.flags set --fine_tune_at and --finetune_epochs; a schedule added after them wins."""
    flagfile = tmp_path / "recipe.flags"
    flagfile.write_text("--fine_tune_at=all\n--finetune_epochs=9\n")
    with flagsaver.flagsaver():
        tl_flags.FLAGS.unparse_flags()
        tl_flags.parse(["prog", "--model_dir=x", f"--flagfile={flagfile}", f"--unfreeze_schedule={GRADUAL}"])
        config = tl_flags.get_config()
    assert (config.fine_tune_at, config.finetune_epochs) == ("block3_conv1", 4)


def test_flags_txt_of_a_gradual_run_round_trips(make_config, tmp_path):
    config = make_config(unfreeze_schedule=GRADUAL, layerwise_lr_decay=0.7, head_learning_rate="auto",
                         early_stopping_patience=2, stage_lr_schedule="per_stage")
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text(config.to_flagfile())
    assert config_from_flagfile(flagfile) == config


@pytest.mark.parametrize("value, shown", [("0", "0.0"), ("-1e-3", "-0.001"), ("fast", "fast")])
def test_a_learning_rate_is_positive_or_auto(value, shown):
    with flagsaver.flagsaver():
        tl_flags.FLAGS.unparse_flags()
        tl_flags.FLAGS(["prog", "--model_dir=x", f"--head_learning_rate={value}"])
        with pytest.raises(UserError, match=f"must be (positive, or auto|a number or auto). "
                                            f"Received: head_learning_rate={shown}$"):
            tl_flags.get_config()


def test_the_shared_schedule_spans_every_fine_tuning_stage(make_config):
    config = make_config(unfreeze_schedule=GRADUAL, finetune_warmup_epochs=1, finetune_learning_rate=1e-3)
    all_stages = schedule.build_stages(config)
    steps = {s.name: 10 * s.epochs for s in all_stages}
    rates = [schedule.learning_rate(s, all_stages, steps, config, 10, 1e-3) for s in all_stages]
    assert rates[0] == 1e-3  # The head: constant.
    curve = [float(rate(step)) for rate, s in zip(rates[1:], all_stages[1:]) for step in range(steps[s.name])]
    whole = schedule.warmup_cosine(1e-3, 10, 40)
    np.testing.assert_allclose(curve, [float(whole(step)) for step in range(40)], rtol=1e-6)
    assert max(curve) == pytest.approx(1e-3, rel=1e-3) and curve.index(max(curve)) == 10  # One warmup.
    assert curve[-1] < 1e-5  # Ends near zero at the last stage's last step.


def test_per_stage_schedules_each_warm_up_and_decay(make_config):
    config = make_config(unfreeze_schedule=GRADUAL, finetune_warmup_epochs=0.5, stage_lr_schedule="per_stage")
    all_stages = schedule.build_stages(config)
    steps = {s.name: 10 * s.epochs for s in all_stages}
    for stage in all_stages[1:]:
        rate = schedule.learning_rate(stage, all_stages, steps, config, 10, 1e-3)
        values = [float(rate(step)) for step in range(steps[stage.name])]
        assert values[0] == 0.0 and max(values) == pytest.approx(1e-3, rel=1e-3), stage.name
        assert values[-1] < 0.2e-3, stage.name


@pytest.fixture
def gradual_run(make_config, monkeypatch):
    """A four-stage run on the tiny backbone, with weights snapshotted around each stage."""
    snapshots = {}
    real = stages.train_stage

    def recorded(model, stage_data, stage, *args, **kwargs):
        snapshots[f"before_{stage.name}"] = _snapshot(model)
        result = real(model, stage_data, stage, *args, **kwargs)
        snapshots[f"after_{stage.name}"] = _snapshot(model)
        return result

    monkeypatch.setattr(stages, "train_stage", recorded)
    config = make_config(unfreeze_schedule=GRADUAL, finetune_learning_rate=1e-2, finetune_warmup_epochs=0,
                         steps_per_epoch=2)
    metrics = train.run(config, splits=make_splits(num_train=16, validation_split=0.25))
    return config, metrics, snapshots


def test_gradual_unfreezing_trains_more_of_the_backbone_each_stage(gradual_run):
    config, metrics, snapshots = gradual_run
    moved = {name: [layer for layer, weights in snapshots[f"before_{name}"].items()
                    if not _same(weights, snapshots[f"after_{name}"][layer])]
             for name in ("head", "unfreeze_block3_conv1", "unfreeze_block2_conv1", "unfreeze_all")}
    assert moved["head"] == []
    assert moved["unfreeze_block3_conv1"] == ["block3_conv1"]
    assert moved["unfreeze_block2_conv1"] == ["block2_conv1", "block3_conv1"]
    assert moved["unfreeze_all"] == ["block1_conv1", "block2_conv1", "block3_conv1"]
    assert {name: stage["index"] for name, stage in metrics["stages"].items()} == {
        "head": 0, "unfreeze_block3_conv1": 1, "unfreeze_block2_conv1": 2, "unfreeze_all": 3}
    assert [metrics["stages"][name]["steps"] for name in ("head", "unfreeze_block2_conv1")] == [2, 4]
    state = checkpointing.load_state(config.model_dir)
    assert (state.status, state.stage, state.epoch) == ("done", 4, 5)


def test_a_stage_that_names_no_layer_is_refused_before_training(make_config, monkeypatch):
    monkeypatch.setattr(stages, "train_stage", lambda *a, **k: pytest.fail("a stage ran"))
    with pytest.raises(UserError, match=r"Received: fine_tune_at=block9_conv1$"):
        train.run(make_config(unfreeze_schedule="block3_conv1=1,block9_conv1=1"),
                  splits=make_splits(num_train=16, validation_split=0.25))


def test_early_stopping_counts_across_fit_calls_and_processes():
    """The best value and the counter live in the run's state: a new callback (the next fit(), or a
    resumed process) goes on counting where the last one stopped."""
    state, saved = checkpointing.RunState(), []

    class Model:
        stop_training = False

    def callback():
        stopper = guards.StopWhenNotImproving(state, patience=2, save_best=lambda: saved.append(True))
        stopper.set_model(Model())
        return stopper

    callback().on_epoch_end(0, {"val_accuracy": 0.5})
    callback().on_epoch_end(1, {"val_accuracy": 0.6})
    resumed = callback()
    resumed.on_epoch_end(2, {"val_accuracy": 0.6})  # Not better: equal.
    assert (state.stage_best_value, state.stage_wait, state.stage_stopped) == (0.6, 1, False)
    resumed = callback()
    resumed.on_epoch_end(3, {"val_accuracy": 0.55})
    assert state.stage_stopped and resumed.model.stop_training and len(saved) == 2
    restored = checkpointing.RunState(**json.loads(json.dumps(dataclasses.asdict(state))))
    assert (restored.stage_best_value, restored.stage_wait, restored.stage_stopped) == (0.6, 2, True)


def test_early_stopping_ends_the_stage_with_its_best_weights(make_config, monkeypatch):
    """Scripted validation accuracies 0.5, 0.9, 0.4 with patience 1: the five-epoch head stage stops
    after its third epoch, and the next stage starts from the second epoch's weights."""
    scripted, weights = iter([0.5, 0.9, 0.4]), []
    real = guards.StopWhenNotImproving.on_epoch_end

    def scripted_epoch_end(self, epoch, logs=None):
        weights.append([w.copy() for w in self.model.get_weights()])
        real(self, epoch, dict(logs or {}, val_accuracy=next(scripted)))

    monkeypatch.setattr(guards.StopWhenNotImproving, "on_epoch_end", scripted_epoch_end)
    config = make_config(head_epochs=5, finetune_epochs=0, early_stopping_patience=1, steps_per_epoch=2,
                         head_learning_rate=1e-2)
    metrics = train.run(config, splits=make_splits(num_train=16, validation_split=0.25))
    head = metrics["stages"]["head"]
    assert head["stopped_early"] and head["steps"] == 6
    state = checkpointing.load_state(config.model_dir)
    assert state.epoch == 5 and state.status == "done"  # The skipped epochs keep their place.
    model = classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,))
    model.load_weights(os.path.join(config.model_dir, "checkpoints", "latest.weights.h5"))
    for saved, best in zip(model.get_weights(), weights[1]):
        np.testing.assert_array_equal(saved, best)
    assert not _same(model.get_weights(), weights[2])


def test_early_stopping_needs_a_validation_split(make_config):
    with pytest.raises(UserError, match=r"no validation split\. Received: validation_split=0\.0$"):
        train.run(make_config(early_stopping_patience=2, validation_split=0.0),
                  splits=make_splits(num_train=16, validation_split=0.0))


def _two_phase_state(model_dir, phase):
    """Rewrite state.json and metrics.json the way the two-phase version wrote them."""
    path = os.path.join(model_dir, "checkpoints", "state.json")
    with open(path) as f:
        state = json.load(f)
    for key in ("stage", "stage_name", "status", "stage_best_value", "stage_wait", "stage_stopped",
                "learning_rates"):
        state.pop(key)
    state["phase"] = phase
    with open(path, "w") as f:
        json.dump(state, f)
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    metrics.update(metrics.pop("stages"))
    with open(os.path.join(model_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f)


def _crash_when_fine_tuning(monkeypatch, config, splits):
    """Run the head stage, then crash as the fine-tuning stage starts."""
    real = stages.train_stage

    def crash(model, data, stage, *args, **kwargs):
        if stage.fine_tunes:
            raise RuntimeError("crash")
        return real(model, data, stage, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(stages, "train_stage", crash)
        with pytest.raises(RuntimeError, match="crash"):
            train.run(config, splits=splits)


def test_a_model_dir_of_the_two_phase_version_resumes(make_config, monkeypatch):
    splits = make_splits(num_train=16, validation_split=0.25)
    config = make_config(steps_per_epoch=2, deterministic=True)
    whole = train.run(dataclasses.replace(config, model_dir=config.model_dir + "_whole"), splits=splits)
    _crash_when_fine_tuning(monkeypatch, config, splits)
    _two_phase_state(config.model_dir, "finetune")
    metrics = train.run(config, splits=splits)
    assert set(metrics["stages"]) == {"head", "finetune"}
    for name in ("head", "finetune"):
        assert metrics["stages"][name]["test_accuracy"] == pytest.approx(
            whole["stages"][name]["test_accuracy"], abs=1e-6)
    assert checkpointing.load_state(config.model_dir).status == "done"


def test_a_two_phase_model_dir_with_other_stages_is_refused_in_one_line(make_config, monkeypatch):
    splits = make_splits(num_train=16, validation_split=0.25)
    config = make_config(steps_per_epoch=2)
    _crash_when_fine_tuning(monkeypatch, config, splits)
    _two_phase_state(config.model_dir, "finetune")
    state_file = os.path.join(config.model_dir, "checkpoints", "state.json")
    with open(state_file) as f:
        state = json.load(f)
    state["phase"] = "phase3"  # No stage of this run is called that.
    with open(state_file, "w") as f:
        json.dump(state, f)
    with pytest.raises(UserError, match=r"saved in phase phase3 of the two-phase version.*"
                                        r"Received: phase=phase3$"):
        train.run(config, splits=splits)


def test_lr_find_mode_writes_its_plot_and_nothing_else(make_config, caplog):
    config = make_config(mode="lr_find", lr_find_steps=30, head_learning_rate=1e-3)
    with caplog.at_level(logging.INFO, logger="absl"):
        result = train.run(config, splits=make_splits(num_train=64, validation_split=0.25))
    finding = result["lr_find"]
    assert finding["stage"] == "head" and finding["min_lr"] <= finding["suggestion"] <= finding["max_lr"]
    assert set(os.listdir(config.model_dir)) - {".lock"} == {"lr_find"}  # No checkpoints, no metrics.
    assert sorted(os.listdir(os.path.join(config.model_dir, "lr_find"))) == ["head.json", "head.png"]
    assert any("suggested learning rate" in r.getMessage() for r in caplog.records)


def test_lr_find_names_the_stages_it_knows(make_config):
    with pytest.raises(UserError, match=r"one of this run's stages \(head, unfreeze_block3_conv1, "
                                        r"unfreeze_block2_conv1, unfreeze_all\)\. "
                                        r"Received: lr_find_stage=fc$"):
        train.run(make_config(mode="lr_find", unfreeze_schedule=GRADUAL, lr_find_stage="fc"),
                  splits=make_splits(num_train=16, validation_split=0.25))


def test_auto_learning_rates_are_found_once_and_recorded(make_config, caplog):
    config = make_config(head_learning_rate="auto", finetune_learning_rate="auto", lr_find_steps=20,
                         steps_per_epoch=2)
    with caplog.at_level(logging.INFO, logger="absl"):
        metrics = train.run(config, splits=make_splits(num_train=64, validation_split=0.25))
    chosen = metrics["learning_rates"]
    assert set(chosen) == {"head", "finetune"} and all(rate > 0 for rate in chosen.values())
    assert checkpointing.load_state(config.model_dir).learning_rates == chosen
    assert sum("_learning_rate=auto chose" in r.getMessage() for r in caplog.records) == 2
    assert sorted(os.listdir(os.path.join(config.model_dir, "lr_find"))) == [
        "finetune.json", "finetune.png", "head.json", "head.png"]


def test_layerwise_decay_runs_under_the_mirrored_strategy(make_config, mirrored_strategy):
    config = make_config(layerwise_lr_decay=0.5, steps_per_epoch=2, fine_tune_at="block2_conv1")
    splits = make_splits(num_train=16, validation_split=0.25)
    metrics = train.run(config, strategy=mirrored_strategy, splits=splits)
    assert metrics["stages"]["finetune"]["steps"] == 2


def test_layerwise_decay_on_cached_activations(make_config):
    """A fine-tuning stage on stored activations fits a model without a backbone layer; its blocks'
    rates come from the classifier whose layers it shares."""
    config = make_config(layerwise_lr_decay=0.5, steps_per_epoch=2, fine_tune_at="block2_conv1",
                         cache_features="true")
    metrics = train.run(config, splits=make_splits(num_train=16, validation_split=0.25))
    assert metrics["stages"]["finetune"]["steps"] == 2


def test_stage_names_from_top_n_are_file_safe(make_config):
    config = make_config(unfreeze_schedule="top:1=1,all=1")
    assert [s.name for s in schedule.build_stages(config)] == ["head", "unfreeze_top_1", "unfreeze_all"]
    assert schedule.build_stages(config)[1].trains_from == "top:1"
