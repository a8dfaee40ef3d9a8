"""Flags -> frozen Config: validation messages, flagfiles, and the flags.txt round trip."""

import dataclasses
import glob
import os

from absl.testing import flagsaver
import pytest

from tl_keras import flags as tl_flags
from tl_keras.errors import UserError

from conftest import REPO


def parse(argv):
    """Parse argv into a Config; flagsaver restores the global flags afterwards."""
    with flagsaver.flagsaver():
        tl_flags.FLAGS.unparse_flags()
        tl_flags.FLAGS(["prog"] + argv)
        return tl_flags.get_config()


def test_config_is_frozen(make_config):
    config = make_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 8


@pytest.mark.parametrize("overrides, message", [
    (dict(backbone="vgg16", image_size=16), "Received: image_size=16"),
    (dict(batch_size=0), "Received: batch_size=0"),
    (dict(validation_split=1.0), "Received: validation_split=1.0"),
    (dict(weights="/no/such/file.weights.h5"), "Received: weights=/no/such/file.weights.h5"),
    (dict(weights="weights.bin"), "Received: weights=weights.bin"),
    (dict(dropout=1.5), "Received: dropout=1.5"),
    (dict(head_learning_rate=0.0), "Received: head_learning_rate=0.0"),
    (dict(steps_per_epoch=0), "Received: steps_per_epoch=0"),
    (dict(augment="sideways"), "Received: augment=sideways"),
    (dict(model_dir=""), "Received: model_dir="),
])
def test_bad_values_name_the_flag_and_value(make_config, overrides, message):
    with pytest.raises(UserError, match=message):
        make_config(**overrides)


def test_model_dir_that_is_a_file_is_refused(make_config, tmp_path):
    path = tmp_path / "file"
    path.write_text("data")
    with pytest.raises(UserError, match="not a directory"):
        make_config(model_dir=str(path))
    assert path.read_text() == "data"


def test_vgg16_error_mentions_minimum(make_config):
    with pytest.raises(UserError, match="at least 32 for backbone vgg16"):
        make_config(backbone="vgg16", image_size=16)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.flags"))))
def test_every_shipped_flagfile_parses(path):
    config = parse([f"--flagfile={path}", "--weights=none"])
    assert config.dataset
    assert config.model_dir


def test_shipped_flagfiles_exist():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.flags"))}
    assert {"cifar.flags", "cifar_cpu.flags", "smoke.flags"} <= names


def test_later_flags_override_the_flagfile():
    path = os.path.join(REPO, "configs", "cifar_cpu.flags")
    config = parse([f"--flagfile={path}", "--weights=none", "--head_epochs=1"])
    assert config.head_epochs == 1


def test_flags_txt_round_trips(make_config, tmp_path):
    config = make_config(head_units=(16, 8), augment="flip", steps_per_epoch=3, dataset="cifar10")
    path = tmp_path / "flags.txt"
    path.write_text(config.to_flagfile())
    assert parse([f"--flagfile={path}"]) == config


def test_empty_head_units_round_trip(make_config, tmp_path):
    config = make_config(head_units=())
    path = tmp_path / "flags.txt"
    path.write_text(config.to_flagfile())
    assert parse([f"--flagfile={path}"]).head_units == ()


def test_non_integer_head_units_is_a_user_error():
    with pytest.raises(UserError, match="Received: head_units=wide"):
        parse(["--model_dir=/tmp/x", "--head_units=wide"])


@pytest.mark.parametrize("overrides, message", [
    (dict(min_accuracy=1.5), "Received: min_accuracy=1.5"),
    (dict(mode="predict"), "Received: images=None"),
    (dict(mode="predict", images="*.png", top_k=0), "Received: top_k=0"),
    (dict(model_dir=None, mode="predict", images="*.png"), "Received: model_dir=None"),
])
def test_bad_serving_values_name_the_flag_and_value(make_config, overrides, message):
    with pytest.raises(UserError, match=message):
        make_config(**overrides)


def test_serving_flags_round_trip(make_config, tmp_path):
    config = make_config(export_tflite=True, min_accuracy=0.5, top_k=3)
    path = tmp_path / "flags.txt"
    path.write_text(config.to_flagfile())
    assert parse([f"--flagfile={path}"]) == config
    # Predicting from an export needs no model_dir.
    predict = parse([f"--export_dir={tmp_path}", "--mode=predict", "--images=/tmp/*.jpg"])
    assert predict.model_dir is None and predict.export_dir == str(tmp_path)
