"""--time_budget: the planner as a pure function, the duration format, and a short real run."""

import json
import logging
import os
import signal
import threading
import time

import pytest
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf

from tl_keras import config as config_lib
from tl_keras.errors import Interrupted, UserError
from tl_keras.training import budget
from tl_keras.training import run as train

from helpers import config_from_flagfile, make_splits

RATES = budget.Rates(train={"head": 400.0, "finetune": 100.0}, inference=1000.0)
CIFAR = dict(steps_per_epoch=704, batch_size=64, num_validation=5000, num_test=10000)
TWO_STAGES = [("head", 1), ("finetune", 3)]


def _make(budget_seconds, spent, stages=TWO_STAGES, rates=RATES):
    return budget.make_plan(budget_seconds, spent, rates=rates, stages=list(stages), **CIFAR)


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400),
                                           ("2h5s", 7205), (" 45m ", 2700)])
def test_durations(text, seconds):
    assert config_lib.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "m", "30min", "1h-5m", "5m30h"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        config_lib.parse_duration(text)


def _planned_seconds(plan):
    stages = sum(stage["seconds"] for stage in plan.stages)
    return plan.spent_seconds + stages + plan.evaluation_export_seconds


@pytest.mark.parametrize("minutes", [10, 30, 90])
def test_the_last_stage_fills_the_budget_and_the_first_keeps_its_epochs(minutes):
    plan = _make(60 * minutes, 45.0)
    assert plan.steps("head") == 704  # --head_epochs=1, as the flags say.
    total = _planned_seconds(plan)
    one_step = CIFAR["batch_size"] / RATES.train["finetune"]
    assert total <= 60 * minutes * (1 - budget.SAFETY_FRACTION) + 1e-6
    # Nothing left over but less than a step (and a validation pass it would need), plus the margin.
    assert total >= 60 * minutes * (1 - budget.SAFETY_FRACTION) - one_step - 5.0 - 1e-6
    assert plan.epochs("finetune") == pytest.approx(plan.steps("finetune") / 704)


def test_more_time_buys_steps_of_the_last_stage_only():
    stages = [("head", 2), ("finetune", 3)]
    short, long = _make(1200, 30.0, stages), _make(2400, 30.0, stages)
    assert short.steps("head") == long.steps("head") == 2 * 704
    # The extra 1,200 s buy 1,200 s of fine-tuning: steps at 0.64 s and a 5 s validation each epoch.
    extra = long.steps("finetune") - short.steps("finetune")
    validations = long.epochs("finetune") // 1 - short.epochs("finetune") // 1
    assert extra * 0.64 + validations * 5 == pytest.approx(1200 * (1 - budget.SAFETY_FRACTION), abs=0.64 + 5)


def test_any_list_of_stages_keeps_all_but_the_last():
    """Gradual unfreezing: four stages at their own measured speeds; the last gets the rest."""
    rates = budget.Rates(train={"head": 400.0, "unfreeze_block5_conv1": 200.0, "unfreeze_block4_conv1": 150.0,
                                "unfreeze_all": 80.0}, inference=1000.0,
                         setup={"head": 5.0, "unfreeze_block5_conv1": 6.0, "unfreeze_block4_conv1": 7.0,
                                "unfreeze_all": 8.0})
    stages = [("head", 1), ("unfreeze_block5_conv1", 1), ("unfreeze_block4_conv1", 2), ("unfreeze_all", 1)]
    plan = _make(3600, 60.0, stages, rates)
    assert [s["name"] for s in plan.stages] == [name for name, _ in stages]
    assert [plan.steps(name) for name, _ in stages[:-1]] == [704, 704, 2 * 704]
    assert plan.steps("unfreeze_all") > 704
    # Each kept stage costs its steps at its own rate, one validation pass per epoch and its setup.
    assert plan.stages[2]["seconds"] == pytest.approx(2 * 704 * 64 / 150 + 2 * 5 + 7.0, abs=0.01)
    assert 3600 * (1 - budget.SAFETY_FRACTION) - 0.8 - 5 <= _planned_seconds(plan) <= 3600


def test_a_single_stage_fills_the_budget():
    plan = _make(600, 20.0, [("head", 1)])
    assert plan.steps("head") > 704
    assert _planned_seconds(plan) <= 600


def test_time_spent_before_counts_against_the_budget():
    fresh, late = _make(1800, 0.0), _make(1800, 600.0)
    assert late.steps("finetune") < fresh.steps("finetune")
    assert _planned_seconds(late) <= 1800


def test_a_budget_too_short_is_one_line():
    with pytest.raises(UserError, match=r"--time_budget is too short .* Received: time_budget=60 s"):
        _make(60, 30.0)


def test_the_plan_round_trips_and_describes_itself():
    plan = _make(1800, 45.0)
    assert budget.Plan.from_dict(plan.to_dict()) == plan
    text = plan.describe()
    assert text.startswith("Budget 30.0 min: preparation 45 s, head 1.0 epochs at 400 img/s")
    assert f"finetune {plan.epochs('finetune'):.1f} epochs at 100 img/s" in text


def test_a_plan_of_the_two_phase_version_still_reads():
    """A budget run saved by the two-phase version resumes with the plan it made."""
    old = {"budget_seconds": 1800, "spent_seconds": 45.0, "head_steps": 704, "finetune_steps": 2000,
           "steps_per_epoch": 704, "head_seconds": 130.0, "finetune_seconds": 1400.0,
           "evaluation_export_seconds": 40.0, "last_phase_fixed": True,
           "rates": {"head": 400.0, "finetune": 100.0, "inference": 1000.0, "head_setup": 3.0,
                     "finetune_setup": 4.0}}
    plan = budget.Plan.from_dict(old)
    assert (plan.steps("head"), plan.steps("finetune"), plan.last_stage_fixed) == (704, 2000, True)
    assert budget.Rates.from_dict(plan.rates) == budget.Rates(
        train={"head": 400.0, "finetune": 100.0}, inference=1000.0, setup={"head": 3.0, "finetune": 4.0})


def test_setup_time_is_reserved():
    quick = _make(1800, 45.0)
    slower = budget.Rates(train=RATES.train, inference=1000.0, setup={"head": 20.0, "finetune": 40.0})
    slow_to_compile = _make(1800, 45.0, rates=slower)
    # 60 s less for fine-tuning: about 94 steps of 0.64 s.
    assert quick.steps("finetune") - slow_to_compile.steps("finetune") == pytest.approx(60 / 0.64, abs=10)


@pytest.mark.parametrize("tta, export_tta, test_views, export_views", [
    ("none", False, 1, 1), ("flip", False, 2, 1), ("flip", True, 2, 2)])
def test_the_plan_pays_for_test_time_augmentation(make_config, tta, export_tta, test_views, export_views):
    """--tta=flip reads each test image twice at every stage's end; --export_tta also doubles the
    export's calibration, report and parity passes. The plan must reserve that time."""
    from types import SimpleNamespace
    from tl_keras.training import stages
    config = make_config(tta=tta, export_tta=export_tta, parity_examples=None)
    data = SimpleNamespace(splits=SimpleNamespace(num_validation=300, num_test=1000))
    assert stages._evaluated_examples(config, data) == (300, 1000 * test_views)
    formats = len(stages.exporting.export_formats(config))
    assert stages._export_examples(config, data) == (300 + 1000 + 1000 * formats) * export_views


@pytest.mark.slow
def test_a_budget_run_plans_follows_and_keeps_its_plan(make_config, caplog, tmp_path):
    """A short real run: the plan is logged and written, a SIGTERM in the last stage stops it, the rerun
    keeps the plan (no second measurement), and each stage runs exactly the steps planned."""
    splits = make_splits(num_train=160, num_test=16, validation_split=0.25)
    config = make_config(time_budget="60s", head_epochs=1, finetune_epochs=1, steps_per_epoch=None,
                         save_every_steps=7, finetune_warmup_epochs=0.5)
    state_file = os.path.join(config.model_dir, "checkpoints", "state.json")

    def stop_in_the_last_stage():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with open(state_file) as f:
                    state = json.load(f)
            except (OSError, ValueError):
                state = {}
            if state.get("stage") == 1 and state.get("epoch", 0) >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_in_the_last_stage, daemon=True)
    watcher.start()
    with caplog.at_level(logging.INFO, logger="absl"):
        with pytest.raises(Interrupted):
            train.run(config, splits=splits)
    watcher.join()
    assert any(r.getMessage().startswith("Budget 60 s: preparation") for r in caplog.records)
    with open(state_file) as f:
        plan = json.load(f)["plan"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="absl"):
        metrics = train.run(config, splits=splits)
    assert any("Keeping the plan made when the run began" in r.getMessage() for r in caplog.records)
    assert not any(r.getMessage().startswith("Measured:") for r in caplog.records)
    assert metrics["budget"]["plan"] == plan
    planned = {stage["name"]: stage["steps"] for stage in plan["stages"]}
    assert metrics["stages"]["head"]["steps"] == planned["head"] == 30  # --head_epochs=1 of 120 examples.
    assert metrics["stages"]["finetune"]["steps"] == planned["finetune"] > 30
    events = summaries_text(os.path.join(config.model_dir, "logs"), "plan")
    assert events and events[0].startswith("Budget 60 s")
    flagfile = os.path.join(config.model_dir, "flags.txt")
    assert config_from_flagfile(flagfile) == config  # The way to resume, evaluate and export a budget run.


def summaries_text(log_dir, tag):
    accumulator = event_accumulator.EventAccumulator(log_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    return [tf.make_ndarray(event.tensor_proto).item().decode() for event in accumulator.Tensors(tag)]


def test_the_last_stage_is_fixed_once_from_the_time_actually_left():
    plan = _make(1800, 45.0)
    on_time = 45.0 + plan.stages[0]["seconds"] + 10.0  # The head stage and its test pass: as planned.
    late = on_time + 120.0  # The head stage ran two minutes long.
    args = (CIFAR["num_validation"], CIFAR["num_test"], CIFAR["batch_size"])
    kept, shortened = plan.fix_last(on_time, *args), plan.fix_last(late, *args)
    assert abs(kept.steps("finetune") - plan.steps("finetune")) <= 10
    # Two minutes fewer: about 187 steps of 0.64 s (and maybe one validation pass less).
    assert 120 / 0.64 - 10 <= kept.steps("finetune") - shortened.steps("finetune") <= (120 + 5) / 0.64 + 1
    assert shortened.last_stage_fixed and shortened.steps("head") == plan.steps("head")
    assert shortened.fix_last(late + 300, *args) == shortened  # Once only: a resume keeps it.
    assert budget.Plan.from_dict(shortened.to_dict()) == shortened
