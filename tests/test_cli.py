"""The command line, run as users run it: real subprocesses of `python -m tl_keras.main`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tl_keras.training import distribute

from helpers import CLASS_NAMES, REPO, make_examples, run_cli

# Real subprocesses of the command line: the slow tier.
pytestmark = pytest.mark.slow


def _one_line_error(result, *expected):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0]


def test_bad_value_is_one_line(tmp_path):
    result = run_cli("--flagfile=configs/smoke.flags", "--image_size=16", "--weights=none",
                     f"--model_dir={tmp_path}/run")
    _one_line_error(result, "image_size", "Received: image_size=16")


def test_unknown_flag_is_one_line():
    _one_line_error(run_cli("--flagfile=configs/smoke.flags", "--no_such_flag=3"), "no_such_flag")


def test_missing_flagfile_is_one_line():
    _one_line_error(run_cli("--flagfile=configs/missing.flags"), "missing.flags")


def test_bad_enum_is_one_line():
    _one_line_error(run_cli("--flagfile=configs/smoke.flags", "--distribution_strategy=magic"),
                    "distribution_strategy", "magic")


def test_unknown_dataset_is_one_line(tmp_path, tiny_tfds_dir):
    result = run_cli("--flagfile=configs/smoke.flags", "--weights=none", "--dataset=no_such_set",
                     f"--data_dir={tiny_tfds_dir}", f"--model_dir={tmp_path}/run")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "Received: dataset=no_such_set" in result.stderr.strip().splitlines()[-1]


def test_end_to_end_train_then_evaluate_and_export(tmp_path, tiny_tfds_dir):
    model_dir = tmp_path / "run"
    common = ["--flagfile=configs/smoke.flags", "--mixed_precision=float32", "--dataset=tiny_shapes",
              f"--data_dir={tiny_tfds_dir}", "--backbone=tiny", "--weights=none",
              "--fine_tune_at=block3_conv1", "--batch_size=4", "--steps_per_epoch=1", "--eval_steps=1",
              "--head_units=8", f"--model_dir={model_dir}"]
    result = run_cli(*common)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert {"head", "finetune"} <= set(metrics["stages"])
    saved = tf.saved_model.load(str(model_dir / "export" / "1"))
    images, _ = make_examples(2, seed=3)
    out = saved.signatures["serving_default"](images=tf.constant(images))
    assert out["probabilities"].shape == (2, 3)
    assert set(n.decode() for n in out["class_names"].numpy()) <= set(CLASS_NAMES)
    # flags.txt repeats the run's settings as a flagfile.
    flags_txt = (model_dir / "flags.txt").read_text()
    assert "--dataset=tiny_shapes" in flags_txt and "--batch_size=4" in flags_txt

    evaluated = run_cli(f"--flagfile={model_dir}/flags.txt", "--mode=evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "test" in json.loads((model_dir / "metrics.json").read_text())
    exported = run_cli(f"--flagfile={model_dir}/flags.txt", "--mode=export")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (model_dir / "export" / "2" / "saved_model.pb").exists()
    np.testing.assert_array_equal(sorted(os.listdir(model_dir / "export")), ["1", "2", "labels.txt"])


def test_min_accuracy_fails_training_and_skips_the_export(tmp_path, tiny_tfds_dir):
    model_dir = tmp_path / "run"
    result = run_cli("--flagfile=configs/smoke.flags", "--mixed_precision=float32", "--dataset=tiny_shapes",
                     f"--data_dir={tiny_tfds_dir}", "--backbone=tiny", "--weights=none",
                     "--fine_tune_at=block3_conv1", "--batch_size=4", "--steps_per_epoch=1", "--head_units=8",
                     "--finetune_epochs=0", "--min_accuracy=1.0", f"--model_dir={model_dir}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tl_keras: error: Test accuracy") and "below --min_accuracy" in last
    assert last.endswith("Received: min_accuracy=1.0")
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["stages"]["head"]["test_accuracy"] < 1.0  # The last stage is what is checked.
    assert "export_path" not in metrics
    assert not (model_dir / "export").exists()
    assert (model_dir / "checkpoints" / "latest.weights.h5").exists()


def test_predict_prints_top_k_and_reports_a_corrupt_file(tmp_path):
    from tl_keras.model import backbones, classifier
    from tl_keras.serving import export

    model = classifier.build_classifier("tiny", 32, len(CLASS_NAMES), "none", head_units=(8,))
    export.export_saved_model(model, str(tmp_path / "run" / "export"),
                              backbones.get_preprocessing("tiny", 32),
                              CLASS_NAMES)
    images, _ = make_examples(2, seed=4, size=40)
    for i, image in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run_cli("--mode=predict", f"--model_dir={tmp_path / 'run'}", f"--images={tmp_path}/*.png",
                     "--top_k=3", f"--output_json={tmp_path / 'out.json'}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    expected_order = [str(tmp_path / name) for name in ("0.png", "1.png", "broken.png")]
    assert [line.split()[0] for line in lines] == expected_order
    for line in lines[:2]:
        assert sorted(line.split()[1::2]) == sorted(CLASS_NAMES)  # Top 3 of 3: every class, once.
        assert sum(float(p) for p in line.split()[2::2]) == pytest.approx(1.0, abs=1e-3)
    assert "ERROR: not a readable image" in lines[2]
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["export_dir"] == str(tmp_path / "run" / "export" / "1")
    assert "error" in written["results"][2] and len(written["results"][0]["predictions"]) == 3


def test_bench_writes_its_ratios_as_json(tmp_path, tiny_tfds_dir):
    """The benchmark runs end to end on local data and writes every ratio it prints (not timed here)."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    result = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--flagfile=configs/smoke.flags", "--mixed_precision=float32",
         "--dataset=tiny_shapes", f"--data_dir={tiny_tfds_dir}", "--weights=none",
         f"--model_dir={tmp_path}/run", "--bench_examples=16", "--bench_phase2_steps=2",
         f"--bench_json={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["examples"] == 16
    for key in ("phase1_speedup", "head_epoch_speedup", "pipeline_vs_train_ratio", "matmul_conv_speedup",
                "bf16_forward_speedup", "bf16_train_speedup", "matmul_conv_speedup_bf16"):
        assert results[key] > 0, key
        assert key in result.stdout
    assert results["matmul_conv_layers"] == 6  # VGG16 blocks 4 and 5 run on 4x4 and 2x2 maps at 32 px.
    # The CPU features it saw: the bf16-related subset of this machine's flags.
    model, flags = distribute.cpu_info()
    assert results["cpu_model"] == model
    assert results["cpu_flags"] == [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile",
                                                "amx_int8") if f in flags]
    assert results["onednn_max_cpu_isa"] is None
    assert results["auto_cpu_precision"] == distribute.cpu_precision(flags)[0]
