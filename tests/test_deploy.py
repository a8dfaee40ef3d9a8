"""Deploy anywhere, with proof: every export format run by its own runtime against Keras, calibrated
probabilities, selective prediction, the parity gate, and the one-line error for missing packages.

Each format's round trip is checked here with that format's runtime called directly (not through
tl_keras's parity code), on images of sizes other than the trained one. Tolerances on probabilities:
float32 formats 1e-5 (OpenVINO at its float32 precision hint 1e-4), int8 TFLite 0.15 with top-1
agreement on at least 14 of 16 images.
"""

import json
import os
import shutil
import warnings

from absl.testing import flagsaver
import keras
import numpy as np
import pytest
import tensorflow as tf

from tl_keras import config as config_lib
from tl_keras import flags as tl_flags
from tl_keras.errors import UserError
from tl_keras.model import backbones
from tl_keras.model import classifier
from tl_keras.reporting import calibration
from tl_keras.reporting import evaluation
from tl_keras.reporting import images
from tl_keras.serving import deploy
from tl_keras.serving import formats
from tl_keras.serving import parity
from tl_keras.serving import predict
from tl_keras.training import exporting
from tl_keras.training import run as train
from tl_keras.training import stages

from helpers import CLASS_NAMES, make_examples, make_splits

# Formats whose packages this environment has; the others' tests skip, saying what is missing.
AVAILABLE = tuple(name for name in config_lib.EXPORT_FORMATS if not formats.missing_packages([name]))
# Largest probability difference from Keras each format may show; int8 also needs top-1 agreement.
TOLERANCE = {"saved_model": 1e-5, "tflite": 1e-5, "onnx": 1e-5, "openvino": 1e-4, "tflite_int8": 0.15}
INT8_MIN_AGREEMENT = 14 / 16


def _needs(name: str):
    missing = formats.missing_packages([name])
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)} ({formats.INSTALL_HINT}); "
                    f"{'; '.join(f'{k}: {v}' for k, v in missing.items())}")


def _config(model_dir, **overrides):
    settings = dict(model_dir=str(model_dir), backbone="tiny", weights="none", image_size=32, batch_size=4,
                    head_units=(8,), distribution_strategy="default", mixed_precision="float32")
    settings.update(overrides)
    return config_lib.Config(**settings)


@pytest.fixture(scope="module")
def trained_model():
    return _trained_model()


def _trained_model():
    """A tiny classifier fitted on the brightness classes until it is confident and mostly right, so
    that agreement between formats is not decided by near-ties."""
    keras.utils.set_random_seed(0)
    model = classifier.build_classifier("tiny", 32, len(CLASS_NAMES), "none", head_units=(8,))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    pictures, labels = make_examples(96, seed=5)
    model.fit(backbones.get_preprocessing("tiny", 32)(pictures), np.eye(3)[labels], epochs=15, batch_size=16,
              verbose=0)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_model):
    """One export of every available format, with a temperature (the validation split exists)."""
    model = trained_model
    splits = make_splits(num_train=40, num_test=16, validation_split=0.3)
    config = _config(tmp_path_factory.mktemp("deploy") / "run", export_formats=AVAILABLE, min_accuracy=0.5,
                     target_accuracy=0.9)
    metrics = exporting.calibrate_and_export(model, config, splits, summary_step=3)
    return config, metrics, model, splits


def _expected(model, pictures, temperature):
    """What every artifact should return: the Keras classifier's logits over the temperature, softmaxed."""
    logits_model = keras.Model(model.inputs, model.get_layer(classifier.LOGITS).output)
    logits = logits_model.predict(backbones.get_preprocessing("tiny", 32)(pictures), verbose=0)
    return logits / temperature, calibration.softmax(logits, temperature)


def _run_format(name: str, export_path: str, pictures: np.ndarray) -> dict:
    """{"logits", "probabilities"} from format `name`, through its runtime's own API."""
    if name == "saved_model":
        serve = tf.saved_model.load(export_path).signatures["serving_default"]
        return {k: v.numpy() for k, v in serve(images=tf.constant(pictures)).items()}
    path = os.path.join(export_path, formats.FILES[name])
    if name in ("tflite", "tflite_int8"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(model_path=path)
        return interpreter.get_signature_runner("serving_default")(images=pictures)
    if name == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        assert [(i.name, i.type) for i in session.get_inputs()] == [("images", "tensor(uint8)")]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {"images": pictures})))
    import openvino
    compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(pictures)
    return {name: result[compiled.output(name)] for name in ("logits", "probabilities")}


@pytest.mark.parametrize("name", config_lib.EXPORT_FORMATS)
@pytest.mark.parametrize("size", [(45, 45), (20, 30)])  # Neither is the trained 32: resized inside.
def test_each_format_round_trip_agrees_with_keras(exported, name, size):
    _needs(name)
    config, metrics, model, _ = exported
    temperature = metrics["calibration"]["temperature"]
    pictures, _ = make_examples(16, seed=31, size=max(size))
    pictures = np.ascontiguousarray(pictures[:, :size[0], :size[1]])
    logits, probabilities = _expected(model, pictures, temperature)
    served = _run_format(name, metrics["export_path"], pictures)
    np.testing.assert_allclose(served["probabilities"], probabilities, atol=TOLERANCE[name], err_msg=name)
    agreement = np.mean(served["probabilities"].argmax(1) == probabilities.argmax(1))
    if name == "tflite_int8":
        assert agreement >= INT8_MIN_AGREEMENT
    else:
        assert agreement == 1.0
        np.testing.assert_allclose(served["logits"], logits, atol=10 * TOLERANCE[name], rtol=1e-5)
        np.testing.assert_allclose(served["probabilities"].sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["onnx", "openvino", "tflite_int8", "tflite"])
def test_each_format_exports_on_its_own(trained_model, tmp_path, name):
    """Keras's ONNX and OpenVINO exporters refuse a model that was never called: the int8 calibration,
    which runs before them in a full export, must not be what makes them work."""
    _needs(name)
    config = _config(tmp_path / "run", export_formats=(name,), calibrate="false")
    splits = make_splits(num_train=40, num_test=16)
    row = exporting.calibrate_and_export(trained_model, config, splits)["parity"][name]
    assert row["agreement"] >= (INT8_MIN_AGREEMENT if name == "tflite_int8" else 1.0), row


def test_int8_tflite_is_quantized_and_takes_raw_uint8_pixels(exported):
    _needs("tflite_int8")
    path = os.path.join(exported[1]["export_path"], formats.FILES["tflite_int8"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=path)
    (image_input,) = interpreter.get_input_details()
    assert image_input["dtype"] == np.uint8 and list(image_input["shape_signature"]) == [-1, -1, -1, 3]
    assert image_input["quantization"] == (0.0, 0)  # Raw pixels: no scale to apply before calling it.
    assert {d["dtype"] for d in interpreter.get_output_details()} == {np.float32}
    kernels = [d for d in interpreter.get_tensor_details()
               if "conv" in d["name"].lower() and d["dtype"] == np.int8]
    assert kernels, "no int8 convolution weights: the model was not quantized"
    float_size = os.path.getsize(os.path.join(exported[1]["export_path"], formats.FILES["tflite"])) \
        if "tflite" in AVAILABLE else None
    if float_size:
        assert os.path.getsize(path) < float_size


def test_int8_tflite_agrees_with_a_dead_channel_before_the_head_batchnorm(trained_model, tmp_path):
    """Regression: int8 VGG16 on CIFAR-10 gave one class for every image (agreement 11%). A backbone
    channel that its ReLU never opens leaves the head BatchNormalization a moving variance of ~0, so a
    scale of ~1/sqrt(epsilon) = 32 against ~0.02 for the live channels of VGG-sized activations; folded
    into the next Dense, that row set the int8 weight range and the live weights rounded to 0.

    Here the trained tiny model gets both, without changing what it computes: its last convolution's
    live channels x100 (ReLU and pooling commute with it; the moving statistics follow), and its
    weakest channel dead, as training leaves one (moving mean and variance 0)."""
    _needs("tflite_int8")
    model = deploy.float32_copy(trained_model)
    conv = model.get_layer("backbone").get_layer("block3_conv1")
    batchnorm = model.get_layer("head_batchnorm")
    pictures, _ = make_examples(48, seed=7)
    features = keras.Model(model.inputs, model.get_layer(classifier.HEAD_INPUT).output)
    dead = np.argmin(features.predict(backbones.get_preprocessing("tiny", 32)(pictures), verbose=0).max(0))
    kernel, bias = conv.get_weights()
    gamma, beta, mean, variance = batchnorm.get_weights()
    conv.set_weights([np.where(np.arange(len(bias)) == dead, 0.0, 100 * kernel),
                      np.where(np.arange(len(bias)) == dead, -1.0, 100 * bias)])
    batchnorm.set_weights([gamma, beta, np.where(np.arange(len(bias)) == dead, 0.0, 100 * mean),
                           np.where(np.arange(len(bias)) == dead, 0.0, 1e4 * variance)])
    deploy_model = deploy.build_deploy_model(model, backbones.get_preprocessing("tiny", 32), 32)
    deploy.write_format("tflite_int8", deploy_model, str(tmp_path), list(pictures[:32]))
    np.testing.assert_array_equal(batchnorm.gamma.numpy(), gamma)  # The export leaves the weights alone.

    expected = deploy_model.predict(pictures[32:], verbose=0)["probabilities"]
    served = _run_format("tflite_int8", str(tmp_path), pictures[32:])["probabilities"]
    assert np.mean(served.argmax(1) == expected.argmax(1)) >= INT8_MIN_AGREEMENT
    np.testing.assert_allclose(served, expected, atol=TOLERANCE["tflite_int8"])


def test_export_writes_parity_metadata_and_calibrated_report(exported):
    config, metrics, _, splits = exported
    export_path = metrics["export_path"]
    assert export_path == os.path.join(config.model_dir, "export", "1")
    assert not [d for d in os.listdir(os.path.dirname(export_path)) if ".tmp" in d]
    with open(os.path.join(export_path, parity.PARITY_FILE)) as f:
        written = json.load(f)
    assert [row["format"] for row in written["rows"]] == ["keras", *AVAILABLE]
    assert written["examples"] == splits.num_test
    for row in written["rows"]:
        assert set(row) == {"format", "size_bytes", "examples", "accuracy", "agreement",
                            "max_probability_difference", "images_per_second"}
        assert row["accuracy"] >= config.min_accuracy
        assert row["format"] == "keras" or row["size_bytes"] > 0
    assert metrics["parity"] == {row["format"]: row for row in written["rows"]}

    metadata = deploy.read_metadata(export_path)
    assert metadata["class_names"] == CLASS_NAMES and metadata["image_size"] == 32
    assert metadata["input"]["dtype"] == "uint8" and set(metadata["formats"]) == set(AVAILABLE)
    assert metadata["temperature"] == metrics["calibration"]["temperature"] and metadata["calibrated"]
    assert "mobilenet_v2.preprocess_input" in metadata["preprocessing"]  # The tiny backbone's.
    assert set(metrics["coverage_accuracy"]) == {"50%", "80%", "100%"}

    eval_dir = os.path.join(config.model_dir, "eval")
    assert evaluation.RELIABILITY_PNG in os.listdir(eval_dir)
    with open(os.path.join(eval_dir, evaluation.REPORT_FILE)) as f:
        report = json.load(f)
    section = report["calibration"]
    assert section["temperature"] == metrics["calibration"]["temperature"]
    assert section["fitted_on"] == "validation" and section["validation_examples"] == splits.num_validation
    for when in ("before", "after"):
        assert len(section[when]["reliability"]) == 15
        assert {"ece", "nll"} <= set(section[when])
    assert section["after"]["nll"] == pytest.approx(metrics["calibration"]["nll_after"])
    assert [point["coverage"] for point in report["coverage_accuracy"]][-1] == 1.0
    assert report["coverage_accuracy"][-1]["accuracy"] == pytest.approx(report["accuracy"])


def test_export_summaries_hold_calibration_scalars_and_the_diagram(exported):
    config = exported[0]
    tags = {}
    for path in tf.io.gfile.glob(os.path.join(config.model_dir, "logs", "test", "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = tf.compat.v1.Event.FromString(record)
            for value in event.summary.value:
                tags[value.tag] = event.step
    assert tags["calibration/temperature"] == 3 and tags["reliability_diagram"] == 3
    assert {"calibration/ece_before", "calibration/ece_after", "calibration/nll_before",
            "calibration/nll_after"} <= set(tags)


def test_a_complete_export_is_kept_on_resume(exported):
    config, metrics, model, splits = exported
    again = exporting.calibrate_and_export(model, config, splits, version_dir=metrics["export_path"])
    assert again["export_path"] == metrics["export_path"] and again["parity"] == metrics["parity"]
    assert again["calibration"] == metrics["calibration"]


def _overconfident(n: int, seed: int, scale: float = 4.0):
    """Labels drawn from softmax(z), and a model that reports scale * z: right as often, far too sure."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 5))
    truth = calibration.softmax(z)
    labels = np.array([rng.choice(5, p=p) for p in truth])
    return scale * z, labels


def test_temperature_scaling_lowers_nll_on_an_overconfident_model_and_keeps_top1():
    validation_logits, validation_labels = _overconfident(3000, seed=0)
    test_logits, test_labels = _overconfident(3000, seed=1)
    temperature = calibration.fit_temperature(validation_logits, validation_labels)
    assert temperature == pytest.approx(4.0, rel=0.15)  # It undoes the overconfidence.
    report = calibration.build_report(test_logits, test_labels, temperature, validation_logits,
                                      validation_labels, target_accuracy=0.9)
    assert report["after"]["nll"] < report["before"]["nll"] - 0.3
    assert report["after"]["ece"] < report["before"]["ece"] / 3
    before, after = calibration.softmax(test_logits), calibration.softmax(test_logits, temperature)
    np.testing.assert_array_equal(after.argmax(1), before.argmax(1))
    # The threshold is chosen on validation and holds, near enough, on test.
    assert report["threshold_validation"]["accuracy"] >= 0.9
    assert report["threshold_test"]["accuracy"] > 0.85 and 0 < report["threshold_test"]["coverage"] < 1


def test_a_calibrated_model_keeps_its_temperature_near_one():
    logits, labels = _overconfident(3000, seed=2, scale=1.0)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.15)


def test_ece_nll_and_reliability_bins_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right).
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    bins = evaluation.reliability_bins(probabilities, labels)
    filled = [b for b in bins if b["count"]]
    assert [(b["count"], b["confidence"], b["accuracy"]) for b in filled] == [
        (2, pytest.approx(0.6), 1.0), (2, pytest.approx(0.9), 0.5)]
    # Half the examples 40 points underconfident, half 40 points overconfident.
    assert evaluation.expected_calibration_error(probabilities, labels) == pytest.approx(0.4)
    expected_nll = -np.mean(np.log([0.9, 0.1, 0.6, 0.6]))
    assert evaluation.negative_log_likelihood(probabilities, labels) == pytest.approx(expected_nll)
    assert calibration.nll_of_logits(np.log(probabilities), labels) == pytest.approx(expected_nll)
    # A probability that underflowed is finite, not infinite.
    assert np.isfinite(evaluation.negative_log_likelihood(np.array([[1.0, 0.0]]), [1]))


def test_coverage_curve_and_confidence_threshold_by_hand():
    probabilities = np.array([[0.7, 0.3], [0.95, 0.05], [0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])
    labels = np.array([0, 0, 0, 0, 1])
    # By confidence: 0.95 (right), 0.9 (wrong), 0.8 (wrong), 0.7 (right), 0.6 (wrong).
    curve = {p["coverage"]: p for p in evaluation.coverage_curve(probabilities, labels, (0.2, 0.4, 0.6, 1.0))}
    assert curve[0.2]["accuracy"] == 1.0 and curve[0.2]["threshold"] == 0.95
    assert curve[0.4]["accuracy"] == 0.5 and curve[0.6]["accuracy"] == pytest.approx(1 / 3)
    assert curve[1.0]["accuracy"] == pytest.approx(2 / 5) and curve[1.0]["examples"] == 5
    assert curve[1.0]["threshold"] == 0.6
    assert evaluation.confidence_threshold(probabilities, labels, 1.0) == 0.95
    assert evaluation.confidence_threshold(probabilities, labels, 0.5) == 0.7  # Four answers, two right.
    assert evaluation.confidence_threshold(probabilities, labels, 0.4) == 0.6  # All five.
    assert evaluation.confidence_threshold(probabilities[[2, 4]], labels[[2, 4]], 0.5) is None
    assert evaluation.selective_metrics(probabilities, labels, 0.85) == {"coverage": 0.4, "accuracy": 0.5}
    assert evaluation.selective_metrics(probabilities, labels, 0.99) == {"coverage": 0.0, "accuracy": None}
    # Equal confidences are kept or dropped together: 0.9 twice, one right, one wrong.
    tied = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert evaluation.confidence_threshold(tied, [0, 1], 1.0) is None


def test_reliability_diagram_draws_both_series():
    logits, labels = _overconfident(500, seed=3)
    before = evaluation.reliability_bins(calibration.softmax(logits), labels)
    after = evaluation.reliability_bins(calibration.softmax(logits, 4.0), labels)
    picture = images.reliability_diagram(before, after, "test")
    assert picture.dtype == np.uint8 and picture.ndim == 3
    assert (np.abs(picture.astype(int) - images.WRONG).sum(-1) < 30).any()  # The red "before" line.
    assert (np.abs(picture.astype(int) - images.BLUE.astype(int)).sum(-1) < 30).any()  # The bars.


def _wrong(predict):
    """A predictor that moves every answer to the next class: agreement 0, accuracy forced down."""
    def wrong(pictures):
        probabilities = np.asarray(predict(pictures))
        return np.roll(probabilities, 1, axis=1)
    return wrong


def test_parity_gate_fails_the_run_naming_the_format_and_leaves_nothing(trained_model, tmp_path, monkeypatch):
    model = trained_model
    splits = make_splits(num_train=24, num_test=16, validation_split=0.25)
    config = _config(tmp_path / "run", export_formats=("tflite",), min_accuracy=0.5, target_accuracy=0.9)
    load = parity.load_predictor
    monkeypatch.setattr(parity, "load_predictor",
                        lambda name, path: _wrong(load(name, path)) if name == "tflite" else load(name, path))
    with pytest.raises(UserError) as raised:
        exporting.calibrate_and_export(model, config, splits)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("Exported tflite (0.") and "below --min_accuracy" in message
    assert "saved_model" not in message and message.endswith("Received: min_accuracy=0.5")
    assert os.listdir(os.path.join(config.model_dir, "export")) == []  # No version, no temporary.
    # Without the forcing, the same run exports: the gate failed because of the format.
    monkeypatch.setattr(parity, "load_predictor", load)
    assert exporting.calibrate_and_export(model, config, splits)["parity"]["tflite"]["agreement"] == 1.0


def test_an_artifact_that_its_runtime_refuses_is_one_line_and_leaves_nothing(trained_model, tmp_path,
                                                                             monkeypatch):
    """As ONNX Runtime refused an ONNX file with an operator ONNX lacks: the run says which format."""
    config = _config(tmp_path / "run", export_formats=("tflite",))
    load = parity.load_predictor

    def refuse(name, path):
        if name == "tflite":
            raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : No Op registered for Erfc\nmore")
        return load(name, path)

    monkeypatch.setattr(parity, "load_predictor", refuse)
    with pytest.raises(UserError) as raised:
        exporting.calibrate_and_export(trained_model, config, make_splits(num_train=24, num_test=16))
    message = str(raised.value)
    assert message == ("Could not run the tflite export in its own runtime ([ONNXRuntimeError] : 10 : "
                       "INVALID_GRAPH : No Op registered for Erfc), so nothing was exported (checkpoints and "
                       "metrics.json are kept). Received: export_formats=saved_model,tflite")
    assert os.listdir(os.path.join(config.model_dir, "export")) == []


def test_check_parity_names_every_failing_format(make_config):
    rows = [{"format": "keras", "accuracy": 0.4, "examples": 10},
            {"format": "tflite_int8", "accuracy": 0.45, "examples": 10},
            {"format": "onnx", "accuracy": 0.8, "examples": 10},
            {"format": "openvino", "accuracy": 0.3, "examples": 10}]
    with pytest.raises(UserError, match=r"^Exported tflite_int8 \(0.4500\), openvino \(0.3000\) below"):
        exporting.check_parity(make_config(min_accuracy=0.5), rows)
    exporting.check_parity(make_config(min_accuracy=None), rows)


@pytest.mark.parametrize("error, why", [
    (ModuleNotFoundError("No module named 'onnxruntime'"), "not installed"),
    (ImportError("numpy.core.multiarray failed to import"),
     "fails to import: numpy.core.multiarray failed to import")])
def test_missing_packages_are_one_line_errors_before_anything_runs(make_config, monkeypatch, error, why):
    real = formats.import_package

    def absent(name):
        if name == "onnxruntime":
            raise error
        return real(name)

    monkeypatch.setattr(formats, "import_package", absent)
    config = make_config(export_formats=("onnx", "tflite"))
    with pytest.raises(UserError) as raised:
        exporting.check_before_training(config, make_splits())
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"--export_formats=onnx needs onnxruntime ({why}); install the deploy extra: "
                              'pip install -e ".[deploy]", or pip install onnxruntime.')
    assert message.endswith("Received: export_formats=saved_model,tflite,onnx")
    # The export refuses the same way before it reads, fits or writes anything.
    with pytest.raises(UserError, match="needs onnxruntime"):
        exporting.calibrate_and_export(None, config, None)
    assert not os.path.exists(config.model_dir)
    exporting.check_before_training(make_config(export_formats=("tflite", "tflite_int8")), make_splits())


def test_calibrate_true_needs_a_validation_split(make_config):
    with pytest.raises(UserError, match="Received: calibrate=true"):
        exporting.check_before_training(make_config(calibrate="true"), make_splits(validation_split=0))
    exporting.check_before_training(make_config(calibrate="auto"), make_splits(validation_split=0))


def test_without_validation_or_calibration_the_temperature_is_one(trained_model, tmp_path):
    model = trained_model
    for splits, calibrate in ((make_splits(num_test=8, validation_split=0), "auto"),
                              (make_splits(num_test=8), "false")):
        config = _config(tmp_path / calibrate, calibrate=calibrate, parity_examples=4)
        metrics = exporting.calibrate_and_export(model, config, splits)
        assert metrics["calibration"]["temperature"] == 1.0
        assert metrics["calibration"]["ece_after"] == metrics["calibration"]["ece_before"]
        assert metrics["parity"]["saved_model"]["examples"] == 4  # --parity_examples.
        assert not deploy.read_metadata(metrics["export_path"])["calibrated"]


def test_export_formats_flag_alias_and_validation(make_config):
    assert formats.resolve(("onnx",), export_tflite=True) == ("saved_model", "tflite", "onnx")
    assert formats.resolve(("tflite_int8", "saved_model")) == ("saved_model", "tflite_int8")
    with flagsaver.flagsaver():
        tl_flags.FLAGS.unparse_flags()
        tl_flags.FLAGS(["prog", "--model_dir=/tmp/x", "--export_formats=openvino,tflite_int8",
                        "--export_tflite"])
        config = tl_flags.get_config()
    assert config.export_formats == ("openvino", "tflite_int8")
    assert "--export_formats=openvino,tflite_int8" in config.to_flagfile()
    assert exporting.export_formats(config) == ("saved_model", "tflite", "tflite_int8", "openvino")
    with pytest.raises(UserError, match="Received: export_formats=onnx,tensorrt"):
        make_config(export_formats=("onnx", "tensorrt"))
    for name, value in (("calibrate", "maybe"), ("target_accuracy", 0.0), ("target_accuracy", 1.5),
                        ("parity_examples", 0)):
        with pytest.raises(UserError, match=f"Received: {name}="):
            make_config(**{name: value})


def test_checkpoints_of_the_softmax_in_dense_structure_still_load(tmp_path):
    """Before the split, "predictions" was Dense(activation="softmax"); its .weights.h5 files load."""
    keras.utils.set_random_seed(1)
    backbone = backbones.build_backbone("tiny", 32, "none")
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(backbone(inputs, training=False))
    x = keras.layers.BatchNormalization(name="head_batchnorm")(x)
    x = keras.layers.Dense(8, activation="relu", name="head_dense_1")(x)
    x = keras.layers.Dropout(0.3, name="head_dropout")(x)
    outputs = keras.layers.Dense(3, activation="softmax", dtype="float32", name="predictions")(x)
    old = keras.Model(inputs, outputs, name="tiny_classifier")
    old.save_weights(str(tmp_path / "old.weights.h5"))

    model = classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,))
    model.load_weights(str(tmp_path / "old.weights.h5"))
    pictures = backbones.get_preprocessing("tiny", 32)(make_examples(4, seed=2)[0])
    np.testing.assert_allclose(model.predict(pictures, verbose=0), old.predict(pictures, verbose=0),
                               atol=1e-6)
    assert model.get_layer("predictions").get_config()["activation"] == "linear"
    assert isinstance(model.get_layer("probabilities"), keras.layers.Softmax)
    assert model.get_layer("probabilities").dtype_policy.name == "float32"


def test_a_bf16_run_exports_a_float32_model_with_its_weights():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,), matmul_small_convs=True)
        copy = deploy.float32_copy(model)
        exported = deploy.build_deploy_model(copy, backbones.get_preprocessing("tiny", 32), 32, 2.0)
        with pytest.raises(ValueError, match="float32 classifier"):
            deploy.build_deploy_model(model, backbones.get_preprocessing("tiny", 32), 32)
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"  # Restored.
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert {layer.compute_dtype for layer in copy.get_layer("backbone").layers} == {"float32"}
    assert {layer.compute_dtype for layer in exported.layers} == {"float32"}
    assert [w.path for w in copy.weights] == [w.path for w in model.weights]
    for a, b in zip(copy.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    outputs = exported(make_examples(2, seed=3)[0])
    assert {k: v.dtype for k, v in outputs.items()} == {"logits": "float32", "probabilities": "float32"}


def test_the_float32_copy_makes_one_channel_groups_depthwise():
    """Keras runs a grouped convolution on CPU through XLA, which tf2onnx cannot convert (ConvNeXt's 7x7
    convolutions): with one input channel per group it is a DepthwiseConv2D, which every format knows."""
    images = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(4, 3, padding="same", groups=4, name="one_per_group")(images)
    x = keras.layers.Conv2D(6, 3, groups=2, activation="relu", name="two_per_group")(x)
    model = keras.Model(images, x)
    keras.utils.set_random_seed(0)
    model.set_weights([np.random.default_rng(i).normal(size=w.shape) for i, w in enumerate(model.weights)])
    copy = deploy.float32_copy(model)
    assert type(copy.get_layer("one_per_group")) is keras.layers.DepthwiseConv2D
    assert type(copy.get_layer("two_per_group")) is keras.layers.Conv2D
    x = np.random.default_rng(9).normal(size=(2, 8, 8, 4)).astype("float32")
    np.testing.assert_allclose(copy(x), model(x), atol=1e-4)


@pytest.mark.every_backbone
def test_convnext_exports_to_onnx(tmp_path):
    """The whole path for a real ConvNeXt (a minute and more; the fast test above checks the layer swap)."""
    _needs("onnx")
    model = classifier.build_classifier("convnext_tiny", 32, 3, "none", head_units=(8,))
    config = _config(tmp_path / "run", backbone="convnext_tiny", export_formats=("onnx",), calibrate="false")
    row = exporting.calibrate_and_export(model, config, make_splits(num_train=8, num_test=8))["parity"]["onnx"]
    assert row["agreement"] == 1.0 and row["max_probability_difference"] < 1e-4, row


def test_predict_marks_answers_below_the_threshold_uncertain(exported, tmp_path, capsys):
    export_path = str(tmp_path / "export")
    shutil.copytree(exported[1]["export_path"], export_path)
    folder = tmp_path / "images"
    folder.mkdir()
    pictures, _ = make_examples(6, seed=41, size=36)
    for i, picture in enumerate(pictures):
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(picture).numpy())
    serve = tf.saved_model.load(export_path).signatures["serving_default"]
    top = serve(images=tf.constant(pictures))["probabilities"].numpy().max(1)
    threshold = float(np.median(top))
    metadata = deploy.read_metadata(export_path)
    metadata["confidence_threshold"] = threshold
    deploy.write_metadata(export_path, metadata)

    result = predict.run(config_lib.Config(model_dir=None, mode="predict", export_dir=export_path,
                                           images=str(folder)))
    lines = capsys.readouterr().out.strip().splitlines()
    assert result["confidence_threshold"] == threshold
    for item, line, confidence in zip(result["results"], lines, top):
        assert item["uncertain"] == bool(confidence < threshold)
        assert line.endswith("(uncertain)") == item["uncertain"]
    assert 0 < sum(item["uncertain"] for item in result["results"]) < len(pictures)


def test_a_missing_package_stops_the_run_before_any_stage(make_config, monkeypatch):
    """Found when the run starts, not after an hour of training."""
    real = formats.import_package

    def absent(name):
        if name == "onnxruntime":
            raise ModuleNotFoundError("No module named 'onnxruntime'")
        return real(name)

    monkeypatch.setattr(formats, "import_package", absent)
    monkeypatch.setattr(stages, "train_stage", lambda *a, **k: pytest.fail("a stage ran"))
    config = make_config(export_formats=("onnx",))
    with pytest.raises(UserError, match=r"needs onnxruntime \(not installed\)"):
        train.run(config, splits=make_splits())
    assert not os.path.exists(os.path.join(config.model_dir, "checkpoints"))
