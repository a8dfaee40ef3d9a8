"""Interrupted runs: SIGKILL a real CLI run at several points, rerun it, and compare the result with
an uninterrupted run (in --deterministic mode they must agree)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing import event_accumulator

from helpers import REPO, run_cli

# Real subprocesses of the command line: the slow tier.
pytestmark = pytest.mark.slow

# Four stages: the head, then gradual unfreezing in three stages with layer-wise learning rates.
HEAD_EPOCHS = 2
UNFREEZE = (("block3_conv1", 1), ("block2_conv1", 1), ("all", 1))
STAGES = ["head"] + [f"unfreeze_{layer}" for layer, _ in UNFREEZE]
EPOCHS = HEAD_EPOCHS + sum(epochs for _, epochs in UNFREEZE)


def _args(data_dir, model_dir, gradual=True):
    """The four-stage run; with gradual=False, a head-only one whose flags the test adds."""
    schedule = ",".join(f"{layer}={epochs}" for layer, epochs in UNFREEZE)
    stages = [f"--unfreeze_schedule={schedule}", "--layerwise_lr_decay=0.5"] if gradual else []
    return ["--flagfile=configs/smoke.flags", "--dataset=tiny_shapes", f"--data_dir={data_dir}",
            "--backbone=tiny", "--weights=none", "--batch_size=4",
            "--steps_per_epoch=4", "--eval_steps=2", "--head_units=8", "--deterministic",
            f"--head_epochs={HEAD_EPOCHS}", *stages,
            "--finetune_learning_rate=1e-3", "--save_every_steps=2", "--log_every_steps=1",
            "--mixed_precision=float32",
            f"--model_dir={model_dir}"]


def _state(model_dir):
    try:
        with open(os.path.join(model_dir, "checkpoints", "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _export_in_progress(model_dir):
    root = os.path.join(model_dir, "export")
    return os.path.isdir(root) and any(name.endswith(".tmp") for name in os.listdir(root))


def _saving(model_dir):
    """Inside a save_state that follows an earlier one: a checkpoint under its temporary name."""
    directory = os.path.join(model_dir, "checkpoints")
    try:
        return (_state(model_dir) or {}).get("save_id", 0) >= 1 and any(
            name.endswith(".tmp") for name in os.listdir(directory))
    except OSError:
        return False


KILL_POINTS = {
    # In the head stage, mid-epoch: one epoch and part of the next done.
    "head": lambda d: (_state(d) or {}).get("epoch") == 1 and _state(d).get("step") == 2,
    # At the boundary: the head stage finished and evaluated, stage 1 not yet at its first save.
    "boundary": lambda d: (_state(d) or {}).get("stage") == 1
    and _state(d).get("epoch") == HEAD_EPOCHS and _state(d).get("step") == 0,
    # Mid-epoch in the third stage, whose optimizer gives each block its own rate.
    "stage2": lambda d: (_state(d) or {}).get("stage") == 2 and _state(d).get("step") == 2,
    # While the SavedModel is being written.
    "export": _export_in_progress,
    # Inside save_state; the rerun also finds the leftovers of other kills (see _plant_leftovers).
    "save_state": _saving,
}


def _plant_leftovers(model_dir):
    """What a kill at a worse moment leaves: a state directory newer than the pointer (killed between
    its rename and the pointer's write), and an event file whose last record is torn."""
    state = _state(model_dir)
    newer = os.path.join(model_dir, "checkpoints", f"state-{state['save_id'] + 1:06d}")
    os.makedirs(newer, exist_ok=True)
    with open(os.path.join(newer, "model.weights.h5"), "wb") as f:
        f.write(b"torn")
    events = sorted(glob.glob(os.path.join(model_dir, "logs", "train", "events.out.tfevents.*")))
    with open(events[-1], "ab") as f:
        f.write(b"\x20\x00\x00\x00\x00\x00\x00\x00half a record")


def _run_and_kill(args, model_dir, condition, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO)
    process = subprocess.Popen([sys.executable, "-m", "tl_keras.main", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if condition(model_dir):
                state = _state(model_dir)
                process.send_signal(signal.SIGKILL)
                process.wait()
                return state
            if process.poll() is not None:
                pytest.fail(f"run ended before the kill point: {process.stderr.read()[-2000:]}")
            time.sleep(0.005)
        pytest.fail("kill point never reached")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _epoch_steps(model_dir, run, tag="epoch_loss"):
    acc = event_accumulator.EventAccumulator(os.path.join(model_dir, "logs", run))
    acc.Reload()
    return [event.step for event in acc.Tensors(tag)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_tfds_dir):
    model_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_cli(*_args(tiny_tfds_dir, model_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((model_dir / "metrics.json").read_text())


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_resume_after_sigkill_matches_uninterrupted(point, tmp_path, tiny_tfds_dir, uninterrupted):
    model_dir = tmp_path / "run"
    args = _args(tiny_tfds_dir, model_dir)
    killed_at = _run_and_kill(args, str(model_dir), KILL_POINTS[point])
    assert killed_at is not None and killed_at["status"] != "done", killed_at
    if point == "save_state":
        _plant_leftovers(str(model_dir))

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    state = _state(model_dir)
    assert state["status"] == "done" and state["epoch"] == EPOCHS
    if point in ("boundary", "stage2", "export"):  # save_state may land in the head stage.
        assert "Stage 0 (head):" not in result.stderr, "the head stage ran again after it had finished"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert sorted(metrics["stages"], key=lambda name: metrics["stages"][name]["index"]) == STAGES
    for name in STAGES:
        for key in ("test_accuracy", "test_loss"):
            expected = uninterrupted["stages"][name][key]
            assert metrics["stages"][name][key] == pytest.approx(expected, abs=1e-4), (name, key)
    # Every epoch logged exactly once, across the interruption.
    expected = list(range(EPOCHS))
    assert _epoch_steps(model_dir, "train") == expected
    assert _epoch_steps(model_dir, "validation") == expected
    batch_steps = _epoch_steps(model_dir, "train", "batch_loss")
    assert batch_steps and batch_steps == sorted(set(batch_steps)), batch_steps
    assert sorted(os.listdir(model_dir / "export")) == ["1", "labels.txt"]


def test_finished_run_does_nothing_and_overwrite_starts_fresh(tmp_path, tiny_tfds_dir):
    model_dir = tmp_path / "run"
    args = _args(tiny_tfds_dir, model_dir, gradual=False) + ["--head_epochs=1", "--finetune_epochs=0"]
    assert run_cli(*args).returncode == 0
    before = (model_dir / "metrics.json").read_text()
    again = run_cli(*args)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert (model_dir / "metrics.json").read_text() == before
    fresh = run_cli(*args, "--overwrite")
    assert fresh.returncode == 0 and "Stage 0 (head):" in fresh.stderr
    assert sorted(os.listdir(model_dir / "export")) == ["1", "labels.txt"]


def test_resume_with_other_settings_lists_the_differences(tmp_path, tiny_tfds_dir):
    model_dir = tmp_path / "run"
    args = _args(tiny_tfds_dir, model_dir, gradual=False) + ["--head_epochs=1", "--finetune_epochs=0"]
    assert run_cli(*args).returncode == 0
    changed = run_cli(*args, "--batch_size=8", "--head_learning_rate=0.5")
    assert changed.returncode != 0
    line = changed.stderr.strip().splitlines()[-1]
    assert "batch_size: 4 -> 8" in line and "head_learning_rate: 0.001 -> 0.5" in line
    assert "Traceback" not in changed.stderr


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_the_step_and_exit_cleanly(signum, code, tmp_path, tiny_tfds_dir,
                                                           uninterrupted):
    """Preemption (SIGTERM) and Ctrl-C (SIGINT) mid-epoch: finish the step, save it, say so in one
    line, exit 128 + signal; the rerun resumes from that step and ends like an uninterrupted run."""
    model_dir = tmp_path / "run"
    args = _args(tiny_tfds_dir, model_dir)
    env = dict(os.environ, PYTHONPATH=REPO)
    process = subprocess.Popen([sys.executable, "-m", "tl_keras.main", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not KILL_POINTS["head"](str(model_dir)):  # One epoch and two steps of the next done.
            assert process.poll() is None, process.stderr.read()[-2000:]
            assert time.time() < deadline, "never reached the middle of epoch 2"
            time.sleep(0.005)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped = [line for line in stderr.splitlines() if f"Stopped by {signal.Signals(signum).name}" in line]
    assert len(stopped) == 1 and "run the same command again to resume" in stopped[0], stderr[-3000:]
    state = _state(model_dir)
    assert (state["epoch"], state["step"]) >= (1, 2), state  # It saved the step it had reached...
    if state["step"]:  # ...and says which.
        assert f"after step {state['step']} of epoch {state['epoch'] + 1};" in stopped[0], stopped[0]
    else:
        assert f"at the end of epoch {state['epoch']};" in stopped[0], stopped[0]

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{state['epoch']} epochs and {state['step']} steps done" in result.stderr
    metrics = json.loads((model_dir / "metrics.json").read_text())
    for name in STAGES:
        for key in ("test_accuracy", "test_loss"):
            expected = uninterrupted["stages"][name][key]
            assert metrics["stages"][name][key] == pytest.approx(expected, abs=1e-4), (name, key)
