"""--mode=predict: classify image files with an exported SavedModel, as any consumer would.

Only the SavedModel (and its metadata.json) is used, no model code, so this checks the export as much
as it uses it. Each
file is read and decoded here, so one unreadable file is reported and the rest still get answers, and
photos are turned upright by their EXIF orientation, which no TF op reads.
"""

import json
import os

from absl import logging
import numpy as np
import tensorflow as tf

from tl_keras import files
from tl_keras.config import Config
from tl_keras.data import image_files
from tl_keras.errors import UserError, op_message
from tl_keras.serving import deploy
from tl_keras.serving import export as export_lib

UNCERTAIN = "uncertain"


def run(config: Config) -> dict:
    """Print the top-k classes of every image to stdout (and --output_json); return the results."""
    export_dir = find_export(config.model_dir, config.export_dir)
    paths = list_images(config.images)
    logging.info("Classifying %d images with %s.", len(paths), export_dir)
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    class_names = read_labels(export_dir)
    threshold = (deploy.read_metadata(export_dir) or {}).get("confidence_threshold")
    if threshold is not None:
        logging.info("Answers whose top probability is below %.4f, the threshold the export chose for its "
                     "target accuracy, are marked %s.", threshold, UNCERTAIN)
    results = []
    for result in predict_files(serve, paths, class_names, config.top_k, config.batch_size,
                                config.max_image_pixels, threshold):
        print(format_result(result), flush=True)
        results.append(result)
    failed = sum("error" in r for r in results)
    if failed:
        logging.warning("%d of %d images could not be classified; see their errors.", failed, len(results))
    output = {"export_dir": export_dir, "results": results}
    if threshold is not None:
        output["confidence_threshold"] = threshold
    if config.output_json:
        directory = os.path.dirname(os.path.abspath(config.output_json))
        os.makedirs(directory, exist_ok=True)
        files.write_text(config.output_json, json.dumps(output, indent=2) + "\n")
    return output


def find_export(model_dir: str | None, export_dir: str | None) -> str:
    """--export_dir if given, else the version TF Serving would serve from model_dir/export."""
    if export_dir:
        if not tf.saved_model.contains_saved_model(export_dir):
            raise UserError(f"--export_dir holds no SavedModel. Received: export_dir={export_dir}")
        return export_dir
    latest = export_lib.latest_version_dir(os.path.join(model_dir, "export"))
    if latest is None or not tf.saved_model.contains_saved_model(latest):
        raise UserError(f"--mode=predict needs an export under {os.path.join(model_dir, 'export')}; train "
                        f"or run --mode=export first, or pass --export_dir. Received: model_dir={model_dir}")
    return latest


def list_images(pattern: str) -> list:
    """Files matching the glob, sorted; a folder means every file in it."""
    if tf.io.gfile.isdir(pattern):
        pattern = os.path.join(pattern, "*")
    paths = sorted(p for p in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(p))
    if not paths:
        raise UserError(f"--images matched no files. Received: images={pattern}")
    return paths


def read_labels(export_dir: str) -> list | None:
    """Class names from the export's assets (or labels.txt beside it); None if it has neither."""
    for path in (os.path.join(export_dir, "assets", export_lib.LABELS_FILE),
                 os.path.join(os.path.dirname(os.path.normpath(export_dir)), export_lib.LABELS_FILE)):
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path) as f:
                return f.read().splitlines()
    logging.warning("No %s with the export at %s: classes are shown by index.", export_lib.LABELS_FILE,
                    export_dir)
    return None


def predict_files(serve, paths, class_names, top_k: int, batch_size: int,
                  max_image_pixels: int = Config.max_image_pixels, threshold: float | None = None):
    """Yield one result per path, in order: {"image", "predictions"} or {"image", "error"}; with a
    confidence `threshold`, predictions also say whether their top probability is below it
    ("uncertain": true).

    Files are decoded one at a time into chunks of at most batch_size files and about max_image_pixels
    pixels, so memory stays bounded whatever the files hold. Images of one chunk that share a size go
    to the signature as one batch.
    """
    chunk, pixels = [], 0
    for path in paths:
        try:
            image = load_image(path, max_image_pixels)
            pixels += image.shape[0] * image.shape[1]
        except ValueError as e:
            image = str(e)
        chunk.append((path, image))
        if len(chunk) == batch_size or pixels >= max_image_pixels:
            yield from _classify_chunk(serve, chunk, class_names, top_k, threshold)
            chunk, pixels = [], 0
    yield from _classify_chunk(serve, chunk, class_names, top_k, threshold)


def _classify_chunk(serve, chunk, class_names, top_k: int, threshold: float | None = None):
    """Results for (path, image or error message) pairs, in their order."""
    results = {path: {"image": path, "error": image} for path, image in chunk if isinstance(image, str)}
    by_shape = {}
    for path, image in chunk:
        if not isinstance(image, str):
            by_shape.setdefault(image.shape, []).append((path, image))
    for group in by_shape.values():
        try:
            batch = tf.stack([image for _, image in group])
            probabilities = serve(images=batch)["probabilities"]
        except tf.errors.InvalidArgumentError as e:
            for path, _ in group:
                results[path] = {"image": path, "error": f"the model refused it: {op_message(e)}"}
            continue
        for (path, _), row in zip(group, probabilities.numpy()):
            results[path] = {"image": path, "predictions": top_classes(row, class_names, top_k)}
            if threshold is not None:
                results[path][UNCERTAIN] = bool(row.max() < threshold)
    for path, _ in chunk:
        yield results[path]


def load_image(path: str, max_image_pixels: int = Config.max_image_pixels) -> tf.Tensor:
    """uint8 [H, W, 3], upright; raises ValueError with a readable reason for missing, unreadable, bad
    or too large files.

    The size comes from the header, so an image over the limit is refused before decoding allocates it.
    """
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except (tf.errors.OpError, OSError) as e:
        raise ValueError(f"cannot read the file: {op_message(e)}") from None
    size = image_files.header_size(data)
    if size is None:
        raise ValueError("not a readable image: no JPEG, PNG, GIF, BMP or WebP header that gives its size")
    height, width = size
    if height * width > max_image_pixels:
        raise ValueError(f"{width} x {height} pixels is over --max_image_pixels={max_image_pixels}")
    try:
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(f"not a readable image: {op_message(e)}") from None
    if 0 in image.shape:
        raise ValueError(f"empty image of shape {tuple(image.shape)}")
    return image_files.apply_orientation(image, image_files.exif_orientation(data))


def top_classes(probabilities: np.ndarray, class_names, k: int) -> list:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"class_id": int(i), "class_name": class_names[i] if class_names else str(int(i)),
             "probability": float(probabilities[i])} for i in order]


def format_result(result: dict) -> str:
    """One line per image: the path, then 'name probability' pairs, or the error."""
    if "error" in result:
        return f"{result['image']}  ERROR: {result['error']}"
    return "  ".join([result["image"]] + [f"{p['class_name']} {p['probability']:.4f}"
                                          for p in result["predictions"]]
                     + ([f"({UNCERTAIN})"] if result.get(UNCERTAIN) else []))
