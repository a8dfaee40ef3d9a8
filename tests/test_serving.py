"""The export as other systems consume it: both signatures, bad input, saved_model_cli, TFLite and
--mode=predict, all without tl_keras code on the serving side."""

import dataclasses
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import tensorflow as tf

from tl_keras import config as config_lib
from tl_keras.errors import UserError
from tl_keras.model import backbones
from tl_keras.model import classifier
from tl_keras.serving import export as export_lib
from tl_keras.serving import predict
from tl_keras.training import run as train

from helpers import CLASS_NAMES, encode, exif_jpeg, make_examples, make_splits, photo, upright


def _config(model_dir, **overrides):
    settings = dict(
        model_dir=str(model_dir), backbone="tiny", weights="none", image_size=32, batch_size=4,
        head_epochs=1, finetune_epochs=1, steps_per_epoch=2, fine_tune_at="block2_conv1", head_units=(8,),
        distribution_strategy="default", augment="none", cache_features="false", export_tflite=True,
        min_accuracy=0.0, calibrate="false")  # Served probabilities are then the Keras model's own.
    settings.update(overrides)
    return config_lib.Config(**settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained tiny run with --export_tflite (and a --min_accuracy it meets), and its Keras model
    rebuilt from the checkpoint."""
    config = _config(tmp_path_factory.mktemp("serving") / "run")
    export_path = train.run(config, splits=make_splits())["export_path"]
    model = classifier.build_classifier("tiny", 32, len(CLASS_NAMES), "none", head_units=(8,))
    model.load_weights(os.path.join(config.model_dir, "checkpoints", "latest.weights.h5"))
    return config, export_path, model


@pytest.fixture(scope="module")
def signatures(trained):
    return tf.saved_model.load(trained[1]).signatures


def _keras_probabilities(model, images):
    return model.predict(backbones.get_preprocessing("tiny", 32)(images), verbose=0)


def test_export_layout_and_labels(trained):
    config, export_path, _ = trained
    assert export_path == os.path.join(config.model_dir, "export", "1")
    assert {"saved_model.pb", "variables", "assets", "model.tflite"} <= set(os.listdir(export_path))
    expected = "\n".join(CLASS_NAMES) + "\n"
    with open(os.path.join(export_path, "assets", "labels.txt")) as f:
        assert f.read() == expected
    with open(os.path.join(config.model_dir, "export", "labels.txt")) as f:
        assert f.read() == expected
    assert not [d for d in os.listdir(os.path.join(config.model_dir, "export")) if d.startswith(".tmp")]


def test_signatures_declare_inputs_and_outputs(signatures):
    assert {"serving_default", "serve_bytes"} <= set(signatures)
    outputs = {"logits", "probabilities", "classes", "class_names"}
    images = signatures["serving_default"].structured_input_signature[1]["images"]
    assert images.dtype == tf.uint8 and images.shape.as_list() == [None, None, None, 3]
    image_bytes = signatures["serve_bytes"].structured_input_signature[1]["image_bytes"]
    assert image_bytes.dtype == tf.string and image_bytes.shape.as_list() == [None]
    for name in ("serving_default", "serve_bytes"):
        assert set(signatures[name].structured_outputs) == outputs


def test_serving_default_round_trip(trained, signatures):
    images, _ = make_examples(6, seed=11, size=45)  # Not the training size: the signature resizes.
    expected = _keras_probabilities(trained[2], images)
    served = signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)
    # Logits before the softmax (not log-probabilities): shifted, they are the log-probabilities.
    logits = served["logits"].numpy()
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), served["probabilities"].numpy(), atol=1e-6)
    assert np.abs(tf.reduce_logsumexp(logits, axis=-1).numpy()).max() > 1e-3
    np.testing.assert_array_equal(served["classes"].numpy(), expected.argmax(1))
    assert [n.decode() for n in served["class_names"].numpy()] == [CLASS_NAMES[i] for i in expected.argmax(1)]


def test_serve_bytes_round_trip(trained, signatures):
    """Encoded images of different sizes in one batch give what the raw pixels give."""
    small, _ = make_examples(2, seed=12, size=20)
    large, _ = make_examples(2, seed=13, size=64)
    jpeg = tf.io.encode_jpeg(large[0]).numpy()
    batch = [tf.io.encode_png(small[0]).numpy(), tf.io.encode_png(large[1]).numpy(), jpeg,
             tf.io.encode_png(small[1]).numpy()]
    decoded_jpeg = tf.io.decode_jpeg(jpeg).numpy()
    expected = np.concatenate([_keras_probabilities(trained[2], x[None])
                               for x in (small[0], large[1], decoded_jpeg, small[1])])
    served = signatures["serve_bytes"](image_bytes=tf.constant(batch))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(served["classes"].numpy(), expected.argmax(1))
    assert [n.decode() for n in served["class_names"].numpy()] == [CLASS_NAMES[i] for i in expected.argmax(1)]


@pytest.mark.parametrize("signature, inputs, message", [
    ("serving_default", dict(images=tf.zeros([1, 8, 8, 3], tf.float32)), "uint8"),
    ("serving_default", dict(images=tf.zeros([8, 8, 3], tf.uint8)), "not compatible with expected shape"),
    ("serving_default", dict(images=tf.zeros([1, 8, 8, 4], tf.uint8)), "not compatible with expected shape"),
    ("serving_default", dict(images=tf.zeros([1, 0, 8, 3], tf.uint8)), "at least 1x1 pixels"),
    ("serve_bytes", dict(image_bytes=tf.constant([b"not an image"])), "Unknown image file format"),
    ("serve_bytes", dict(image_bytes=tf.constant([[b"x"]])), "not compatible with expected shape"),
    ("serve_bytes", dict(image_bytes=tf.constant([1, 2])), "string"),
])
def test_bad_input_is_a_clean_error_and_serving_goes_on(signatures, signature, inputs, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        signatures[signature](**inputs)
    images, _ = make_examples(1, seed=14)
    good = signatures["serve_bytes"](image_bytes=tf.constant([tf.io.encode_png(images[0]).numpy()]))
    assert good["probabilities"].shape == (1, len(CLASS_NAMES))


def _saved_model_cli(*args):
    """The saved_model_cli that ships with TensorFlow, run as a separate process."""
    return subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", *args],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def test_saved_model_cli_runs_the_export_from_an_input_file(trained, signatures, tmp_path):
    images, _ = make_examples(3, seed=15, size=40)
    np.save(tmp_path / "images.npy", images)
    result = _saved_model_cli("run", "--dir", trained[1], "--tag_set", "serve",
                              "--signature_def", "serving_default",
                              "--inputs", f"images={tmp_path / 'images.npy'}",
                              "--outdir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(np.load(tmp_path / "out" / "probabilities.npy"),
                               expected["probabilities"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "classes.npy"), expected["classes"].numpy())


def test_tflite_top1_agrees_with_keras_on_32_images(trained):
    _, export_path, model = trained
    images, _ = make_examples(32, seed=16)
    expected = _keras_probabilities(model, images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice.
        interpreter = tf.lite.Interpreter(model_path=os.path.join(export_path, "model.tflite"))
    outputs = interpreter.get_signature_runner("serving_default")(images=images)
    assert outputs["probabilities"].shape == (32, len(CLASS_NAMES))
    np.testing.assert_array_equal(outputs["classes"], expected.argmax(1))
    np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-5)


def _image_folder(path):
    """Two PNGs of different sizes, a JPEG, a corrupt file, an empty file and a subfolder."""
    path.mkdir()
    small, _ = make_examples(1, seed=17, size=24)
    large, _ = make_examples(1, seed=18, size=50)
    (path / "a_small.png").write_bytes(tf.io.encode_png(small[0]).numpy())
    (path / "b_large.jpg").write_bytes(tf.io.encode_jpeg(large[0]).numpy())
    (path / "c_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this JPEG header lies")
    (path / "d_empty.png").write_bytes(b"")
    (path / "e_large.png").write_bytes(tf.io.encode_png(large[0]).numpy())
    (path / "subfolder").mkdir()
    jpeg = tf.io.decode_jpeg((path / "b_large.jpg").read_bytes()).numpy()
    return {"a_small.png": small[0], "b_large.jpg": jpeg, "e_large.png": large[0]}


def test_predict_reports_corrupt_files_and_classifies_the_rest(trained, signatures, tmp_path, capsys,
                                                               monkeypatch):
    config, export_path, _ = trained
    good = _image_folder(tmp_path / "images")
    # Predicting needs only the SavedModel: building the model would fail here.
    monkeypatch.setattr(classifier, "build_classifier", None)
    output_json = tmp_path / "out" / "predictions.json"
    result = train.run(dataclasses.replace(config, mode="predict", images=str(tmp_path / "images" / "*"),
                                           output_json=str(output_json), top_k=2, batch_size=3))
    assert result["export_dir"] == export_path
    lines = capsys.readouterr().out.strip().splitlines()
    names = [os.path.basename(r["image"]) for r in result["results"]]
    assert names == ["a_small.png", "b_large.jpg", "c_corrupt.jpg", "d_empty.png", "e_large.png"]
    assert len(lines) == 5
    for line, item in zip(lines, result["results"]):
        assert line.startswith(item["image"])
        name = os.path.basename(item["image"])
        if name not in good:
            assert "ERROR: not a readable image" in line and "error" in item
            continue
        served = signatures["serving_default"](images=tf.constant(good[name][None]))["probabilities"]
        served = served.numpy()[0]
        order = np.argsort(-served)[:2]
        assert [p["class_name"] for p in item["predictions"]] == [CLASS_NAMES[i] for i in order]
        np.testing.assert_allclose([p["probability"] for p in item["predictions"]], served[order], atol=1e-6)
        assert f"{CLASS_NAMES[order[0]]} {served[order[0]]:.4f}" in line
    assert json.loads(output_json.read_text()) == json.loads(json.dumps(result))


def test_predict_with_export_dir_needs_no_model_dir(trained, tmp_path):
    _image_folder(tmp_path / "images")
    config = config_lib.Config(model_dir=None, mode="predict", export_dir=trained[1],
                               images=str(tmp_path / "images"))
    assert len(train.run(config)["results"]) == 5


def test_predict_errors_are_user_errors(trained, tmp_path):
    with pytest.raises(UserError, match="Received: images="):
        train.run(dataclasses.replace(trained[0], mode="predict", images=str(tmp_path / "none*.png")))
    with pytest.raises(UserError, match="train or run --mode=export first"):
        train.run(_config(tmp_path / "empty", mode="predict", images=str(tmp_path)))
    with pytest.raises(UserError, match="Received: export_dir="):
        predict.find_export(None, str(tmp_path))


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of zeros: 20000 x 20000 is a ~50 KB file that decodes to 1.2 GB RGB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # Filter byte, then the bits of one row.
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _memory_growth(fn):
    """(fn(), how far the process's peak resident memory rose above its size before fn, in MB).

    Linux resets the peak on request; where it cannot, the growth is None and not checked.
    """
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return fn(), None
    before = status("VmRSS")
    result = fn()
    return result, status("VmHWM") - before


def test_serve_bytes_refuses_an_image_over_the_limit_before_decoding(signatures):
    bomb = _png_bomb(20000, 20000)
    assert len(bomb) < 100_000

    def call():
        with pytest.raises(tf.errors.InvalidArgumentError, match="20000 x 20000 pixels is over "
                           "max_image_pixels=50000000, the limit set at export"):
            signatures["serve_bytes"](image_bytes=tf.constant([bomb]))
    _, growth = _memory_growth(call)
    assert growth is None or growth < 300, growth  # Decoding it would take 1200 MB.
    images, _ = make_examples(1, seed=20)
    good = signatures["serve_bytes"](image_bytes=tf.constant([tf.io.encode_png(images[0]).numpy()]))
    assert good["probabilities"].shape == (1, len(CLASS_NAMES))


def test_signatures_keep_no_full_size_float_copy(signatures):
    """A 6000 x 6000 image is 108 MB as uint8 and would be 432 MB more as float32."""
    pixels = tf.zeros([1, 6000, 6000, 3], tf.uint8)
    served, growth = _memory_growth(lambda: signatures["serving_default"](images=pixels))
    assert served["probabilities"].shape == (1, len(CLASS_NAMES))
    assert growth is None or growth < 250, growth
    encoded = tf.constant([_png_bomb(6000, 6000)])
    served, growth = _memory_growth(lambda: signatures["serve_bytes"](image_bytes=encoded))
    assert served["probabilities"].shape == (1, len(CLASS_NAMES))
    assert growth is None or growth < 250, growth  # The decoded uint8 image only.


def _encodings(array):
    """The formats serve_bytes reads sizes from, each variant of header that TF decodes."""
    return {"png": encode(array, "PNG"), "jpeg": encode(array, "JPEG"), "gif": encode(array, "GIF"),
            "bmp": encode(array, "BMP"), "webp": encode(array, "WEBP"),
            "webp lossless": encode(array, "WEBP", lossless=True),
            "webp extended": encode(array, "WEBP", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00")}


def test_the_limit_is_baked_into_the_export_and_read_from_every_header(trained, tmp_path):
    _, _, model = trained
    export_path = export_lib.export_saved_model(
        model, str(tmp_path / "export"), backbones.get_preprocessing("tiny", 32), CLASS_NAMES,
        max_image_pixels=1000)
    signatures = tf.saved_model.load(export_path).signatures
    for name, data in _encodings(photo(1, 21, (30, 50))).items():  # 1500 pixels, width 50.
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match="50 x 30 pixels is over max_image_pixels=1000, the limit set at export"):
            signatures["serve_bytes"](image_bytes=tf.constant([data]))
    for name, data in _encodings(photo(1, 22, (20, 30))).items():  # 600 pixels.
        pixels = tf.io.decode_image(data, channels=3, expand_animations=False)
        expected = signatures["serving_default"](images=pixels[tf.newaxis])["probabilities"]
        served = signatures["serve_bytes"](image_bytes=tf.constant([data]))["probabilities"]
        np.testing.assert_allclose(served.numpy(), expected.numpy(), atol=1e-6, err_msg=name)
    with pytest.raises(tf.errors.InvalidArgumentError, match="40 x 40 pixels is over"):
        signatures["serve_bytes"](image_bytes=tf.constant([tf.io.encode_png(photo(0, 23, (40, 40))).numpy()]))


def _predict(config, folder, capsys, **overrides):
    result = train.run(dataclasses.replace(config, mode="predict", images=str(folder), **overrides))
    lines = capsys.readouterr().out.strip().splitlines()
    return {os.path.basename(r["image"]): (r, line) for r, line in zip(result["results"], lines)}


def test_predict_refuses_images_over_the_limit_from_their_header(trained, signatures, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a_bomb.png").write_bytes(_png_bomb(20000, 20000))
    small, square = photo(2, 24, (20, 30)), photo(0, 25, (40, 40))
    (folder / "b_small.png").write_bytes(encode(small, "PNG"))
    (folder / "c_square.png").write_bytes(encode(square, "PNG"))
    results, growth = _memory_growth(lambda: _predict(trained[0], folder, capsys))
    assert growth is None or growth < 300, growth  # Decoding the bomb would take 1200 MB.
    item, line = results["a_bomb.png"]
    assert item["error"] == "20000 x 20000 pixels is over --max_image_pixels=50000000"
    assert line.endswith("ERROR: 20000 x 20000 pixels is over --max_image_pixels=50000000")
    for name, pixels in (("b_small.png", small), ("c_square.png", square)):
        served = signatures["serving_default"](images=tf.constant(pixels[None]))["probabilities"].numpy()[0]
        got = {p["class_id"]: p["probability"] for p in results[name][0]["predictions"]}
        np.testing.assert_allclose([got[i] for i in range(len(CLASS_NAMES))], served, atol=1e-6)

    results = _predict(trained[0], folder, capsys, max_image_pixels=1000)
    assert results["c_square.png"][0]["error"] == "40 x 40 pixels is over --max_image_pixels=1000"
    assert "predictions" in results["b_small.png"][0]


def test_predict_turns_photos_upright_by_their_exif_orientation(trained, signatures, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = photo(1, 26, (24, 40))
    for orientation in range(1, 9):
        (folder / f"{orientation}.jpg").write_bytes(exif_jpeg(pixels, orientation))
    results = _predict(trained[0], folder, capsys, top_k=len(CLASS_NAMES))
    for orientation in range(1, 9):
        path = folder / f"{orientation}.jpg"
        # The pixels TF decodes, as PIL's ImageOps.exif_transpose turns them.
        expected = upright(tf.io.decode_jpeg(path.read_bytes()).numpy(), orientation)
        assert expected.shape == ((24, 40, 3) if orientation < 5 else (40, 24, 3))
        np.testing.assert_array_equal(np.asarray(predict.load_image(str(path))), expected,
                                      err_msg=f"orientation {orientation}")
        served = signatures["serving_default"](images=tf.constant(expected[None]))["probabilities"].numpy()[0]
        got = {p["class_id"]: p["probability"] for p in results[path.name][0]["predictions"]}
        np.testing.assert_allclose([got[i] for i in range(len(CLASS_NAMES))], served, atol=1e-6)
