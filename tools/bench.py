"""`python -m tools.bench`: phase 1 of tl_keras against the plain recipe, side by side, same data.

The plain recipe is what blog posts teach: the dataset as numpy arrays in memory and `model.fit`
with batch 32 on the classifier, so the frozen backbone runs again at every step of every epoch.
tl_keras runs the backbone once (feature extraction), then trains the head on stored features.
It also times a phase-2 train step with TF's convolutions against the same step with small-map
convolutions as matmuls (matmul_conv, what training uses on CPU), and float32 against mixed_bfloat16
for the forward pass and that step, all in alternating rounds, beside the CPU features that decide
whether `--mixed_precision=auto` picks bf16.
Absolute img/s vary a lot on shared machines; the ratios, measured in one process, are the headline.

With --bench_backbones it measures backbones instead, with no dataset: the forward and phase-2 step
img/s, parameters and peak RSS of each at each of --bench_sizes, each in a process of its own
(tools/backbone_bench.py), as a Markdown table and JSON.
"""

import os
import resource
import sys
import tempfile
import time

from absl import app
from absl import flags as absl_flags
from absl import logging

from tl_keras import files
from tl_keras import flags
from tl_keras.errors import UserError
from tools import backbone_bench

# The benchmark's own flags, beside the trainer's (which give the recipe it measures); defined here so
# that they stay out of the trainer's --helpfull.
absl_flags.DEFINE_integer("bench_examples", 10_000, "Training examples the benchmark uses.")
absl_flags.DEFINE_string("bench_json", "bench.json", "Where the benchmark writes its JSON results.")
absl_flags.DEFINE_integer("bench_plain_epochs", 1,
                          "Epochs of the plain recipe actually run; its phase-1 time is scaled to "
                          "--head_epochs from their mean (it is the slow side).")
absl_flags.DEFINE_integer("bench_phase2_steps", 20, "Timed phase-2 train steps (after 3 warm-up steps).")
absl_flags.DEFINE_boolean("bench_plain", True,
                          "Run the plain recipe. It dominates the benchmark's time; false leaves its rows "
                          "and ratios null, to measure the rest quickly.")
absl_flags.DEFINE_boolean("bench_bf16", True,
                          "Time mixed_bfloat16 beside float32. false leaves the bf16 rows null: without "
                          "oneDNN's bf16 kernels (ONEDNN_MAX_CPU_ISA=AVX2) a bf16 step can take minutes.")

absl_flags.DEFINE_list("bench_backbones", [],
                       f"Measure these backbones instead (no dataset): names, hub:PRESET, or "
                       f"{backbone_bench.FAMILIES} for the smallest of each keras.applications family. "
                       "Each runs in its own process.")
absl_flags.DEFINE_list("bench_sizes", [backbone_bench.SIZE_MIN, backbone_bench.SIZE_DEFAULT],
                       f"--bench_backbones: image sides, each {backbone_bench.SIZE_MIN} "
                       f"({backbone_bench.MIN_SIDE} px, or the backbone's minimum if larger), "
                       f"{backbone_bench.SIZE_DEFAULT} (its ImageNet weights' size; "
                       f"{backbone_bench.HUB_DEFAULT_SIDE} for hub:PRESET) or a number.")
absl_flags.DEFINE_integer("bench_batch", 16, "--bench_backbones: the batch of the forward pass and the step.")
absl_flags.adopt_module_key_flags(backbone_bench)  # --bench_steps, --bench_warmup_steps: listed in -h.
# Trainer flags the backbone benchmark sets for each child itself (the rest given are passed on).
_CHILD_SETS = ("model_dir", "backbone", "image_size", "batch_size", "weights", "mixed_precision",
               "fine_tune_at", "unfreeze_schedule", "finetune_epochs")

# The /proc/cpuinfo flags that bear on bf16; the JSON lists those the CPU has.
BF16_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
FORWARD_BATCH = 128


def run_benchmark(config, num_examples: int, plain_epochs: int = 1, phase2_steps: int = 20,
                  plain: bool = True, bf16: bool = True) -> dict:
    """Measure everything in this process on the same `num_examples` training images."""
    import keras
    import numpy as np

    from tl_keras.data import feature_cache
    from tl_keras.data import pipeline as input_pipeline
    from tl_keras.data import tfds_dataset
    from tl_keras.model import backbones
    from tl_keras.model import classifier
    from tl_keras.model import matmul_conv
    from tl_keras.training import schedule
    from tl_keras.training import stages

    keras.utils.set_random_seed(config.seed)
    splits = tfds_dataset.load_tfds(config.dataset, config.data_dir, config.train_split,
                                    config.test_split, 0.0, config.seed)
    n = min(num_examples, splits.num_train)
    examples = splits.train.take(n).cache()
    classes = splits.num_classes
    preprocess = backbones.get_preprocessing(config.backbone, config.image_size)
    results = {"examples": n, "image_size": config.image_size, "backbone": config.backbone,
               "batch_size": config.batch_size, "head_epochs": config.head_epochs}
    results.update(describe_cpu())

    # The plain recipe's input: every preprocessed image as one numpy array in memory.
    arrays = [(x.numpy(), y.numpy()) for x, y in
              input_pipeline.build_eval_dataset(examples, preprocess, 256, classes, cache=False)]
    images = np.concatenate([a for a, _ in arrays])
    labels = np.concatenate([b for _, b in arrays])
    del arrays

    # 1. Input pipeline throughput (after the first epoch has filled its cache).
    steps = input_pipeline.steps_for(n, config.batch_size)
    pipeline = iter(input_pipeline.build_train_dataset(
        examples, preprocess, config.batch_size, classes, config.augment, config.seed))
    for _ in range(steps):
        next(pipeline)
    start = time.perf_counter()
    for _ in range(steps):
        next(pipeline)
    results["pipeline_img_per_s"] = n / (time.perf_counter() - start)

    # 2. Plain recipe: frozen backbone recomputed at every step, batch 32.
    plain_epoch = None
    results["plain_epoch_seconds"] = results["plain_phase1_seconds"] = None
    results["plain_epochs_measured"] = plain_epochs if plain else 0
    if plain:
        plain_model = classifier.build_classifier(config.backbone, config.image_size, classes,
                                                  config.weights, config.head_units, config.head_batchnorm,
                                                  config.dropout)
        schedule.compile_classifier(plain_model, config.head_learning_rate, config, classes)
        timer = _EpochTimer()
        plain_model.fit(images, labels, batch_size=32, epochs=plain_epochs, callbacks=[timer], verbose=0)
        plain_epoch = float(np.mean(timer.seconds))
        results["plain_epoch_seconds"] = plain_epoch
        results["plain_phase1_seconds"] = plain_epoch * config.head_epochs
        del plain_model

    # 3. tl_keras: extract pooled features once, then train the head on them.
    model = classifier.build_classifier(config.backbone, config.image_size, classes, config.weights,
                                        config.head_units, config.head_batchnorm, config.dropout)
    with tempfile.TemporaryDirectory() as tmp:
        cache = feature_cache.FeatureCache(tmp, {"bench": True})
        start = time.perf_counter()
        extractor = classifier.build_extractor(model, [classifier.HEAD_INPUT])
        batches = input_pipeline.build_eval_dataset(examples, preprocess, config.batch_size, classes,
                                                    cache=False)
        (features,) = cache.get([classifier.HEAD_INPUT], "train", False, extractor, batches, n)
        features = np.array(features)
        extraction = time.perf_counter() - start
        head = classifier.build_model_from(model, classifier.HEAD_INPUT)
        schedule.compile_classifier(head, config.head_learning_rate, config, classes,
                                    steps_per_execution=stages.steps_per_execution(steps))
        timer = _EpochTimer()
        head.fit(feature_cache.train_dataset(features, cache.labels("train"), classes, config.batch_size,
                                             config.seed),
                 epochs=config.head_epochs, steps_per_epoch=steps, callbacks=[timer], verbose=0)
    results["extraction_seconds"] = extraction
    results["extraction_img_per_s"] = n / extraction
    results["cached_head_epoch_seconds"] = float(np.median(timer.seconds))
    results["tl_keras_phase1_seconds"] = extraction + float(np.sum(timer.seconds))

    # 4. Phase-2 train step on images (backbone unfrozen from fine_tune_at).
    classifier.unfreeze_backbone(model, config.fine_tune_at)
    schedule.compile_classifier(model, config.finetune_learning_rate, config, classes)
    images_ds = input_pipeline.build_train_dataset(
        examples, preprocess, config.batch_size, classes, config.augment, config.seed)

    # 5. The same step with small-map convolutions as matmuls (what training uses on CPU), and both
    # forms again under mixed_bfloat16, timed in alternating rounds so that machine noise hits all alike.
    weights = model.get_weights()
    candidates = {"native": model,
                  "matmul": _phase2_model(config, classes, weights, matmul=True, policy="float32")}
    if bf16:
        for name, matmul in (("bf16_native", False), ("bf16_matmul", True)):
            candidates[name] = _phase2_model(config, classes, weights, matmul, policy="mixed_bfloat16")
    seconds = dict.fromkeys(candidates, 0.0)
    for candidate in candidates.values():
        candidate.fit(images_ds, steps_per_epoch=3, epochs=1, verbose=0)
    rounds = 2
    for _ in range(rounds):
        for name, candidate in candidates.items():
            start = time.perf_counter()
            candidate.fit(images_ds, steps_per_epoch=phase2_steps, epochs=1, verbose=0)
            seconds[name] += time.perf_counter() - start
    images_timed = rounds * phase2_steps * config.batch_size
    rate = {name: images_timed / s for name, s in seconds.items()}
    results["phase2_train_img_per_s"] = rate["native"]
    results["phase2_matmul_train_img_per_s"] = rate["matmul"]
    results["matmul_conv_speedup"] = seconds["native"] / seconds["matmul"]
    results["matmul_conv_layers"] = sum(
        matmul_conv.is_converted(layer) for layer in candidates["matmul"].get_layer("backbone").layers)
    # bf16 against float32 in the form training uses on CPU (small-map convolutions as matmuls).
    results["phase2_bf16_train_img_per_s"] = rate.get("bf16_native")
    results["phase2_bf16_matmul_train_img_per_s"] = rate.get("bf16_matmul")
    results["bf16_train_speedup"] = _ratio(seconds["matmul"], seconds.get("bf16_matmul"))
    results["matmul_conv_speedup_bf16"] = _ratio(seconds.get("bf16_native"), seconds.get("bf16_matmul"))

    # 6. The forward pass (inference, as feature extraction runs it) at batch 128 of the same images,
    # float32 against bf16, in alternating rounds.
    batch = np.resize(images, (FORWARD_BATCH,) + images.shape[1:])  # Repeats a subset smaller than 128.
    forward = {"float32": candidates["matmul"]}
    if bf16:
        forward["bf16"] = candidates["bf16_matmul"]
    forward_seconds = dict.fromkeys(forward, 0.0)
    for candidate in forward.values():
        candidate.predict_on_batch(batch)
    forward_batches = max(1, phase2_steps // 2)
    for _ in range(rounds):
        for name, candidate in forward.items():
            start = time.perf_counter()
            for _ in range(forward_batches):
                candidate.predict_on_batch(batch)
            forward_seconds[name] += time.perf_counter() - start
    forward_images = rounds * forward_batches * FORWARD_BATCH
    results["forward_img_per_s"] = forward_images / forward_seconds["float32"]
    results["forward_bf16_img_per_s"] = forward_images / forward_seconds["bf16"] if bf16 else None
    results["bf16_forward_speedup"] = _ratio(forward_seconds["float32"], forward_seconds.get("bf16"))

    results["phase1_speedup"] = _ratio(results["plain_phase1_seconds"], results["tl_keras_phase1_seconds"])
    results["head_epoch_speedup"] = _ratio(plain_epoch, results["cached_head_epoch_seconds"])
    results["pipeline_vs_train_ratio"] = results["pipeline_img_per_s"] / results["phase2_train_img_per_s"]
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def describe_cpu() -> dict:
    """The CPU's model, its bf16-related flags, ONEDNN_MAX_CPU_ISA and what --mixed_precision=auto picks."""
    from tl_keras.training import distribute

    cpu_model, cpu_flags = distribute.cpu_info()
    max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or None
    precision, reason = distribute.cpu_precision(cpu_flags, max_isa)
    return {"cpu_model": cpu_model, "cpu_flags": [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags],
            "onednn_max_cpu_isa": max_isa, "auto_cpu_precision": precision,
            "auto_cpu_precision_reason": reason}


def run_backbones(config) -> str:
    """--bench_backbones: measure each backbone in a child process; return the table."""
    flag_values = flags.FLAGS
    backbones = backbone_bench.parse_backbones(flag_values.bench_backbones)
    for backbone in backbones:  # Bad sizes fail now, not after the first backbones.
        backbone_bench.image_sizes(backbone, flag_values.bench_sizes)
    backbone_bench.check_steps(flag_values.bench_steps, flag_values.bench_warmup_steps)
    if flag_values.bench_batch < 1:
        raise UserError(f"--bench_batch must be positive. Received: bench_batch={flag_values.bench_batch}")
    given = {flag.name for flag in flag_values.get_flags_for_module(flags.__name__) if flag.present}
    child_flags = [flag_values[name].serialize() for name in sorted(given - set(_CHILD_SETS))]
    # float32 and the default's stage unless given (block4_conv1, the default, names VGG16's top:2).
    precision = config.mixed_precision if "mixed_precision" in given else "float32"
    fine_tune_at = (config.fine_tune_at if given & {"fine_tune_at", "unfreeze_schedule"}
                    else backbone_bench.DEFAULT_FINE_TUNE_AT)
    child_flags += [f"--batch_size={flag_values.bench_batch}", "--weights=none",
                    f"--mixed_precision={precision}", f"--fine_tune_at={fine_tune_at}",
                    f"--bench_steps={flag_values.bench_steps}",
                    f"--bench_warmup_steps={flag_values.bench_warmup_steps}"]
    records = backbone_bench.run_all(backbones, flag_values.bench_sizes, [f for f in child_flags if f],
                                     flag_values.bench_json, describe_cpu())
    return backbone_bench.format_table(records)


def _phase2_model(config, classes: int, weights, matmul: bool, policy: str):
    """The phase-2 classifier under `policy`; layers take the global policy when they are built."""
    import keras

    from tl_keras.model import classifier
    from tl_keras.training import schedule

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = classifier.build_classifier(config.backbone, config.image_size, classes, "none",
                                            config.head_units, config.head_batchnorm, config.dropout,
                                            matmul_small_convs=matmul)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    model.set_weights(weights)
    classifier.unfreeze_backbone(model, config.fine_tune_at)
    schedule.compile_classifier(model, config.finetune_learning_rate, config, classes)
    return model


def _ratio(numerator, denominator):
    """numerator / denominator, or None where a side was not measured."""
    return None if numerator is None or denominator is None else numerator / denominator


class _EpochTimer:
    """Wall time of each epoch, via the callback protocol (built lazily: keras loads late)."""

    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.seconds = []

            def on_epoch_begin(self, epoch, logs=None):
                self._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.seconds.append(time.perf_counter() - self._start)

        return Timer()


def format_table(results: dict) -> str:
    def cell(key, form, unit=""):
        return "skipped" if results[key] is None else f"{results[key]:{form}}{unit}"

    rows = [
        ("input pipeline", cell("pipeline_img_per_s", ".0f", " img/s")),
        ("plain recipe: one head epoch", cell("plain_epoch_seconds", ".1f", " s")),
        (f"plain recipe: phase 1 ({results['head_epochs']} epochs)",
         cell("plain_phase1_seconds", ".1f", " s")),
        ("tl_keras: feature extraction", f"{results['extraction_seconds']:.1f} s"
                                         f" ({results['extraction_img_per_s']:.0f} img/s)"),
        ("tl_keras: one head epoch", cell("cached_head_epoch_seconds", ".2f", " s")),
        (f"tl_keras: phase 1 ({results['head_epochs']} epochs)",
         cell("tl_keras_phase1_seconds", ".1f", " s")),
        ("phase-2 train step", cell("phase2_train_img_per_s", ".0f", " img/s")),
        (f"phase-2 step, {results['matmul_conv_layers']} convs as matmuls",
         cell("phase2_matmul_train_img_per_s", ".0f", " img/s")),
        ("matmul_conv_speedup", cell("matmul_conv_speedup", ".2f", "x")),
        ("phase1_speedup", cell("phase1_speedup", ".1f", "x")),
        ("head_epoch_speedup", cell("head_epoch_speedup", ".1f", "x")),
        ("pipeline_vs_train_ratio", cell("pipeline_vs_train_ratio", ".1f", "x")),
        (f"forward, batch {FORWARD_BATCH}, float32", cell("forward_img_per_s", ".0f", " img/s")),
        (f"forward, batch {FORWARD_BATCH}, bf16", cell("forward_bf16_img_per_s", ".0f", " img/s")),
        ("phase-2 step, bf16", cell("phase2_bf16_train_img_per_s", ".0f", " img/s")),
        ("phase-2 step, bf16, convs as matmuls", cell("phase2_bf16_matmul_train_img_per_s", ".0f", " img/s")),
        ("bf16_forward_speedup", cell("bf16_forward_speedup", ".2f", "x")),
        ("bf16_train_speedup", cell("bf16_train_speedup", ".2f", "x")),
        ("matmul_conv_speedup_bf16", cell("matmul_conv_speedup_bf16", ".2f", "x")),
        ("peak_rss_mb", cell("peak_rss_mb", ".0f")),
    ]
    width = max(len(name) for name, _ in rows)
    header = (f"{results['examples']} examples, {results['image_size']}px, {results['backbone']}, "
              f"batch {results['batch_size']}\n"
              f"{results['cpu_model']}; {' '.join(results['cpu_flags']) or 'no bf16-related flags'}; "
              f"ONEDNN_MAX_CPU_ISA={results['onednn_max_cpu_isa'] or 'unset'}; "
              f"auto on this CPU: {results['auto_cpu_precision']} ({results['auto_cpu_precision_reason']})")
    return "\n".join([header] + [f"{name:<{width}}  {value}" for name, value in rows])


def main(argv):
    del argv  # flags.parse refuses positional arguments.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    try:
        if flags.FLAGS.model_dir is None:
            flags.FLAGS.model_dir = tempfile.mkdtemp(prefix="tl_keras_bench_")
        config = flags.get_config()
        if flags.FLAGS.bench_examples < 1:
            raise UserError(f"--bench_examples must be positive. Received: bench_examples="
                            f"{flags.FLAGS.bench_examples}")
        if flags.FLAGS.bench_backbones:
            logging.info("Backbones:\n%s", run_backbones(config))
            logging.info("Wrote %s", flags.FLAGS.bench_json)
            return
        results = run_benchmark(config, flags.FLAGS.bench_examples, flags.FLAGS.bench_plain_epochs,
                                flags.FLAGS.bench_phase2_steps, flags.FLAGS.bench_plain,
                                flags.FLAGS.bench_bf16)
    except UserError as e:
        sys.exit(f"tools.bench: error: {e}")
    table = format_table(results)
    print(table)  # The table is this command's product.
    files.write_json(flags.FLAGS.bench_json, results)
    logging.info("Wrote %s", flags.FLAGS.bench_json)


if __name__ == "__main__":
    app.run(main, flags_parser=flags.parse)
