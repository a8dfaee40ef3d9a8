"""Export parity: each artifact loaded by its own runtime and run on the same test images as the
Keras model, so that a conversion that changes the answers shows before anyone deploys it.

Per format: file size, top-1 accuracy, top-1 agreement with the Keras model, the largest difference
of any probability, and images per second on this machine (inference calls only, batches as given).
"""

import os
import time
import warnings

import numpy as np
import tensorflow as tf

from tl_keras.serving import deploy
from tl_keras.serving import formats

PARITY_FILE = "parity.json"
KERAS = "keras"  # The reference row: the float32 deploy model the artifacts were made from.


def load_predictor(name: str, version_dir: str):
    """uint8 images [N, H, W, 3] -> probabilities [N, C], through format `name`'s own runtime.

    OpenVINO runs at float32 precision: on CPUs with bf16 support its default is bf16, which is
    faster but measures the CPU, not the artifact.
    """
    if name == formats.SAVED_MODEL:
        serve = tf.saved_model.load(version_dir).signatures["serving_default"]
        return lambda images: serve(images=tf.constant(images))["probabilities"].numpy()
    path = os.path.join(version_dir, formats.FILES[name])
    if name in (formats.TFLITE, formats.TFLITE_INT8):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's notice that LiteRT replaces it.
            interpreter = tf.lite.Interpreter(model_path=path, num_threads=os.cpu_count())
        runner = interpreter.get_signature_runner("serving_default")
        return lambda images: runner(**{deploy.INPUT_NAME: images})["probabilities"]
    if name == formats.ONNX:
        onnxruntime = formats.import_package("onnxruntime")
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda images: session.run(["probabilities"], {deploy.INPUT_NAME: images})[0]
    if name == formats.OPENVINO:
        openvino = formats.import_package("openvino")
        compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        output = compiled.output("probabilities")
        return lambda images: compiled(images)[output]
    raise ValueError(f"No runtime for format {name}. Received: name={name}")


def batches_of(examples, batch_size: int):
    """(uint8 images [n, H, W, 3], labels [n]) from (image, label) pairs in order: up to batch_size
    consecutive examples of one size each, since every runtime takes one size per call."""
    images, labels = [], []
    for image, label in examples:
        image = np.asarray(image)
        if images and (len(images) == batch_size or image.shape != images[0].shape):
            yield np.stack(images), np.asarray(labels)
            images, labels = [], []
        images.append(image)
        labels.append(int(label))
    if images:
        yield np.stack(images), np.asarray(labels)


def run(predict, batches) -> tuple:
    """(probabilities [N, C] float64 in order, seconds spent inside `predict`).

    The first batch runs once untimed before: tracing, compiling and memory planning happen then.
    """
    outputs, seconds = [], 0.0
    for i, (images, _) in enumerate(batches):
        if i == 0:
            predict(images)
        start = time.perf_counter()
        probabilities = predict(images)
        seconds += time.perf_counter() - start
        outputs.append(np.asarray(probabilities, np.float64))
    return np.concatenate(outputs), seconds


def artifact_size(name: str, version_dir: str) -> int:
    """Bytes on disk: the SavedModel's saved_model.pb, variables/ and assets/; OpenVINO's .xml and .bin."""
    if name == formats.SAVED_MODEL:
        paths = [os.path.join(version_dir, "saved_model.pb")]
        for sub in ("variables", "assets"):
            for root, _, names in os.walk(os.path.join(version_dir, sub)):
                paths += [os.path.join(root, n) for n in names]
    else:
        path = os.path.join(version_dir, formats.FILES[name])
        paths = [path] + ([path[:-len(".xml")] + ".bin"] if name == formats.OPENVINO else [])
    return sum(os.path.getsize(p) for p in paths)


def compare(name: str, probabilities: np.ndarray, labels, reference: np.ndarray, seconds: float,
            size_bytes: int | None) -> dict:
    """One row of the parity table."""
    labels = np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    return {
        "format": name,
        "size_bytes": size_bytes,
        "examples": int(len(labels)),
        "accuracy": float(np.mean(predicted == labels)),
        "agreement": float(np.mean(predicted == reference.argmax(axis=1))),
        "max_probability_difference": float(np.abs(probabilities - reference).max()),
        "images_per_second": round(len(labels) / seconds, 1) if seconds > 0 else None,
    }


def format_table(rows) -> str:
    """The rows as an aligned text table, for the log."""
    lines = [f"{'format':<12} {'size':>10} {'top-1':>7} {'agree':>7} {'max |dp|':>9} {'img/s':>8}"]
    for row in rows:
        size = "-" if row["size_bytes"] is None else f"{row['size_bytes'] / 2 ** 20:.2f} MB"
        speed = "-" if row["images_per_second"] is None else f"{row['images_per_second']:.0f}"
        lines.append(f"{row['format']:<12} {size:>10} {row['accuracy']:>7.4f} {row['agreement']:>7.4f} "
                     f"{row['max_probability_difference']:>9.2e} {speed:>8}")
    return "\n".join(lines)
