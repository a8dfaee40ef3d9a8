"""The run directory: one process at a time, and --overwrite removes only what a run made."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tl_keras.errors import UserError
from tl_keras.training import run as train
from tl_keras.training import run_dir


def _hold_lock(model_dir):
    """Another process that takes the model_dir's lock the way tl_keras does, and keeps it."""
    code = ("import sys, time; from tl_keras.training import run_dir; "
            "lock = run_dir.lock(sys.argv[1]); lock.__enter__(); print('held', flush=True); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", code, model_dir], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.slow
def test_a_second_process_on_the_same_model_dir_is_refused(make_config, tiny_splits, tmp_path):
    config = make_config()
    os.makedirs(config.model_dir)
    holder = _hold_lock(config.model_dir)
    try:
        with pytest.raises(UserError, match=rf"in use by another tl_keras process \(pid {holder.pid}\)"):
            train.run(config, splits=tiny_splits)
        with pytest.raises(UserError, match=rf"pid {holder.pid}"):
            train.run(make_config(overwrite=True), splits=tiny_splits)
        assert os.listdir(config.model_dir) == [run_dir.LOCK_FILE]  # --overwrite removed nothing.
    finally:
        holder.kill()
        holder.wait()
    # A kill -9 leaves no stale lock: the kernel releases it with the process.
    metrics = train.run(config, splits=tiny_splits)
    assert metrics["export_path"]


@pytest.mark.slow
def test_predict_does_not_take_the_lock(make_config, tiny_splits, tmp_path):
    config = make_config()
    train.run(config, splits=tiny_splits)
    holder = _hold_lock(config.model_dir)
    try:
        image = tmp_path / "x.png"
        image.write_bytes(tf.io.encode_png(np.zeros((32, 32, 3), np.uint8)).numpy())
        result = train.run(make_config(mode="predict", images=str(image)))
        assert len(result["results"]) == 1
    finally:
        holder.kill()
        holder.wait()


def test_overwrite_refuses_a_directory_that_holds_no_run(make_config, tiny_splits, tmp_path):
    home = tmp_path / "home"
    for name in ("logs", "checkpoints", "export", "eval", "notes.txt"):
        (home / name).mkdir(parents=True) if "." not in name else (home / name).write_text("mine")
    (home / "logs" / "diary.txt").write_text("keep me")
    before = sorted(os.listdir(home))
    with pytest.raises(UserError, match=r"holds files that are not a tl_keras run .*Received: model_dir="):
        train.run(make_config(model_dir=str(home), overwrite=True), splits=tiny_splits)
    with pytest.raises(UserError, match=r"holds files that are not a tl_keras run"):
        train.run(make_config(model_dir=str(home)), splits=tiny_splits)
    assert sorted(os.listdir(home)) == before
    assert (home / "logs" / "diary.txt").read_text() == "keep me"


def test_overwrite_removes_only_what_the_run_made(make_config, tiny_splits):
    config = make_config()
    train.run(config, splits=tiny_splits)
    with open(os.path.join(config.model_dir, "my_notes.txt"), "w") as f:
        f.write("keep me")
    train.run(make_config(overwrite=True), splits=tiny_splits)
    with open(os.path.join(config.model_dir, "my_notes.txt")) as f:
        assert f.read() == "keep me"


@pytest.mark.parametrize("contents", [[], ["feature_cache"]])
def test_empty_or_missing_model_dir_is_fine(make_config, tiny_splits, contents):
    config = make_config(overwrite=True)
    for name in contents:
        os.makedirs(os.path.join(config.model_dir, name))
    assert train.run(config, splits=tiny_splits)["export_path"]
