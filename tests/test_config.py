"""Flags -> frozen Config: validation messages, lifetimes, flagfiles, and the flags.txt round trip."""

import dataclasses
import glob
import os
import re

from absl.testing import flagsaver
import pytest

from tl_keras import config as config_lib
from tl_keras import flags as tl_flags
from tl_keras.errors import UserError

from helpers import REPO


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
    (dict(weights="weights.bin"), "Received: weights=weights.bin"),
    (dict(dropout=1.5), "Received: dropout=1.5"),
    (dict(head_learning_rate=0.0), "Received: head_learning_rate=0.0"),
    (dict(steps_per_epoch=0), "Received: steps_per_epoch=0"),
    (dict(augment="sideways"), "Received: augment=sideways"),
    (dict(model_dir=""), "Received: model_dir="),
    (dict(dataset="folder:"), "Received: dataset=folder:"),
])
def test_bad_values_name_the_flag_and_value(make_config, overrides, message):
    with pytest.raises(UserError, match=message):
        make_config(**overrides)


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


# The pre-lifetime string sets, verbatim: the lifetimes must accept exactly what they accepted.
OLD_RESUME_MAY_CHANGE = {
    "model_dir", "data_dir", "mode", "checkpoint", "overwrite", "save_every_steps",
    "distribution_strategy", "log_every_steps", "profile_steps", "eval_steps", "num_gpus", "tpu",
    "jit_compile", "steps_per_execution",
}
OLD_ARCHITECTURE = {"backbone", "image_size", "head_units", "head_batchnorm", "dataset"}
OLD_NOT_HPARAMS = {"model_dir", "mode", "data_dir"}
# Fields added since, with the lifetime each was given on purpose.
ADDED_SINCE = {"max_image_pixels": config_lib.RUNTIME, "time_budget": config_lib.EXPERIMENT,
               "unfreeze_schedule": config_lib.EXPERIMENT, "stage_lr_schedule": config_lib.EXPERIMENT,
               "layerwise_lr_decay": config_lib.EXPERIMENT, "early_stopping_patience": config_lib.EXPERIMENT,
               "lr_find_stage": config_lib.RUNTIME, "lr_find_steps": config_lib.RUNTIME,
               # Applied after training (export, calibration, parity): a resumed run may change them.
               "export_formats": config_lib.RUNTIME, "parity_examples": config_lib.RUNTIME,
               "calibrate": config_lib.RUNTIME, "target_accuracy": config_lib.RUNTIME,
               # Issue 16: augmentation strengths and weight averaging train; test-time augmentation
               # changes only what is measured and exported.
               "randaugment_ops": config_lib.EXPERIMENT, "randaugment_magnitude": config_lib.EXPERIMENT,
               "erasing_probability": config_lib.EXPERIMENT, "mixup_alpha": config_lib.EXPERIMENT,
               "cutmix_alpha": config_lib.EXPERIMENT, "ema_decay": config_lib.EXPERIMENT,
               "tta": config_lib.RUNTIME, "export_tta": config_lib.RUNTIME,
               # Issue 17: how fine-tuning treats BatchNormalization changes what trains, not the weights.
               "backbone_bn": config_lib.EXPERIMENT}


def test_lifetimes_accept_what_the_old_name_sets_accepted():
    added = {lifetime: {name for name, life in ADDED_SINCE.items() if life == lifetime}
             for lifetime in config_lib.LIFETIMES}
    assert config_lib.names(config_lib.RUNTIME, config_lib.LOCATION) == (
        OLD_RESUME_MAY_CHANGE | added[config_lib.RUNTIME] | added[config_lib.LOCATION])
    assert config_lib.names(config_lib.ARCHITECTURE) == OLD_ARCHITECTURE | added[config_lib.ARCHITECTURE]
    assert config_lib.names(config_lib.LOCATION) == OLD_NOT_HPARAMS | added[config_lib.LOCATION]
    everything = {field.name for field in dataclasses.fields(config_lib.Config)}
    assert config_lib.names(config_lib.EXPERIMENT) == (
        everything - OLD_RESUME_MAY_CHANGE - OLD_ARCHITECTURE - set(ADDED_SINCE)
    ) | added[config_lib.EXPERIMENT]


def test_every_field_declares_one_group_and_one_lifetime():
    groups = [group for group, _ in config_lib.GROUPS]
    assert len(set(groups)) == len(groups)
    for field in dataclasses.fields(config_lib.Config):
        assert config_lib.group_of(field.name) in groups, field.name
        assert config_lib.lifetime_of(field.name) in config_lib.LIFETIMES, field.name
    assert config_lib.names(*config_lib.LIFETIMES) == {f.name for f in dataclasses.fields(config_lib.Config)}
    assert {config_lib.group_of(f.name) for f in dataclasses.fields(config_lib.Config)} == set(groups)


def test_unknown_lifetime_or_name_is_refused():
    with pytest.raises(ValueError, match="Received: lifetime=forever"):
        config_lib.names("forever")
    with pytest.raises(ValueError, match="Received: name=nosuch"):
        config_lib.group_of("nosuch")


def test_differences_names_changed_fields_only(make_config):
    saved = dataclasses.asdict(make_config(head_units=(16, 8), batch_size=8))
    saved["head_units"] = list(saved["head_units"])  # As json.load returns it.
    config = make_config(head_units=(32,), batch_size=8, overwrite=True)
    assert config_lib.differences(saved, config, config_lib.names(config_lib.ARCHITECTURE)) == [
        "head_units: 16,8 -> 32"]
    resume_fixed = set(saved) - config_lib.names(config_lib.RUNTIME, config_lib.LOCATION)
    assert config_lib.differences(saved, config, resume_fixed) == ["head_units: 16,8 -> 32"]


def test_config_checks_values_not_the_file_system(make_config, tmp_path):
    """What exists on disk is the runner's to check (run_dir.check_paths), so a Config can describe
    a run on another machine."""
    file = tmp_path / "file"
    file.write_text("data")
    config = make_config(model_dir=str(file), weights="/no/such/file.weights.h5",
                         dataset=f"folder:{tmp_path}/missing")
    assert config.weights_path == "/no/such/file.weights.h5"


# The file-system checks that moved from Config.validate() to the runner, with the same messages.

def test_model_dir_that_is_a_file_is_refused(make_config, tmp_path):
    from tl_keras.training import run_dir

    path = tmp_path / "file"
    path.write_text("data")
    message = f"--model_dir exists and is not a directory. Received: model_dir={path}"
    with pytest.raises(UserError, match=re.escape(message)):
        run_dir.check_paths(make_config(model_dir=str(path)))
    assert path.read_text() == "data"


def test_missing_weights_file_is_refused(make_config):
    from tl_keras.training import run_dir

    message = "--weights file does not exist. Received: weights=/no/such/file.weights.h5"
    with pytest.raises(UserError, match=re.escape(message)):
        run_dir.check_paths(make_config(weights="/no/such/file.weights.h5"))


def test_missing_dataset_folder_is_refused(make_config, tmp_path):
    from tl_keras.training import run_dir

    dataset = f"folder:{tmp_path}/missing"
    message = ("--dataset=folder:PATH needs PATH to be a directory with one subfolder per class. "
               f"Received: dataset={dataset}")
    with pytest.raises(UserError, match=re.escape(message)):
        run_dir.check_paths(make_config(dataset=dataset))


@pytest.mark.parametrize("name, value", [
    ("head_learning_rate", float("inf")), ("finetune_learning_rate", float("nan")),
    ("finetune_warmup_epochs", float("nan")), ("finetune_warmup_epochs", float("inf")),
    ("dropout", float("nan")), ("label_smoothing", float("nan")), ("validation_split", float("nan")),
    ("test_split_fraction", float("nan")), ("min_accuracy", float("nan")),
])
def test_non_finite_floats_are_refused(make_config, name, value):
    """A learning rate of inf or a warmup of nan would pass every range check and fail hours later."""
    with pytest.raises(UserError, match=rf"--{name} must be a finite number. Received: {name}={value}"):
        make_config(**{name: value})


def test_an_empty_value_unsets_an_optional_flag(tmp_path):
    """--time_budget= after a flagfile that sets one runs by the epoch flags again."""
    flagfile = tmp_path / "budget.flags"
    flagfile.write_text("--time_budget=30m\n--model_dir=/tmp/x\n")
    assert parse([f"--flagfile={flagfile}"]).time_budget_seconds == 1800
    assert parse([f"--flagfile={flagfile}", "--time_budget="]).time_budget is None
    with pytest.raises(UserError, match="Received: time_budget=30min"):
        parse([f"--flagfile={flagfile}", "--time_budget=30min"])
