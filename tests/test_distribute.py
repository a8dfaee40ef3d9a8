"""Distribution: strategies, replica equivalence, multi-worker through TF_CONFIG, precision."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tl_keras.errors import UserError
from tl_keras.model import backbones
from tl_keras.model import classifier
from tl_keras.training import distribute
from tl_keras.training import schedule
from tl_keras.training import run as train

from helpers import REPO, cpu_only_host, make_examples


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _one_step(strategy, weights, images, labels):
    with strategy.scope():
        model = classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,), head_batchnorm=False,
                                            dropout=0.0)
        model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    ds = tf.data.Dataset.from_tensors((images, labels))
    history = model.fit(ds, epochs=1, verbose=0)
    return history.history["loss"][0], model.get_weights()


def test_two_replicas_match_one_at_the_same_global_batch(mirrored_strategy):
    """Global batch 8 on 1 replica and 2 x 4 on 2 replicas: the same loss and the same update."""
    keras.utils.set_random_seed(0)
    weights = classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,), head_batchnorm=False,
                                          dropout=0.0).get_weights()
    images, labels = make_examples(8, seed=4)
    images = backbones.get_preprocessing("tiny", 32)(images)
    labels = tf.one_hot(labels, 3)
    loss_one, weights_one = _one_step(tf.distribute.get_strategy(), weights, images, labels)
    loss_two, weights_two = _one_step(mirrored_strategy, weights, images, labels)
    assert mirrored_strategy.num_replicas_in_sync == 2
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    changed = [not np.allclose(a, b) for a, b in zip(weights, weights_one)]
    assert any(changed), "the step did not change the weights"
    for a, b in zip(weights_one, weights_two):
        np.testing.assert_allclose(a, b, atol=1e-6)


@cpu_only_host
def test_auto_is_default_without_gpus():
    assert distribute.get_strategy("auto") is tf.distribute.get_strategy()


def test_multi_worker_without_tf_config_is_a_user_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="TF_CONFIG"):
        distribute.get_strategy("multi_worker")


@cpu_only_host
@pytest.mark.skipif(distribute.AMX_FLAGS <= distribute.cpu_info()[1],
                    reason="this host's CPU has AMX, where auto is bf16")
def test_precision_auto_is_float32_on_cpu():
    assert distribute.resolve_precision("auto", tf.distribute.get_strategy()) == "float32"


AMX = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}


@cpu_only_host
@pytest.mark.parametrize("flags, max_isa, policy, feature", [
    (set(), None, "float32", "no bf16 matrix units"),
    ({"avx2", "avx512f"}, None, "float32", "no bf16 matrix units"),
    ({"avx2", "avx512f", "avx512_bf16"}, None, "float32", "avx512_bf16 but no AMX"),
    ({"avx512_bf16", "amx_bf16"}, None, "float32", "avx512_bf16 but no AMX"),  # No tile unit.
    (AMX, None, "mixed_bfloat16", "AMX (amx_bf16)"),
    (AMX, "avx512_core_amx", "mixed_bfloat16", "AMX (amx_bf16)"),
    (AMX, "ALL", "mixed_bfloat16", "AMX (amx_bf16)"),
    (AMX, "AVX512_CORE_BF16", "float32", "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 hides it"),
    (AMX, "AVX2", "float32", "ONEDNN_MAX_CPU_ISA=AVX2 hides it"),
])
def test_precision_auto_on_each_kind_of_cpu(flags, max_isa, policy, feature, monkeypatch, caplog):
    if max_isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", max_isa)
    caplog.set_level("INFO", logger="absl")
    assert distribute.resolve_precision("auto", tf.distribute.get_strategy(), cpu_flags=flags) == policy
    lines = [r.getMessage() for r in caplog.records if "mixed_precision=auto" in r.getMessage()]
    assert len(lines) == 1 and f"chose {policy}:" in lines[0] and feature in lines[0], lines
    assert distribute.cpu_precision(flags, max_isa)[1] in lines[0]
    assert distribute.cpu_info()[0] in lines[0]  # The CPU model, for whoever reads the log.


@pytest.mark.parametrize("name", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_explicit_precision_is_never_overridden(name, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    for flags in (set(), AMX):
        assert distribute.resolve_precision(name, tf.distribute.get_strategy(), cpu_flags=flags) == name


def test_cpu_info_reads_model_and_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example Xeon\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nmodel name\t: Example Xeon\nflags\t\t: fpu\n")
    assert distribute.cpu_info(str(cpuinfo)) == ("Example Xeon", {"fpu", "avx2", "amx_bf16", "amx_tile"})
    assert distribute.cpu_info(str(tmp_path / "absent")) == ("unknown", frozenset())


def test_known_crash_combination_is_refused(make_config, tiny_splits, mirrored_strategy):
    config = make_config(mixed_precision="mixed_float16", jit_compile=True)
    with pytest.raises(UserError, match="Received: jit_compile=True"):
        train.run(config, strategy=mirrored_strategy, splits=tiny_splits)


def test_mixed_bfloat16_trains_and_exports_float32(make_config, tiny_splits):
    config = make_config(mixed_precision="mixed_bfloat16")
    metrics = train.run(config, splits=tiny_splits)
    served = tf.saved_model.load(metrics["export_path"]).signatures["serving_default"](
        images=tf.constant(make_examples(2, seed=1)[0]))
    assert served["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(served["probabilities"].numpy().sum(1), 1.0, atol=1e-3)


def test_scale_lr_with_batch(make_config, tiny_splits, mirrored_strategy, monkeypatch):
    seen = []
    real = schedule.compile_classifier
    monkeypatch.setattr(schedule, "compile_classifier",
                        lambda model, lr, *a, **k: (seen.append(lr), real(model, lr, *a, **k)))
    train.run(make_config(scale_lr_with_batch=True, finetune_epochs=0), strategy=mirrored_strategy,
              splits=tiny_splits)
    assert seen[0] == pytest.approx(2 * 1e-3)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_two_workers(data_dir, model_dir, extra_env=None, extra_args=()):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = ["--flagfile=configs/smoke.flags", "--mixed_precision=float32", "--dataset=tiny_shapes",
            f"--data_dir={data_dir}", "--backbone=tiny", "--weights=none", "--fine_tune_at=block2_conv1",
            "--batch_size=4", "--steps_per_epoch=2", "--eval_steps=1", "--head_units=8",
            "--distribution_strategy=multi_worker", f"--model_dir={model_dir}", *extra_args]
    processes = []
    for index in range(2):
        env = dict(os.environ, PYTHONPATH=REPO, **(extra_env or {}),
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        processes.append(subprocess.Popen([sys.executable, "-m", "tl_keras.main", *args], cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def _run_two_workers(data_dir, model_dir, extra_env=None, timeout=420, extra_args=()):
    processes = _start_two_workers(data_dir, model_dir, extra_env, extra_args)
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append((process.returncode, stderr + stdout))
    except subprocess.TimeoutExpired:
        results = [(None, "timed out")] * 2
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


@pytest.mark.slow
def test_multi_worker_runs_both_stages_with_one_export(tmp_path, tiny_tfds_dir):
    model_dir = tmp_path / "run"
    results = _run_two_workers(tiny_tfds_dir, model_dir)
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    assert "Not the chief" in results[1][1] and "Not the chief" not in results[0][1]
    assert sorted(os.listdir(model_dir / "export")) == ["1", "labels.txt"]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert {"head", "finetune"} <= set(metrics["stages"])
    # Both workers trained the same model: identical losses in their logs.
    losses = [[line.split(" loss: ")[1].split()[0] for line in output.splitlines() if " loss: " in line]
              for _, output in results]
    assert losses[0] and losses[0] == losses[1]


@pytest.mark.slow
def test_multi_worker_fails_without_the_compat_fix(tmp_path, tiny_tfds_dir):
    results = _run_two_workers(tiny_tfds_dir, tmp_path / "run",
                               extra_env={"TL_KERAS_DISABLE_MULTI_WORKER_COMPAT": "1"}, timeout=240)
    assert all(code != 0 for code, _ in results)
    assert any("PerReplica" in stderr or "reduction dimension" in stderr or "timed out" in stderr
               for _, stderr in results)


RESUMABLE = ("--deterministic", "--head_epochs=2", "--finetune_epochs=2", "--steps_per_epoch=4",
             "--save_every_steps=2", "--finetune_learning_rate=1e-3")


@pytest.mark.slow
def test_two_workers_killed_and_restarted_finish_like_an_uninterrupted_pair(tmp_path, tiny_tfds_dir):
    """Every worker restores the chief's state from the shared model_dir. A worker that started
    again from epoch 0 while the chief resumed would leave the collectives waiting forever."""
    results = _run_two_workers(tiny_tfds_dir, tmp_path / "whole", extra_args=RESUMABLE)
    assert all(code == 0 for code, _ in results), results[0][1][-3000:]
    uninterrupted = json.loads((tmp_path / "whole" / "metrics.json").read_text())

    model_dir = tmp_path / "run"
    processes = _start_two_workers(tiny_tfds_dir, model_dir, extra_args=RESUMABLE)
    state_file = model_dir / "checkpoints" / "state.json"
    deadline = time.time() + 300
    try:
        while True:  # Mid-way through fine-tuning: its first epoch and two steps of the next done.
            state = json.loads(state_file.read_text()) if state_file.exists() else {}
            if (state.get("epoch"), state.get("step")) == (3, 2):
                break
            assert all(p.poll() is None for p in processes), processes[0].communicate()[1][-3000:]
            assert time.time() < deadline, "never reached the kill point"
            time.sleep(0.005)
    finally:
        for process in processes:
            process.send_signal(signal.SIGKILL)
            process.communicate()
    results = _run_two_workers(tiny_tfds_dir, model_dir, extra_args=RESUMABLE, timeout=240)
    for code, output in results:
        assert code == 0, output[-3000:]
        assert "3 epochs and 2 steps done" in output, output[-3000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    for name in ("head", "finetune"):
        for key in ("test_accuracy", "test_loss"):
            expected = uninterrupted["stages"][name][key]
            assert metrics["stages"][name][key] == pytest.approx(expected, abs=1e-4), (name, key)
