"""`python -m tools.bench --bench_backbones`: speed and memory per backbone, each in its own process."""

import json
import os
import subprocess
import sys

import pytest

from tl_keras.errors import UserError
from tl_keras.model import classifier
from tl_keras.model import registry
from tl_keras.training import distribute
from tools import backbone_bench

from helpers import REPO


def _bench(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    return subprocess.run([sys.executable, "-m", "tools.bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_families_are_the_smallest_of_each_from_the_registry():
    names = backbone_bench.smallest_per_family()
    families = [registry.BACKBONES[name].family for name in names]
    assert len(names) == 14 and sorted(families) == sorted(set(registry.FAMILIES) - {"tiny"})
    for name in names:
        spec = registry.BACKBONES[name]
        assert spec.parameters == min(s.parameters for s in registry.BACKBONES.values()
                                      if s.family == spec.family)
    assert {"vgg16", "resnet50", "mobilenet_v3_small", "convnext_tiny"} <= set(names)
    assert backbone_bench.parse_backbones(["tiny", "families", "vgg16"]) == ["tiny"] + names
    with pytest.raises(UserError, match=r"did you mean families\?\)\. Received: bench_backbones=familes"):
        backbone_bench.parse_backbones(["familes"])


def test_sizes_are_raised_to_the_backbone_minimum():
    assert backbone_bench.image_sizes("inception_v3", ["min", "default"]) == [75, 299]
    assert backbone_bench.image_sizes("resnet50", ["min", "default", "64", "32"]) == [32, 224, 64]
    assert backbone_bench.image_sizes("xception", ["40"]) == [71]
    with pytest.raises(UserError, match="Received: bench_sizes=huge"):
        backbone_bench.image_sizes("resnet50", ["huge"])


def test_table_has_the_readme_columns_and_a_row_per_failure():
    records = [
        {"backbone": "resnet50", "family": "resnet", "image_size": 224, "batch": 16, "classes": 10,
         "precision": "float32", "fine_tune_at": "top:2", "backbone_bn": "frozen", "params": 24_114_826,
         "forward_img_per_s": 41.26, "phase2_train_img_per_s": 7.314, "peak_rss_mib": 2345.6, "error": None,
         "cpu_model": "Some CPU", "cpu_flags": ["avx512f"]},
        {"backbone": "convnext_tiny", "family": "convnext", "image_size": 224, "peak_rss_mib": 9000.0,
         "error": "killed by SIGKILL (out of memory?)"},
    ]
    lines = backbone_bench.format_table(records).splitlines()
    assert lines[0].startswith("batch 16, float32, phase 2 from top:2")
    assert lines[0].endswith("Some CPU (avx512f)")
    assert lines[2] == ("| backbone | family | params | image size | forward img/s | phase-2 step img/s "
                        "| peak RSS |")
    assert lines[4] == "| resnet50 | resnet | 24.1M | 224 | 41.3 | 7.31 | 2,346 MiB |"
    assert lines[5] == ("| convnext_tiny | convnext | - | 224 | failed: killed by SIGKILL (out of memory?) "
                        "| - | 9,000 MiB |")


def test_hub_presets_are_measured_at_the_sizes_given():
    pytest.importorskip("keras_hub", reason='KerasHub is an optional extra: pip install -e ".[hub]"')
    assert backbone_bench.parse_backbones(["tiny", "hub:dinov2_small"]) == ["tiny", "hub:dinov2_small"]
    # A preset's own size is in its image converter, which only a download gives: default is ViT's 224.
    assert backbone_bench.image_sizes("hub:dinov2_small", ["min", "default", "98"]) == [32, 224, 98]
    with pytest.raises(UserError, match="needs a KerasHub preset.*Received: bench_backbones=hub:$"):
        backbone_bench.parse_backbones(["hub:"])


@pytest.mark.slow
def test_two_backbones_each_measured_in_its_own_process(tmp_path):
    out = tmp_path / "backbones.json"
    result = _bench("--bench_backbones=tiny,mobilenet_v3_small", "--bench_sizes=min", "--bench_steps=1",
                    "--bench_warmup_steps=1", f"--bench_json={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(out.read_text())
    model_name, flags = distribute.cpu_info()
    assert written["cpu"]["cpu_model"] == model_name
    records = written["records"]
    assert [(r["backbone"], r["image_size"]) for r in records] == [("tiny", 32), ("mobilenet_v3_small", 32)]
    for record in records:
        name = record["backbone"]
        assert record["error"] is None
        assert record["forward_img_per_s"] > 0 and record["phase2_train_img_per_s"] > 0
        assert record["peak_rss_mib"] > record["baseline_rss_mib"] > 0
        assert record["build_seconds"] > 0 and record["compile_seconds"] > 0
        assert (record["batch"], record["precision"], record["fine_tune_at"]) == (16, "float32", "top:2")
        assert record["cpu_flags"] == [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile",
                                                   "amx_int8") if f in flags]
        # The same classifier built here: its parameters, and those phase 2 trains.
        model = classifier.build_classifier(name, 32, backbone_bench.CLASSES, "none")
        assert record["params"] == model.count_params()
        assert record["backbone_params"] == registry.BACKBONES[name].parameters
        classifier.unfreeze_backbone(model, "top:2")
        assert record["trainable_params"] == sum(int(w.numpy().size) for w in model.trainable_weights)
        assert 0 < record["trainable_params"] < record["params"]
    assert "| backbone | family | params | image size | forward img/s | phase-2 step img/s | peak RSS |" \
        in result.stderr
    assert "| mobilenet_v3_small | mobilenet_v3 | " in result.stderr


@pytest.mark.slow
def test_unknown_backbone_is_one_line():
    result = _bench("--bench_backbones=tiny,resnet5")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "did you mean resnet50" in lines[0] and lines[0].endswith("Received: bench_backbones=resnet5")


@pytest.mark.slow
def test_a_keras_hub_preset_directory_is_measured(tmp_path):
    keras_hub = pytest.importorskip("keras_hub", reason='KerasHub is an optional extra: pip install -e ".[hub]"')
    preset = str(tmp_path / "tiny_vit")
    keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
                                 hidden_dim=16, mlp_dim=32).save_to_preset(preset)
    keras_hub.layers.ViTImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0).save_to_preset(preset)
    out = tmp_path / "backbones.json"
    result = _bench(f"--bench_backbones=hub:{preset}", "--bench_sizes=32", "--bench_steps=1",
                    "--bench_warmup_steps=1", f"--bench_json={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = json.loads(out.read_text())["records"]
    assert record["error"] is None, record["error"]
    assert (record["backbone"], record["family"], record["image_size"]) == (f"hub:{preset}", "keras_hub", 32)
    assert record["forward_img_per_s"] > 0 and record["phase2_train_img_per_s"] > 0
    assert 0 < record["trainable_params"] < record["params"]
    assert f"| hub:{preset} | keras_hub | " in result.stderr
