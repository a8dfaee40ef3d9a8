"""Every command-line flag of the trainer, defined once, and the parser and help that main uses.

`python -m tl_keras.main` imports main as `__main__`, so the flags live here and not in main.py:
anything else that imported tl_keras.main would otherwise define them twice.
"""

import sys
import textwrap

from absl import flags

from tl_keras import config as config_lib
from tl_keras.model import registry

FLAGS = flags.FLAGS
_DEFAULTS = config_lib.Config(model_dir="unused")
# absl.app defines --help, -? and --helpshort to print main's docstring; -h is ours. --helpfull stays absl's.
HELP_ARGS = ("--help", "-help", "-h", "--helpshort", "-helpshort", "-?")
# Flags given on the command line itself, not through a --flagfile: set by parse().
_ON_COMMAND_LINE = set()
_WIDTH = 100

# The run.
flags.DEFINE_string("model_dir", None, "Run directory: logs/, checkpoints/, metrics.json, export/.")
flags.DEFINE_enum("mode", _DEFAULTS.mode, config_lib.MODES,
                  "train: every stage, evaluate and export. evaluate / export: reuse a trained model_dir "
                  "(evaluate writes a report on --test_split to model_dir/eval/). predict: classify "
                  "--images with the exported SavedModel. lr_find: the learning-rate range test of one "
                  "stage (--lr_find_stage), written to model_dir/lr_find/; it trains nothing that stays.")
flags.DEFINE_enum("checkpoint", _DEFAULTS.checkpoint, config_lib.CHECKPOINTS,
                  "Which checkpoint --mode=evaluate/export loads: the last epoch, or the best validation "
                  "accuracy.")
flags.DEFINE_boolean("overwrite", _DEFAULTS.overwrite,
                     "Start fresh in a model_dir that holds a run (default: resume it, or do nothing "
                     "if it finished).")
flags.DEFINE_integer("save_every_steps", None,
                     "Also save resumable state every N train steps inside an epoch (default: each epoch).")
flags.DEFINE_boolean("deterministic", _DEFAULTS.deterministic,
                     "Enable TensorFlow op determinism: the same seed gives the same run, resumed or not.")

# Data.
flags.DEFINE_string("dataset", _DEFAULTS.dataset,
                    "TFDS image-classification dataset name (any with an Image and a ClassLabel feature), "
                    "or folder:PATH for your own images, one subfolder per class (optionally under "
                    "train/, val/ or validation/, and test/).")
flags.DEFINE_string("data_dir", None,
                    "TFDS data directory. Point it at a prepared copy to run offline.")
flags.DEFINE_string("train_split", _DEFAULTS.train_split, "TFDS split to train on, e.g. train[:10%].")
flags.DEFINE_string("test_split", _DEFAULTS.test_split,
                    "TFDS split reported as test accuracy, e.g. test or train[90%:].")
flags.DEFINE_float("validation_split", _DEFAULTS.validation_split,
                   "Fraction of the train split held out (seeded) for per-epoch validation. 0 disables. "
                   "Data with its own validation split (TFDS 'validation', a folder's val/) uses that.")
flags.DEFINE_float("test_split_fraction", _DEFAULTS.test_split_fraction,
                   "Fraction held out (seeded; stratified for folders) as the test split when the data "
                   "has none: a folder without test/, or a TFDS dataset without a 'test' split. "
                   "0: report accuracy on the validation split instead.")
flags.DEFINE_boolean("strict", _DEFAULTS.strict,
                     "Fail on unreadable images in a folder dataset instead of skipping them with a warning.")
flags.DEFINE_enum("class_weight", _DEFAULTS.class_weight, config_lib.CLASS_WEIGHTS,
                  "balanced: weight the training loss by n / (classes * n_class), for imbalanced data.")
flags.DEFINE_integer("image_size", _DEFAULTS.image_size, "Side in pixels that images are resized to.")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size,
                     "Global batch size, split across replicas; must divide by their number.")
flags.DEFINE_string("augment", _DEFAULTS.augment,
                    "Training augmentation: none, or a comma-separated set of flip (random horizontal "
                    "flips), flip_translate (flips plus random shifts of up to 1/8 of the side), randaugment "
                    "(keras.layers.RandAugment), erasing (RandomErasing), mixup (MixUp) and cutmix (CutMix; "
                    "with mixup, each batch gets one of the two). E.g. flip_translate,mixup. Each example's "
                    "augmentation depends only on --seed, the epoch and the example.")
flags.DEFINE_integer("randaugment_ops", _DEFAULTS.randaugment_ops,
                     "randaugment: operations applied to each image, chosen at random from RandAugment's 11.")
flags.DEFINE_float("randaugment_magnitude", _DEFAULTS.randaugment_magnitude,
                   "randaugment: the largest strength of an operation, in (0, 1] (RandAugment's factor).")
flags.DEFINE_float("erasing_probability", _DEFAULTS.erasing_probability,
                   "erasing: the probability that an image gets a random rectangle filled with noise.")
flags.DEFINE_float("mixup_alpha", _DEFAULTS.mixup_alpha,
                   "mixup: images and labels mixed with a weight drawn from Beta(alpha, alpha), in (0, 1].")
flags.DEFINE_float("cutmix_alpha", _DEFAULTS.cutmix_alpha,
                   "cutmix: the pasted rectangle's share of the image drawn from Beta(alpha, alpha), in "
                   "(0, 1]; the labels are mixed by that share.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed for the validation hold-out, shuffling and augmentation.")

# Model.
flags.DEFINE_string("backbone", _DEFAULTS.backbone,
                    "Any keras.applications image model by its snake_case name (resnet50, efficientnet_v2_s, "
                    "convnext_tiny, ...). --backbone=list prints them all with their parameters and input "
                    "sizes, and exits. 'tiny' is for tests only. hub:PRESET: a KerasHub image backbone "
                    "preset with its own preprocessing, such as hub:dinov2_small (needs "
                    "pip install -e \".[hub]\"); --weights=imagenet then means the preset's weights.")
flags.DEFINE_string("weights", _DEFAULTS.weights,
                    "Backbone weights: imagenet (downloads), none, or a path to a .h5 weights file.")
flags.DEFINE_enum("backbone_bn", _DEFAULTS.backbone_bn, registry.BACKBONE_BN,
                  "frozen: the backbone always runs in inference mode and its BatchNormalization layers "
                  "never train, as the Keras transfer-learning guide prescribes. train: while fine-tuning, "
                  "unfrozen BatchNormalization layers normalise with batch statistics and update their "
                  "moving statistics (and the backbone's own dropout, such as EfficientNet's, is active).")
flags.DEFINE_list("head_units", list(map(str, _DEFAULTS.head_units)),
                  "Hidden Dense layer sizes of the head, e.g. 512,256. Empty for a linear head.")
flags.DEFINE_boolean("head_batchnorm", _DEFAULTS.head_batchnorm,
                     "BatchNormalization after pooling: standardises backbone features for the head.")
flags.DEFINE_float("dropout", _DEFAULTS.dropout, "Dropout rate before the final Dense layer.")

# Schedule, the head stage: frozen backbone.
flags.DEFINE_integer("head_epochs", _DEFAULTS.head_epochs, "Epochs training only the head (stage 'head').")
flags.DEFINE_string("head_learning_rate", str(_DEFAULTS.head_learning_rate),
                    "Adam learning rate of the head stage, or auto: the range test's suggestion (see "
                    "--mode=lr_find), found when the stage starts and kept on resume.")
flags.DEFINE_enum("cache_features", _DEFAULTS.cache_features, config_lib.CACHE_FEATURES,
                  "Compute frozen backbone outputs once instead of every epoch: pooled features for "
                  "the head stage, and for one fine-tuning stage the output of the frozen layers below "
                  "it, where one tensor separates them from the rest (any layer of VGG; between the "
                  "blocks of ResNet, EfficientNet, ConvNeXt, ...). Exact for --augment=none or flip "
                  "(both orientations are cached). auto: on only for those; true drops flip_translate's "
                  "translations and is refused with any other augmentation.")

# Schedule, the fine-tuning stages.
flags.DEFINE_integer("finetune_epochs", _DEFAULTS.finetune_epochs,
                     "Epochs after unfreezing the top of the backbone (stage 'finetune'). 0: no "
                     "fine-tuning.")
flags.DEFINE_string("finetune_learning_rate", str(_DEFAULTS.finetune_learning_rate),
                    "Peak Adam learning rate of fine-tuning, reached after warmup, then cosine decay; or "
                    "auto (the range test's suggestion for the first fine-tuning stage).")
flags.DEFINE_float("finetune_warmup_epochs", _DEFAULTS.finetune_warmup_epochs,
                   "Linear warmup length of fine-tuning, in epochs.")
flags.DEFINE_string("fine_tune_at", _DEFAULTS.fine_tune_at,
                    "Where fine-tuning unfreezes the backbone from: all; top:N, the last N stages (blocks) "
                    "of any backbone (top:1 is conv5 of a ResNet, stage3 of a ConvNeXt); a stage's name; or "
                    "the first weighted layer to unfreeze (e.g. block5_conv1). A bad value lists the stages.")
flags.DEFINE_string("unfreeze_schedule", None,
                    "Gradual unfreezing: LAYER=EPOCHS,... such as block5_conv1=1,block4_conv1=1,all=2 (one "
                    "epoch from block 5, one from block 4, two with every layer trainable). Each item is a "
                    "stage named unfreeze_LAYER. Replaces --fine_tune_at and --finetune_epochs.")
flags.DEFINE_enum("stage_lr_schedule", _DEFAULTS.stage_lr_schedule, config_lib.STAGE_LR_SCHEDULES,
                  "shared: the fine-tuning stages share one warmup and one cosine decay, which reaches zero "
                  "at the last stage's last step. per_stage: each stage warms up and decays on its own.")
flags.DEFINE_float("layerwise_lr_decay", None,
                   "Discriminative learning rates while fine-tuning: each backbone block learns at this "
                   "factor times the rate of the block above it (e.g. 0.7); the head at the full rate.")
flags.DEFINE_integer("early_stopping_patience", None,
                     "End a stage after this many epochs without a better validation accuracy, and go on "
                     "from that stage's best weights. Needs a validation split.")
flags.DEFINE_string("lr_find_stage", None,
                    "--mode=lr_find: the stage to test, by name (head, finetune, unfreeze_LAYER). Default: "
                    "the first. Earlier stages are not trained first: the test starts from the weights.")
flags.DEFINE_integer("lr_find_steps", _DEFAULTS.lr_find_steps,
                     "Steps of the learning-rate range test (it stops early when the loss diverges).")

# Schedule, every stage.
flags.DEFINE_float("label_smoothing", _DEFAULTS.label_smoothing, "Label smoothing of the loss.")
flags.DEFINE_float("ema_decay", None,
                   "Keep an exponential moving average of the weights with this decay (e.g. 0.999; it "
                   "averages over about 1 / (1 - decay) steps), and validate, checkpoint, evaluate and "
                   "export the average. Each stage starts a new average from the weights it starts with.")
flags.DEFINE_boolean("scale_lr_with_batch", _DEFAULTS.scale_lr_with_batch,
                     "Multiply both learning rates by the number of replicas (linear scaling rule).")
flags.DEFINE_integer("steps_per_epoch", None, "Cap on train steps per epoch, for short runs.")
flags.DEFINE_string("time_budget", None,
                    "Finish the whole run (data, training, evaluation, export) within this time, e.g. 30m, "
                    "1h30m or 90s: every stage but the last keeps its epochs and the last gets every step "
                    "that fits, planned from measured speeds (its own epoch count then only says that it "
                    "runs).")
flags.DEFINE_integer("eval_steps", None, "Cap on validation and test steps, for short runs.")

# Devices.
flags.DEFINE_enum("distribution_strategy", _DEFAULTS.distribution_strategy, config_lib.STRATEGIES,
                  "auto: mirrored with more than one GPU, else default.")
flags.DEFINE_integer("num_gpus", None, "mirrored: use the first N GPUs (default: all).")
flags.DEFINE_string("tpu", None, "tpu: the TPU name or address for TPUClusterResolver.")
flags.DEFINE_enum("mixed_precision", _DEFAULTS.mixed_precision, config_lib.PRECISIONS,
                  "auto: mixed_float16 on GPUs of compute capability >= 7.0, mixed_bfloat16 on TPU and on "
                  "CPUs with AMX, else float32. The final layer, the loss and the export's outputs stay "
                  "float32.")
flags.DEFINE_boolean("jit_compile", _DEFAULTS.jit_compile, "Compile train steps with XLA.")
flags.DEFINE_integer("steps_per_execution", _DEFAULTS.steps_per_execution,
                     "Train steps per tf.function call (fewer host round trips on fast accelerators).")

# Serving.
flags.DEFINE_list("export_formats", list(_DEFAULTS.export_formats),
                  "Artifacts written into each export version directory, all taking uint8 images with "
                  "preprocessing inside, each checked by its own runtime on the test split: saved_model "
                  "(always written), tflite, tflite_int8, onnx, openvino. onnx and openvino need "
                  "pip install -e \".[deploy]\".")
flags.DEFINE_boolean("export_tflite", _DEFAULTS.export_tflite,
                     "Also write model.tflite into the export version directory (adds tflite to "
                     "--export_formats).")
flags.DEFINE_enum("tta", _DEFAULTS.tta, config_lib.TTA_MODES,
                  "Test-time augmentation of each stage's test evaluation and of --mode=evaluate. flip: "
                  "average the logits of each image and its mirror image (metrics.json and report.json "
                  "then say tta: flip, and keep the single-view numbers beside).")
flags.DEFINE_boolean("export_tta", _DEFAULTS.export_tta,
                     "Put --tta's views into every exported format, so that serving averages them too "
                     "(twice the inference cost). Needs --tta=flip.")
flags.DEFINE_integer("parity_examples", None,
                     "Test examples each exported format is run on to check it against the Keras model "
                     "(default: the whole test split).")
flags.DEFINE_enum("calibrate", _DEFAULTS.calibrate, config_lib.CALIBRATIONS,
                  "Fit a softmax temperature on the validation split after training and put it into the "
                  "exported signatures, so served probabilities are calibrated. auto: when there is a "
                  "validation split.")
flags.DEFINE_float("target_accuracy", _DEFAULTS.target_accuracy,
                   "Choose, on the validation split, the confidence threshold whose predictions reach this "
                   "accuracy; it goes into the export's metadata.json and --mode=predict marks answers "
                   "below it as uncertain.")
flags.DEFINE_float("min_accuracy", None,
                   "Fail training (exit 1, no export) when the final test accuracy is below this.")
flags.DEFINE_string("images", None,
                    "--mode=predict: glob of image files (JPEG, PNG, GIF, BMP, WebP), or a folder.")
flags.DEFINE_string("export_dir", None,
                    "--mode=predict: SavedModel to load. Default: the latest version under model_dir/export.")
flags.DEFINE_string("output_json", None, "--mode=predict: also write the predictions to this JSON file.")
flags.DEFINE_integer("top_k", _DEFAULTS.top_k, "--mode=predict: classes shown per image.")
flags.DEFINE_integer("max_image_pixels", _DEFAULTS.max_image_pixels,
                     "Largest image (height x width) that is decoded, in folder datasets, --mode=predict and "
                     "the export's signatures; larger ones are refused from their header, before decoding.")

# TensorBoard.
flags.DEFINE_integer("log_every_steps", _DEFAULTS.log_every_steps,
                     "Write train scalars every this many steps, besides every epoch. 0 disables.")
flags.DEFINE_list("profile_steps", list(map(str, _DEFAULTS.profile_steps)),
                  "START,END: capture a profiler trace of global train steps START to END (from 1), "
                  "viewable in TensorBoard's Profile tab. Empty disables.")


def parse(argv):
    """absl.app's flags_parser: our help for --help, and absl's flag errors as one line, not a usage dump."""
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    _ON_COMMAND_LINE.clear()
    _ON_COMMAND_LINE.update(_flag_name(arg) for arg in args if arg.startswith("-"))
    if any(arg in HELP_ARGS for arg in args):
        sys.stdout.write(help_text())
        sys.exit(0)
    try:
        remaining = FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"tl_keras: error: {e}")
    if len(remaining) > 1:  # Everything is a flag: a stray word is a typo, not an input.
        sys.exit(f"tl_keras: error: unexpected arguments: {' '.join(remaining[1:])}")
    if FLAGS.backbone == registry.LIST:  # From the registry's data: no model, no --model_dir.
        sys.stdout.write(registry.describe())
        sys.exit(0)
    return remaining


def _flag_name(arg: str) -> str:
    name = arg.lstrip("-").split("=", 1)[0]
    return name[2:] if name.startswith("no") and name[2:] in FLAGS and FLAGS[name[2:]].boolean else name


def help_text() -> str:
    """Usage and the trainer's flags by config group; absl's own flags stay under --helpfull."""
    lines = [
        "usage: tl-keras --flagfile=FILE [--flag=value ...]",
        "   or: python -m tl_keras.main --flagfile=FILE [--flag=value ...]",
        "",
        "Transfer learning for keras.applications backbones, in stages: train a head on a frozen backbone,",
        "then unfreeze more of it; evaluate, export and predict. Later flags override a flagfile's.",
    ]
    fields = config_lib.Config.__dataclass_fields__
    for group, title in config_lib.GROUPS:
        lines += ["", title]
        lines += [_describe(FLAGS[name]) for name in fields if config_lib.group_of(name) == group]
    # Flags of a program built on this parser (tools/bench.py): absl files __main__'s under argv[0].
    own = sorted((f for f in FLAGS.get_key_flags_for_module(sys.argv[0]) if f.name not in fields),
                 key=lambda f: f.name)
    if own:
        lines += ["", "Flags of this program"] + [_describe(flag) for flag in own]
    lines += ["", "absl's own flags: --helpfull"]
    return "\n".join(lines) + "\n"


def _describe(flag) -> str:
    """One flag as `--name=<choices> (default: value)` over its wrapped help."""
    name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
    text = flag.help
    choices = getattr(flag.parser, "enum_values", None)
    if choices:
        name += f"=<{'|'.join(choices)}>"
        text = text.removeprefix(f"<{'|'.join(choices)}>: ")
    if flag.default is not None:
        name += f" (default: {_show_default(flag.default)})"
    return f"  {name}\n" + textwrap.fill(text, _WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)


def _show_default(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or "''"
    return str(value) if value != "" else "''"


def get_config(flag_values=FLAGS, command_line: set | None = None) -> config_lib.Config:
    """Turn parsed flags into the frozen Config; raises UserError on bad combinations."""
    kwargs = {}
    for field, spec in config_lib.Config.__dataclass_fields__.items():
        value = flag_values[field].value
        if value == "" and spec.default is None:  # --time_budget= unsets what a flagfile set.
            value = None
        if field == "head_units":
            value = tuple(_parse_units(value))
        elif field == "profile_steps":
            value = tuple(_parse_ints(field, value))
        elif field in ("head_learning_rate", "finetune_learning_rate"):
            value = _parse_rate(field, value)
        elif field == "export_formats":
            value = tuple(value)
        kwargs[field] = value
    if kwargs["unfreeze_schedule"]:
        _replace_fine_tuning(kwargs, _ON_COMMAND_LINE if command_line is None else command_line)
    return config_lib.Config(**kwargs)


def _parse_rate(name, value):
    if value == config_lib.AUTO:
        return value
    try:
        return float(value)
    except ValueError:
        raise config_lib.UserError(f"--{name} must be a number or auto. Received: {name}={value}") from None


def _replace_fine_tuning(kwargs, command_line: set):
    """--unfreeze_schedule replaces --fine_tune_at and --finetune_epochs: a flagfile's values give way
    to it (so a recipe's flagfile can be run with a schedule added), but the same command line giving
    both, with other values, is a contradiction."""
    try:
        points = config_lib.parse_unfreeze_schedule(kwargs["unfreeze_schedule"])
    except ValueError:
        return  # Config's validation says what is wrong with it.
    implied = {"fine_tune_at": points[0][0], "finetune_epochs": sum(e for _, e in points)}
    for name, value in implied.items():
        if name in command_line and kwargs[name] != value:
            raise config_lib.UserError(f"--unfreeze_schedule replaces --fine_tune_at and --finetune_epochs; "
                                       f"give one or the other (--unfreeze_schedule= turns a flagfile's "
                                       f"schedule off). Received: {name}={kwargs[name]}")
        kwargs[name] = value


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
