"""Every command-line flag, defined once.

`python -m tl_keras.main` imports main as `__main__`, so the flags live here and not in main.py:
anything else that imported tl_keras.main would otherwise define them twice.
"""

from absl import flags

from tl_keras import backbones
from tl_keras import config as config_lib

FLAGS = flags.FLAGS
_DEFAULTS = config_lib.Config(model_dir="unused")

flags.DEFINE_string("model_dir", None, "Run directory: logs/, checkpoints/, metrics.json, export/.")
flags.DEFINE_enum("mode", _DEFAULTS.mode, config_lib.MODES,
                  "train: both phases, evaluate and export. evaluate / export: reuse a trained model_dir.")

# Data.
flags.DEFINE_string("dataset", _DEFAULTS.dataset, "TFDS image-classification dataset name.")
flags.DEFINE_string("data_dir", None,
                    "TFDS data directory. Point it at a prepared copy to run offline.")
flags.DEFINE_string("train_split", _DEFAULTS.train_split, "TFDS split to train on, e.g. train[:10%].")
flags.DEFINE_string("test_split", _DEFAULTS.test_split, "TFDS split reported as test accuracy.")
flags.DEFINE_float("validation_split", _DEFAULTS.validation_split,
                   "Fraction of the train split held out (seeded) for per-epoch validation. 0 disables.")
flags.DEFINE_integer("image_size", _DEFAULTS.image_size, "Side in pixels that images are resized to.")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size,
                     "Global batch size, split across replicas; must divide by their number.")
flags.DEFINE_enum("augment", _DEFAULTS.augment, config_lib.AUGMENTATIONS,
                  "Training augmentation: none, random horizontal flips, or flips plus random "
                  "translations of up to 1/8 of the side.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed for the validation hold-out, shuffling and augmentation.")

# Model.
flags.DEFINE_enum("backbone", _DEFAULTS.backbone, sorted(backbones.BACKBONES),
                  "keras.applications backbone ('tiny' is for tests only).")
flags.DEFINE_string("weights", _DEFAULTS.weights,
                    "Backbone weights: imagenet (downloads), none, or a path to a .h5 weights file.")
flags.DEFINE_list("head_units", list(map(str, _DEFAULTS.head_units)),
                  "Hidden Dense layer sizes of the head, e.g. 512,256. Empty for a linear head.")
flags.DEFINE_boolean("head_batchnorm", _DEFAULTS.head_batchnorm,
                     "BatchNormalization after pooling: standardises backbone features for the head.")
flags.DEFINE_float("dropout", _DEFAULTS.dropout, "Dropout rate before the final Dense layer.")

# Phase 1: frozen backbone.
flags.DEFINE_integer("head_epochs", _DEFAULTS.head_epochs, "Epochs training only the head.")
flags.DEFINE_float("head_learning_rate", _DEFAULTS.head_learning_rate, "Adam learning rate for phase 1.")
flags.DEFINE_enum("cache_features", _DEFAULTS.cache_features, config_lib.CACHE_FEATURES,
                  "Compute frozen backbone outputs once instead of every epoch: pooled features for "
                  "phase 1, and for phase 2 the output of the layers below --fine_tune_at (plain-chain "
                  "backbones such as VGG). Exact for --augment=none or flip (both orientations are "
                  "cached). auto: on unless --augment=flip_translate; true drops the translations.")

# Phase 2: fine-tuning.
flags.DEFINE_integer("finetune_epochs", _DEFAULTS.finetune_epochs,
                     "Epochs after unfreezing the top of the backbone. 0 skips phase 2.")
flags.DEFINE_float("finetune_learning_rate", _DEFAULTS.finetune_learning_rate,
                   "Peak Adam learning rate for phase 2, reached after warmup, then cosine decay.")
flags.DEFINE_float("finetune_warmup_epochs", _DEFAULTS.finetune_warmup_epochs,
                   "Linear warmup length of phase 2, in epochs.")
flags.DEFINE_string("fine_tune_at", _DEFAULTS.fine_tune_at,
                    "First backbone layer to unfreeze (e.g. block5_conv1), or 'all'.")
flags.DEFINE_float("label_smoothing", _DEFAULTS.label_smoothing, "Label smoothing of the loss.")

# Running.
flags.DEFINE_enum("distribution_strategy", _DEFAULTS.distribution_strategy, config_lib.STRATEGIES,
                  "auto: mirrored with more than one GPU, else default.")
flags.DEFINE_integer("steps_per_epoch", None, "Cap on train steps per epoch, for short runs.")
flags.DEFINE_integer("eval_steps", None, "Cap on validation and test steps, for short runs.")

# TensorBoard.
flags.DEFINE_integer("log_every_steps", _DEFAULTS.log_every_steps,
                     "Write train scalars every this many steps, besides every epoch. 0 disables.")
flags.DEFINE_list("profile_steps", list(map(str, _DEFAULTS.profile_steps)),
                  "START,END: capture a profiler trace of global train steps START to END (from 1), "
                  "viewable in TensorBoard's Profile tab. Empty disables.")


def get_config(flag_values=FLAGS) -> config_lib.Config:
    """Turn parsed flags into the frozen Config; raises UserError on bad combinations."""
    kwargs = {}
    for field in config_lib.Config.__dataclass_fields__:
        value = flag_values[field].value
        if field == "head_units":
            value = tuple(_parse_units(value))
        elif field == "profile_steps":
            value = tuple(_parse_ints(field, value))
        kwargs[field] = value
    return config_lib.Config(**kwargs)


def _parse_units(values):
    units = []
    for item in values:
        try:
            units.append(int(item))
        except ValueError:
            raise config_lib.UserError(
                f"--head_units must be a comma-separated list of integers. Received: head_units={item}"
            ) from None
    return units


def _parse_ints(name, values):
    try:
        return [int(item) for item in values]
    except ValueError:
        raise config_lib.UserError(
            f"--{name} must be a comma-separated list of integers. Received: {name}={','.join(values)}"
        ) from None
