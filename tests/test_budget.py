"""--time_budget: the planner as a pure function, the duration format, and a short real run."""

import json
import logging
import os
import signal
import threading
import time

from absl.testing import flagsaver
import pytest
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf

from tl_keras import config as config_lib
from tl_keras import flags as tl_flags
from tl_keras.errors import Interrupted, UserError
from tl_keras.training import budget
from tl_keras.training import run as train

from helpers import make_splits

RATES = budget.Rates(head=400.0, finetune=100.0, inference=1000.0)
CIFAR = dict(steps_per_epoch=704, batch_size=64, num_validation=5000, num_test=10000)


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400),
                                           ("2h5s", 7205), (" 45m ", 2700)])
def test_durations(text, seconds):
    assert config_lib.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "m", "30min", "1h-5m", "5m30h"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        config_lib.parse_duration(text)


def _planned_seconds(plan):
    return plan.spent_seconds + plan.head_seconds + plan.finetune_seconds + plan.evaluation_export_seconds


@pytest.mark.parametrize("minutes", [10, 30, 90])
def test_the_last_phase_fills_the_budget_and_the_first_keeps_its_epochs(minutes):
    plan = budget.make_plan(60 * minutes, 45.0, rates=RATES, head_epochs=1, finetune=True, **CIFAR)
    assert plan.head_steps == 704  # --head_epochs=1, as the flags say.
    total = _planned_seconds(plan)
    one_step = CIFAR["batch_size"] / RATES.finetune
    assert total <= 60 * minutes * (1 - budget.SAFETY_FRACTION) + 1e-6
    # Nothing left over but less than a step (and a validation pass it would need), plus the margin.
    assert total >= 60 * minutes * (1 - budget.SAFETY_FRACTION) - one_step - 5.0 - 1e-6
    assert plan.finetune_epochs == pytest.approx(plan.finetune_steps / 704)


def test_more_time_buys_steps_of_the_last_phase_only():
    short = budget.make_plan(1200, 30.0, rates=RATES, head_epochs=2, finetune=True, **CIFAR)
    long = budget.make_plan(2400, 30.0, rates=RATES, head_epochs=2, finetune=True, **CIFAR)
    assert short.head_steps == long.head_steps == 2 * 704
    # The extra 1,200 s buy 1,200 s of phase 2: steps at 0.64 s and a 5 s validation each epoch.
    extra = long.finetune_steps - short.finetune_steps
    assert extra * 0.64 + (long.finetune_epochs // 1 - short.finetune_epochs // 1) * 5 == pytest.approx(
        1200 * (1 - budget.SAFETY_FRACTION), abs=0.64 + 5)


def test_without_phase_two_phase_one_fills_the_budget():
    plan = budget.make_plan(600, 20.0, rates=RATES, head_epochs=1, finetune=False, **CIFAR)
    assert plan.finetune_steps == 0 and plan.head_steps > 704
    assert _planned_seconds(plan) <= 600


def test_time_spent_before_counts_against_the_budget():
    fresh = budget.make_plan(1800, 0.0, rates=RATES, head_epochs=1, finetune=True, **CIFAR)
    late = budget.make_plan(1800, 600.0, rates=RATES, head_epochs=1, finetune=True, **CIFAR)
    assert late.finetune_steps < fresh.finetune_steps
    assert _planned_seconds(late) <= 1800


def test_a_budget_too_short_is_one_line():
    with pytest.raises(UserError, match=r"--time_budget is too short .* Received: time_budget=60 s"):
        budget.make_plan(60, 30.0, rates=RATES, head_epochs=1, finetune=True, **CIFAR)


def test_the_plan_round_trips_and_describes_itself():
    plan = budget.make_plan(1800, 45.0, rates=RATES, head_epochs=1, finetune=True, **CIFAR)
    assert budget.Plan.from_dict(plan.to_dict()) == plan
    text = plan.describe()
    assert text.startswith("Budget 30.0 min: preparation 45 s, phase 1 1.0 epochs at 400 img/s")
    assert f"phase 2 {plan.finetune_epochs:.1f} epochs at 100 img/s" in text


def test_setup_time_is_reserved():
    quick = budget.make_plan(1800, 45.0, rates=RATES, head_epochs=1, finetune=True, **CIFAR)
    slow_to_compile = budget.make_plan(
        1800, 45.0, rates=budget.Rates(400.0, 100.0, 1000.0, head_setup=20.0, finetune_setup=40.0),
        head_epochs=1, finetune=True, **CIFAR)
    # 60 s less for phase 2: about 94 steps of 0.64 s.
    assert quick.finetune_steps - slow_to_compile.finetune_steps == pytest.approx(60 / 0.64, abs=10)


@pytest.mark.slow
def test_a_budget_run_plans_follows_and_keeps_its_plan(make_config, caplog, tmp_path):
    """A short real run: the plan is logged and written, a SIGTERM in phase 2 stops it, the rerun keeps
    the plan (no second measurement), and each phase runs exactly the steps planned."""
    splits = make_splits(num_train=160, num_test=16, validation_split=0.25)
    config = make_config(time_budget="60s", head_epochs=1, finetune_epochs=1, steps_per_epoch=None,
                         save_every_steps=7, finetune_warmup_epochs=0.5)
    state_file = os.path.join(config.model_dir, "checkpoints", "state.json")

    def stop_in_phase_two():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with open(state_file) as f:
                    state = json.load(f)
            except (OSError, ValueError):
                state = {}
            if state.get("phase") == "finetune" and state.get("epoch", 0) >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_in_phase_two, daemon=True)
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
    assert metrics["head"]["steps"] == plan["head_steps"] == 30  # --head_epochs=1 of 120 examples.
    assert metrics["finetune"]["steps"] == plan["finetune_steps"] > 30
    events = summaries_text(os.path.join(config.model_dir, "logs"), "plan")
    assert events and events[0].startswith("Budget 60 s")
    flagfile = os.path.join(config.model_dir, "flags.txt")
    with flagsaver.flagsaver():
        tl_flags.FLAGS.unparse_flags()
        tl_flags.FLAGS(["prog", f"--flagfile={flagfile}"])
        assert tl_flags.get_config() == config  # The way to resume, evaluate and export a budget run.


def summaries_text(log_dir, tag):
    accumulator = event_accumulator.EventAccumulator(log_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    return [tf.make_ndarray(event.tensor_proto).item().decode() for event in accumulator.Tensors(tag)]


def test_the_last_phase_is_fixed_once_from_the_time_actually_left():
    plan = budget.make_plan(1800, 45.0, rates=RATES, head_epochs=1, finetune=True, **CIFAR)
    on_time = 45.0 + plan.head_seconds + 10.0  # Phase 1 and its test pass took what was planned.
    late = on_time + 120.0  # Phase 1 ran two minutes long.
    args = (CIFAR["num_validation"], CIFAR["num_test"], CIFAR["batch_size"])
    kept, shortened = plan.fix_last(on_time, *args), plan.fix_last(late, *args)
    assert abs(kept.finetune_steps - plan.finetune_steps) <= 10
    # Two minutes fewer: about 187 steps of 0.64 s (and maybe one validation pass less).
    assert 120 / 0.64 - 10 <= kept.finetune_steps - shortened.finetune_steps <= (120 + 5) / 0.64 + 1
    assert shortened.last_phase_fixed and shortened.head_steps == plan.head_steps
    assert shortened.fix_last(late + 300, *args) == shortened  # Once only: a resume keeps it.
    assert budget.Plan.from_dict(shortened.to_dict()) == shortened
