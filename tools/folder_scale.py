"""`python -m tools.folder_scale`: how a large class-folder dataset scales, up to the first training batch.

It writes --scale_images small JPEGs in 10 class folders (once; a complete folder is reused), then
measures, in this process: the up-front check of every file (`load_folder`), the same check again (an
unchanged folder, which a check memo can answer), the time to the first training batch of
`pipeline.build_train_dataset`, and optionally a full pass over the epoch, with the peak RSS after each.
Generation runs in worker processes, so it does not count in this process's peak RSS.
"""

import json
import multiprocessing
import os
import resource
import sys
import time

from absl import app
from absl import flags
from absl import logging

from tl_keras import files
from tl_keras.errors import UserError

flags.DEFINE_integer("scale_images", 100_000, "Images to generate and load.")
flags.DEFINE_string("scale_dir", "/tmp/folder_scale",
                    "Where the generated dataset lives (reused if complete).")
flags.DEFINE_integer("scale_side", 48, "Approximate side of the generated images, in pixels.")
flags.DEFINE_integer("scale_image_size", 32, "The training image size (pixels) the pipeline resizes to.")
flags.DEFINE_integer("scale_batch_size", 32, "Training batch size.")
flags.DEFINE_integer("scale_steps", 0, "Training batches to read after the first (-1: the whole epoch).")
flags.DEFINE_string("scale_check_cache_dir", None,
                    "Passed to load_folder as check_cache_dir (a memo of checked files); unset: no memo.")
flags.DEFINE_string("scale_json", None, "Also write the results to this JSON file.")

CLASSES = 10


def _write_class(args):
    """Write one class's images; runs in a worker process."""
    import numpy as np
    from PIL import Image

    directory, label, count, side = args
    rng = np.random.default_rng(label)
    os.makedirs(directory, exist_ok=True)
    for i in range(count):
        h, w = side + int(rng.integers(-8, 9)), side + int(rng.integers(-8, 9))
        pixels = np.clip(label * 25 + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(directory, f"{i:06d}.jpg"), "JPEG", quality=90)
    return count


def generate(root: str, num_images: int, side: int) -> str:
    """The folder of images for (num_images, side), written now unless a complete one exists."""
    images = os.path.join(root, f"images_{num_images}_{side}")
    marker = images + ".complete.json"
    if os.path.exists(marker):
        logging.info("Reusing %s.", images)
        return images
    start = time.perf_counter()
    per_class = [num_images // CLASSES + (c < num_images % CLASSES) for c in range(CLASSES)]
    jobs = [(os.path.join(images, f"class_{c}"), c, n, side) for c, n in enumerate(per_class)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        written = sum(pool.map(_write_class, jobs))
    files.write_json(marker, {"images": written, "side": side})
    logging.info("Wrote %d images to %s in %.0f s.", written, images, time.perf_counter() - start)
    return images


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.


def measure(root: str, image_size: int, batch_size: int, steps: int, check_cache_dir: str | None) -> dict:
    from tl_keras.data import folder_dataset
    from tl_keras.data import pipeline
    from tl_keras.model import backbones

    extra = {"check_cache_dir": check_cache_dir} if check_cache_dir else {}
    results = {"rss_mb_at_start": peak_rss_mb()}
    start = time.perf_counter()
    splits = folder_dataset.load_folder(root, 0.1, 0.1, seed=0, **extra)
    results["check_seconds"] = time.perf_counter() - start
    results["peak_rss_mb_after_check"] = peak_rss_mb()
    start = time.perf_counter()
    folder_dataset.load_folder(root, 0.1, 0.1, seed=0, **extra)
    results["check_again_seconds"] = time.perf_counter() - start
    results["num_train"] = splits.num_train

    preprocess = backbones.get_preprocessing("tiny", image_size)
    steps_per_epoch = pipeline.steps_for(splits.num_train, batch_size)
    start = time.perf_counter()
    batches = iter(pipeline.build_train_dataset(splits.train, preprocess, batch_size, splits.num_classes,
                                                "flip_translate", 0, steps_per_epoch=steps_per_epoch))
    next(batches)
    results["first_batch_seconds"] = time.perf_counter() - start
    results["peak_rss_mb_after_first_batch"] = peak_rss_mb()
    more = steps_per_epoch - 1 if steps < 0 else steps
    if more:
        start = time.perf_counter()
        for _ in range(more):
            next(batches)
        results["more_batches"] = more
        results["more_batches_seconds"] = time.perf_counter() - start
        results["peak_rss_mb_after_more_batches"] = peak_rss_mb()
    return results


def main(argv):
    if len(argv) > 1:
        sys.exit(f"tools.folder_scale: error: unexpected arguments {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    f = flags.FLAGS
    try:
        if f.scale_images < CLASSES:
            raise UserError(f"--scale_images must be at least {CLASSES}. "
                            f"Received: scale_images={f.scale_images}")
        root = generate(f.scale_dir, f.scale_images, f.scale_side)
        results = {"images": f.scale_images, "side": f.scale_side, "image_size": f.scale_image_size,
                   "check_cache_dir": f.scale_check_cache_dir,
                   **measure(root, f.scale_image_size, f.scale_batch_size, f.scale_steps,
                             f.scale_check_cache_dir)}
    except UserError as e:
        sys.exit(f"tools.folder_scale: error: {e}")
    text = json.dumps(results, indent=2, sort_keys=True)
    print(text)  # The measurements are this command's product.
    if f.scale_json:
        files.write_json(f.scale_json, results)


if __name__ == "__main__":
    app.run(main)
