"""`python -m tools.bench`: phase 1 of tl_keras against the plain recipe, side by side, same data.

The plain recipe is what blog posts teach: the dataset as numpy arrays in memory and `model.fit`
with batch 32 on the classifier, so the frozen backbone runs again at every step of every epoch.
tl_keras runs the backbone once (feature extraction), then trains the head on stored features.
It also times a phase-2 train step with TF's convolutions against the same step with small-map
convolutions as matmuls (matmul_conv, what training uses on CPU), in alternating rounds.
Absolute img/s vary a lot on shared machines; the ratios, measured in one process, are the headline.
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

# The benchmark's own flags, beside the trainer's (which give the recipe it measures); defined here so
# that they stay out of the trainer's --helpfull.
absl_flags.DEFINE_integer("bench_examples", 10_000, "Training examples the benchmark uses.")
absl_flags.DEFINE_string("bench_json", "bench.json", "Where the benchmark writes its JSON results.")
absl_flags.DEFINE_integer("bench_plain_epochs", 1,
                          "Epochs of the plain recipe actually run; its phase-1 time is scaled to "
                          "--head_epochs from their mean (it is the slow side).")
absl_flags.DEFINE_integer("bench_phase2_steps", 20, "Timed phase-2 train steps (after 3 warm-up steps).")


def run_benchmark(config, num_examples: int, plain_epochs: int = 1, phase2_steps: int = 20) -> dict:
    """Measure everything in this process on the same `num_examples` training images."""
    import keras
    import numpy as np

    from tl_keras.data import feature_cache
    from tl_keras.data import pipeline as input_pipeline
    from tl_keras.data import tfds_dataset
    from tl_keras.model import backbones
    from tl_keras.model import classifier
    from tl_keras.model import matmul_conv
    from tl_keras.training import phases

    keras.utils.set_random_seed(config.seed)
    splits = tfds_dataset.load_tfds(config.dataset, config.data_dir, config.train_split,
                                    config.test_split, 0.0, config.seed)
    n = min(num_examples, splits.num_train)
    examples = splits.train.take(n).cache()
    classes = splits.num_classes
    preprocess = backbones.get_preprocessing(config.backbone, config.image_size)
    results = {"examples": n, "image_size": config.image_size, "backbone": config.backbone,
               "batch_size": config.batch_size, "head_epochs": config.head_epochs}

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
    plain = classifier.build_classifier(config.backbone, config.image_size, classes, config.weights,
                                        config.head_units, config.head_batchnorm, config.dropout)
    phases.compile_classifier(plain, config.head_learning_rate, config, classes)
    timer = _EpochTimer()
    plain.fit(images, labels, batch_size=32, epochs=plain_epochs, callbacks=[timer], verbose=0)
    plain_epoch = float(np.mean(timer.seconds))
    results["plain_epoch_seconds"] = plain_epoch
    results["plain_epochs_measured"] = plain_epochs
    results["plain_phase1_seconds"] = plain_epoch * config.head_epochs
    del plain

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
        phases.compile_classifier(head, config.head_learning_rate, config, classes,
                                  steps_per_execution=phases.steps_per_execution(steps))
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
    phases.compile_classifier(model, config.finetune_learning_rate, config, classes)
    images_ds = input_pipeline.build_train_dataset(
        examples, preprocess, config.batch_size, classes, config.augment, config.seed)

    # 5. The same step with small-map convolutions as matmuls (what training uses on CPU), timed
    # in alternating rounds with the native one so that machine noise hits both alike.
    fast = classifier.build_classifier(config.backbone, config.image_size, classes, "none",
                                       config.head_units, config.head_batchnorm, config.dropout,
                                       matmul_small_convs=True)
    fast.set_weights(model.get_weights())
    classifier.unfreeze_backbone(fast, config.fine_tune_at)
    phases.compile_classifier(fast, config.finetune_learning_rate, config, classes)
    seconds = {"native": 0.0, "matmul": 0.0}
    for candidate in (model, fast):
        candidate.fit(images_ds, steps_per_epoch=3, epochs=1, verbose=0)
    rounds = 2
    for _ in range(rounds):
        for name, candidate in (("native", model), ("matmul", fast)):
            start = time.perf_counter()
            candidate.fit(images_ds, steps_per_epoch=phase2_steps, epochs=1, verbose=0)
            seconds[name] += time.perf_counter() - start
    images_timed = rounds * phase2_steps * config.batch_size
    results["phase2_train_img_per_s"] = images_timed / seconds["native"]
    results["phase2_matmul_train_img_per_s"] = images_timed / seconds["matmul"]
    results["matmul_conv_speedup"] = seconds["native"] / seconds["matmul"]
    results["matmul_conv_layers"] = sum(
        matmul_conv.is_converted(layer) for layer in fast.get_layer("backbone").layers)

    results["phase1_speedup"] = results["plain_phase1_seconds"] / results["tl_keras_phase1_seconds"]
    results["head_epoch_speedup"] = plain_epoch / results["cached_head_epoch_seconds"]
    results["pipeline_vs_train_ratio"] = results["pipeline_img_per_s"] / results["phase2_train_img_per_s"]
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


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
    rows = [
        ("input pipeline", f"{results['pipeline_img_per_s']:.0f} img/s"),
        ("plain recipe: one head epoch", f"{results['plain_epoch_seconds']:.1f} s"),
        (f"plain recipe: phase 1 ({results['head_epochs']} epochs)",
         f"{results['plain_phase1_seconds']:.1f} s"),
        ("tl_keras: feature extraction", f"{results['extraction_seconds']:.1f} s"
                                         f" ({results['extraction_img_per_s']:.0f} img/s)"),
        ("tl_keras: one head epoch", f"{results['cached_head_epoch_seconds']:.2f} s"),
        (f"tl_keras: phase 1 ({results['head_epochs']} epochs)",
         f"{results['tl_keras_phase1_seconds']:.1f} s"),
        ("phase-2 train step", f"{results['phase2_train_img_per_s']:.0f} img/s"),
        (f"phase-2 step, {results['matmul_conv_layers']} convs as matmuls",
         f"{results['phase2_matmul_train_img_per_s']:.0f} img/s"),
        ("matmul_conv_speedup", f"{results['matmul_conv_speedup']:.2f}x"),
        ("phase1_speedup", f"{results['phase1_speedup']:.1f}x"),
        ("head_epoch_speedup", f"{results['head_epoch_speedup']:.1f}x"),
        ("pipeline_vs_train_ratio", f"{results['pipeline_vs_train_ratio']:.1f}x"),
        ("peak_rss_mb", f"{results['peak_rss_mb']:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    header = (f"{results['examples']} examples, {results['image_size']}px, {results['backbone']}, "
              f"batch {results['batch_size']}")
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
        results = run_benchmark(config, flags.FLAGS.bench_examples, flags.FLAGS.bench_plain_epochs,
                                flags.FLAGS.bench_phase2_steps)
    except UserError as e:
        sys.exit(f"tools.bench: error: {e}")
    table = format_table(results)
    print(table)  # The table is this command's product.
    files.write_json(flags.FLAGS.bench_json, results)
    logging.info("Wrote %s", flags.FLAGS.bench_json)


if __name__ == "__main__":
    app.run(main, flags_parser=flags.parse)
