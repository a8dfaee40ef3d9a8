"""`python -m tools.gpu_check`: the GPU side, on a machine that has GPUs (not part of the tests).

Runs phase 2 (backbone unfrozen from --fine_tune_at) at 224x224 on synthetic images under
MirroredStrategy over every visible GPU with mixed precision, and prints JSON with the img/s and the
peak GPU memory. Synthetic data keeps it about the devices, not the input pipeline.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags as absl_flags

from tl_keras import flags

FLAGS = absl_flags.FLAGS


def check(image_size: int = 224, per_replica_batch: int = 64, steps: int = 30,
          precision: str = "mixed_float16", fine_tune_at: str = "block4_conv1") -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from tl_keras.model import classifier
    from tl_keras.training import distribute

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        raise SystemExit("tl_keras.gpu_check: error: no GPU visible; run it on a GPU machine.")
    strategy = distribute.get_strategy("mirrored")
    keras.mixed_precision.set_global_policy(precision)
    batch = per_replica_batch * strategy.num_replicas_in_sync
    with strategy.scope():
        model = classifier.build_classifier("vgg16", image_size, 10, "none")
        classifier.unfreeze_backbone(model, fine_tune_at)
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.normal(0, 50, (batch, image_size, image_size, 3)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, 10, batch), 10)
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2)
    model.fit(ds, steps_per_epoch=5, epochs=1, verbose=0)
    for gpu in range(len(gpus)):
        tf.config.experimental.reset_memory_stats(f"GPU:{gpu}")
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    peaks = [tf.config.experimental.get_memory_info(f"GPU:{gpu}")["peak"] / 2**20 for gpu in range(len(gpus))]
    return {
        "gpus": len(gpus), "replicas": strategy.num_replicas_in_sync, "precision": precision,
        "loss_scale": type(model.optimizer).__name__, "image_size": image_size, "global_batch": batch,
        "phase2_img_per_s": steps * batch / seconds, "peak_gpu_memory_mb": peaks,
        "predictions_dtype": model.get_layer("predictions").dtype_policy.name,
    }


def main(argv):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = {precision: check(precision=precision, fine_tune_at=FLAGS.fine_tune_at)
               for precision in ("mixed_float16", "float32")}
    print(json.dumps(results, indent=2))  # The figures are this command's product.
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=flags.parse))
