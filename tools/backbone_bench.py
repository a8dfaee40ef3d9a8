"""`python -m tools.backbone_bench`: one backbone's speed and memory at one image size, in this process.

`python -m tools.bench --bench_backbones=...` runs it once per (backbone, image size), each in a process of
its own, so that the peak RSS is that model's alone and one model's failure (out of memory) is one row of
the table, not the end of it. No dataset and no downloads: random weights (--weights=none), random uint8
images and random labels, since only the speed matters.

After --bench_warmup_steps calls (the first traces and compiles), it times --bench_steps calls of
- the forward pass: the classifier's inference on uint8 images through the backbone's own preprocessing,
  as the export serves them;
- the phase-2 train step: the classifier that the trainer builds (stages.build: small-map convolutions
  as matmuls on CPU), unfrozen from --fine_tune_at (classifier.unfreeze_backbone) and compiled by
  schedule.compile_classifier, on preprocessed images and random labels;
and records the parameters (total, and trainable in phase 2), the peak RSS (and the baseline: this process
after importing TensorFlow), and the wall time of the build and of the compile (compile() and the first,
tracing, step). Every other setting is the trainer's
flag of the same name; --mixed_precision=auto resolves as in training.
"""

import difflib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags as absl_flags
from absl import logging

from tl_keras import config as config_lib
from tl_keras import files
from tl_keras import flags
from tl_keras.errors import UserError
from tl_keras.model import registry

# Shared with tools.bench, which imports this module and runs it per backbone.
absl_flags.DEFINE_integer("bench_steps", 5, "Timed forward calls and phase-2 train steps per backbone.")
absl_flags.DEFINE_integer("bench_warmup_steps", 2,
                          "Untimed calls before them; the first traces and compiles (its time is recorded).")
absl_flags.DEFINE_string("bench_record", None,
                         "tools.backbone_bench: write its one record here as JSON (default: print it).")

CLASSES = 10  # The head's classes, as CIFAR-10's.
MIN_SIDE = 32  # --bench_sizes=min: this side, or the backbone's minimum if larger.
FAMILIES = "families"  # --bench_backbones=families: the smallest backbone of each family.
SIZE_MIN, SIZE_DEFAULT = "min", "default"
# hub:PRESET's default size: a preset's own is in its image converter, which only a download gives; 224
# is ViT's and that of most KerasHub image presets.
HUB_DEFAULT_SIDE = 224
HUB_FAMILY = "keras_hub"
# The trainer's default --fine_tune_at, block4_conv1, names VGG layers; for VGG16 it is top:2, which
# every backbone has.
DEFAULT_FINE_TUNE_AT = "top:2"
_ERROR_PREFIX = "tools.backbone_bench: error: "
COLUMNS = ("backbone", "family", "params", "image size", "forward img/s", "phase-2 step img/s", "peak RSS")


def smallest_per_family() -> list[str]:
    """The backbone with the fewest parameters of each keras.applications family, in the registry's
    family order (the test-only tiny has no application and is left out)."""
    smallest = {}
    for name, spec in registry.BACKBONES.items():
        if spec.application is None:
            continue
        best = smallest.get(spec.family)
        if best is None or spec.parameters < registry.BACKBONES[best].parameters:
            smallest[spec.family] = name
    return [smallest[family] for family in registry.FAMILIES if family in smallest]


def parse_backbones(names) -> list[str]:
    """--bench_backbones: backbone names and `families`, expanded, each once, in order."""
    backbones = []
    for name in names:
        if registry.is_hub(name):
            if problem := registry.check_backbone(name):
                raise UserError(f"{problem}. Received: bench_backbones={name}")
        elif name != FAMILIES and name not in registry.BACKBONES:
            near = difflib.get_close_matches(name, [FAMILIES, *registry.BACKBONES], n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            raise UserError(f"--bench_backbones takes {FAMILIES} or names that --backbone=list prints{hint}. "
                            f"Received: bench_backbones={name}")
        for backbone in smallest_per_family() if name == FAMILIES else [name]:
            if backbone not in backbones:
                backbones.append(backbone)
    if not backbones:
        raise UserError(f"--bench_backbones must name at least one backbone, or {FAMILIES}. "
                        f"Received: bench_backbones={','.join(names)}")
    return backbones


def image_sizes(backbone: str, sizes) -> list[int]:
    """--bench_sizes for `backbone`: min (MIN_SIDE, raised to the backbone's minimum), default (its
    ImageNet weights' size; HUB_DEFAULT_SIDE for hub presets) or a number (raised to the minimum too),
    each once, in order."""
    result = []
    for size in sizes:
        if size == SIZE_MIN:
            side = MIN_SIDE
        elif size == SIZE_DEFAULT:
            side = (HUB_DEFAULT_SIDE if registry.is_hub(backbone)
                    else registry.BACKBONES[backbone].default_image_size)
        else:
            try:
                side = int(size)
            except ValueError:
                side = 0
            if side < 1:
                raise UserError(f"--bench_sizes takes {SIZE_MIN}, {SIZE_DEFAULT} or positive numbers of "
                                f"pixels. Received: bench_sizes={size}")
        side = max(side, registry.min_image_size(backbone))
        if side not in result:
            result.append(side)
    if not result:
        raise UserError(f"--bench_sizes must name at least one size. Received: bench_sizes={','.join(sizes)}")
    return result


def family(backbone: str) -> str:
    return HUB_FAMILY if registry.is_hub(backbone) else registry.BACKBONES[backbone].family


def check_steps(steps: int, warmup_steps: int):
    if steps < 1 or warmup_steps < 1:
        raise UserError(f"--bench_steps and --bench_warmup_steps must be positive. Received: "
                        f"bench_steps={steps}, bench_warmup_steps={warmup_steps}")


def measure(config, steps: int, warmup_steps: int) -> dict:
    """Time the forward pass and the phase-2 step of config's classifier on random data, in this process."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tl_keras.model import backbones
    from tl_keras.model import blocks
    from tl_keras.model import classifier
    from tl_keras.training import distribute
    from tl_keras.training import schedule
    from tl_keras.training import stages

    baseline_rss = _peak_rss_mib()
    keras.utils.set_random_seed(config.seed)
    strategy = tf.distribute.get_strategy()
    precision = distribute.resolve_precision(config.mixed_precision, strategy)
    keras.mixed_precision.set_global_policy(precision)
    batch = config.batch_size
    record = {"backbone": config.backbone, "family": family(config.backbone),
              "image_size": config.image_size, "batch": batch, "classes": CLASSES, "precision": precision,
              "fine_tune_at": config.fine_tune_at, "backbone_bn": config.backbone_bn,
              "warmup_steps": warmup_steps, "steps": steps}

    start = time.perf_counter()
    with strategy.scope():
        model = stages.build(config, CLASSES, strategy, "none")
    record["build_seconds"] = time.perf_counter() - start
    record["params"] = model.count_params()
    record["backbone_params"] = model.get_layer(blocks.BACKBONE).count_params()

    rng = np.random.default_rng(config.seed)
    pixels = tf.constant(rng.integers(0, 256, (batch, config.image_size, config.image_size, 3), np.uint8))
    preprocess = backbones.get_preprocessing(config.backbone, config.image_size)

    @tf.function
    def forward(images):  # As the export's serving function: uint8 in, preprocessing inside.
        return model(preprocess(images), training=False)

    record["forward_compile_seconds"], record["forward_img_per_s"] = _time_calls(
        lambda: forward(pixels).numpy(), batch, steps, warmup_steps)

    images = preprocess(pixels)  # What the training pipeline feeds the classifier.
    labels = tf.one_hot(rng.integers(0, CLASSES, batch), CLASSES)
    # The fine-tuning schedule's shape (no warmup: the rate does not change a step's time); auto's rate
    # would need a range test, so the default stands in for it.
    peak = config.finetune_learning_rate
    if peak == config_lib.AUTO:
        peak = config_lib.Config.finetune_learning_rate
    rate = schedule.warmup_cosine(peak, 0, warmup_steps + steps)
    start = time.perf_counter()
    with strategy.scope():
        classifier.unfreeze_backbone(model, config.fine_tune_at)
        schedule.compile_classifier(model, rate, config, CLASSES, layerwise=model)
    compile_seconds = time.perf_counter() - start
    record["trainable_params"] = int(sum(np.prod(weight.shape) for weight in model.trainable_weights))
    first_step, record["phase2_train_img_per_s"] = _time_calls(
        lambda: model.train_on_batch(images, labels), batch, steps, warmup_steps)
    record["compile_seconds"] = compile_seconds + first_step
    record["baseline_rss_mib"] = baseline_rss
    record["peak_rss_mib"] = _peak_rss_mib()
    record["error"] = None
    return record


def _time_calls(call, batch: int, steps: int, warmup_steps: int) -> tuple[float, float]:
    """(seconds of the first call, img/s of `steps` calls after `warmup_steps` untimed ones). `call`
    must return only once its work is done."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    for _ in range(warmup_steps - 1):
        call()
    start = time.perf_counter()
    for _ in range(steps):
        call()
    return first, steps * batch / (time.perf_counter() - start)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB.


def run_all(backbones, sizes, child_flags, json_path: str, cpu: dict) -> list[dict]:
    """Measure every (backbone, size), each in a child process, writing {"cpu", "records"} to
    `json_path` after each one, so that an interrupted table keeps its rows. `child_flags` are trainer
    and benchmark flags for every child."""
    jobs = [(backbone, size) for backbone in backbones for size in image_sizes(backbone, sizes)]
    records = []
    with tempfile.TemporaryDirectory(prefix="tl_keras_backbone_bench_") as tmp:
        for i, (backbone, size) in enumerate(jobs, start=1):
            logging.info("[%d/%d] %s at %d px...", i, len(jobs), backbone, size)
            record = _run_child(backbone, size, child_flags, tmp)
            record.update(cpu_model=cpu["cpu_model"], cpu_flags=cpu["cpu_flags"])
            records.append(record)
            if record["error"]:
                logging.warning("%s at %d px failed: %s", backbone, size, record["error"])
            else:
                logging.info("%s at %d px: forward %.1f img/s, phase-2 step %.1f img/s, peak RSS %.0f MiB "
                             "(%.0f s).", backbone, size, record["forward_img_per_s"],
                             record["phase2_train_img_per_s"], record["peak_rss_mib"], record["wall_seconds"])
            files.write_json(json_path, {"cpu": cpu, "records": records})
    return records


def _run_child(backbone: str, image_size: int, child_flags, tmp: str) -> dict:
    """One record from `python -m tools.backbone_bench`, or a row with the child's error and the peak RSS
    the kernel reported for it (os.wait4: that child's alone)."""
    stem = os.path.join(tmp, re.sub(r"[^\w.-]", "_", f"{backbone}_{image_size}"))  # hub:PATH has slashes.
    record_path, log_path = f"{stem}.json", f"{stem}.log"
    command = [sys.executable, "-m", "tools.backbone_bench", *child_flags, f"--backbone={backbone}",
               f"--image_size={image_size}", f"--bench_record={record_path}"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if returncode == 0 and (record := files.read_json(record_path)) is not None:
        return dict(record, wall_seconds=wall)
    with open(log_path) as f:
        lines = [line.strip() for line in f if line.strip()]
    if returncode < 0:
        error = f"killed by {signal.Signals(-returncode).name}"
        error += " (out of memory?)" if returncode == -signal.SIGKILL else ""
    else:  # A UserError's one line, or a traceback's last.
        error = (lines[-1] if lines else f"exit status {returncode}").removeprefix(_ERROR_PREFIX)[:300]
    if lines:
        logging.warning("The end of %s's output:\n%s", backbone, "\n".join(lines[-15:]))
    return {"backbone": backbone, "family": family(backbone), "image_size": image_size,
            "error": error, "peak_rss_mib": usage.ru_maxrss / 1024, "wall_seconds": wall}


def format_table(records) -> str:
    """The records as the README's Markdown table, under a line with what they share."""
    first = next((r for r in records if not r["error"]), None)
    lines = []
    if first is not None:
        flags_seen = " ".join(first["cpu_flags"]) if first.get("cpu_flags") else "no bf16-related flags"
        lines.append(f"batch {first['batch']}, {first['precision']}, phase 2 from {first['fine_tune_at']} "
                     f"(--backbone_bn={first['backbone_bn']}), {first['classes']} classes, random weights; "
                     f"{first.get('cpu_model', 'unknown CPU')} ({flags_seen})")
        lines.append("")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + " --- |" * len(COLUMNS))
    for r in records:
        if r["error"]:
            cells = ["-", str(r["image_size"]), f"failed: {r['error']}", "-"]
        else:
            cells = [_count(r["params"]), str(r["image_size"]), _rate(r["forward_img_per_s"]),
                     _rate(r["phase2_train_img_per_s"])]
        rss = "-" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:,.0f} MiB"
        lines.append("| " + " | ".join([r["backbone"], r["family"], *cells, rss]) + " |")
    return "\n".join(lines)


def _count(parameters: int) -> str:
    return f"{parameters / 1e6:.1f}M" if parameters >= 100_000 else f"{parameters:,}"


def _rate(img_per_s: float) -> str:
    if img_per_s >= 100:
        return f"{img_per_s:,.0f}"
    return f"{img_per_s:.1f}" if img_per_s >= 10 else f"{img_per_s:.2f}"


def main(argv):
    del argv  # flags.parse refuses positional arguments.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    flag_values = flags.FLAGS
    try:
        check_steps(flag_values.bench_steps, flag_values.bench_warmup_steps)
        flag_values.model_dir = flag_values.model_dir or "unused"  # Config requires one; nothing is written.
        config = flags.get_config()
        record = measure(config, flag_values.bench_steps, flag_values.bench_warmup_steps)
    except UserError as e:
        sys.exit(f"{_ERROR_PREFIX}{e}")
    if flag_values.bench_record:
        files.write_json(flag_values.bench_record, record)
    else:
        print(json.dumps(record, indent=2))  # The record is this command's product.


if __name__ == "__main__":
    app.run(main, flags_parser=flags.parse)
