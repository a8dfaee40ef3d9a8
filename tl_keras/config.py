"""The run's settings as one frozen, validated value that library code receives instead of FLAGS.

Each field declares its group (what it is for: the help lists flags by group) and its lifetime (when it
may change: the resume check, the evaluate/export check and the HParams read lifetimes, not name lists).
"""

import dataclasses
import math
import re

from tl_keras.errors import UserError
from tl_keras.model import registry

MODES = ("train", "evaluate", "export", "predict", "lr_find")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
CACHE_FEATURES = ("auto", "true", "false")
CHECKPOINTS = ("latest", "best")
# --augment: "none", or a comma-separated set of these names (flip and flip_translate exclude each other).
AUGMENTATIONS = ("none", "flip", "flip_translate", "randaugment", "erasing", "mixup", "cutmix")
# Augmentations a feature cache stores exactly (both orientations); flip_translate's shifts it drops.
CACHEABLE_AUGMENTATIONS = frozenset({"flip"})
TTA_MODES = ("none", "flip")
CLASS_WEIGHTS = ("none", "balanced")
# Export formats; saved_model is always written. The names are those of --export_formats.
EXPORT_FORMATS = ("saved_model", "tflite", "tflite_int8", "onnx", "openvino")
CALIBRATIONS = ("auto", "true", "false")
STAGE_LR_SCHEDULES = ("shared", "per_stage")
AUTO = "auto"  # A learning rate that --mode=lr_find's range test chooses when its stage starts.
FOLDER_PREFIX = "folder:"

# Lifetimes: when a setting may change, so that "may this change on resume?" is answered by declaration.
# Defines the model; fixed on resume, and evaluate/export/predict need it unchanged.
ARCHITECTURE = "architecture"
# What the run trains; fixed once training started. A TensorBoard HParam.
EXPERIMENT = "experiment"
# How the run is driven (devices, checkpoints, logging); may change on resume. A TensorBoard HParam.
RUNTIME = "runtime"
# Where the run lives and which mode runs; may change on resume. Not an HParam: it names no experiment.
LOCATION = "location"
LIFETIMES = (ARCHITECTURE, EXPERIMENT, RUNTIME, LOCATION)

# Groups: what a setting is for. The help lists flags by group, in this order.
RUN = "run"
DATA = "data"
MODEL = "model"
SCHEDULE = "schedule"
DEVICES = "devices"
SERVING = "serving"
TENSORBOARD = "tensorboard"
GROUPS = (
    (RUN, "The run: where it lives and what it does"),
    (DATA, "Data: where examples come from and how they become batches"),
    (MODEL, "Model: backbone and classifier head"),
    (SCHEDULE, "Schedule: stages that train the head on a frozen backbone, then unfreeze more of it"),
    (DEVICES, "Devices: distribution, precision and speed"),
    (SERVING, "Serving: the export, the accuracy gate and --mode=predict"),
    (TENSORBOARD, "TensorBoard: scalars and profiling"),
)
_GROUP_IDS = tuple(group for group, _ in GROUPS)


def setting(default=dataclasses.MISSING, *, group: str, lifetime: str):
    """A Config field that declares what it is for and when it may change."""
    if group not in _GROUP_IDS:
        raise ValueError(f"group must be one of {', '.join(_GROUP_IDS)}. Received: group={group}")
    if lifetime not in LIFETIMES:
        raise ValueError(f"lifetime must be one of {', '.join(LIFETIMES)}. Received: lifetime={lifetime}")
    return dataclasses.field(default=default, metadata={"group": group, "lifetime": lifetime})


@dataclasses.dataclass(frozen=True)
class Config:
    """Field names equal flag names, so flags.txt round-trips through --flagfile."""

    # The run.
    model_dir: str = setting(group=RUN, lifetime=LOCATION)
    mode: str = setting("train", group=RUN, lifetime=LOCATION)
    checkpoint: str = setting("latest", group=RUN, lifetime=RUNTIME)
    overwrite: bool = setting(False, group=RUN, lifetime=RUNTIME)
    save_every_steps: int | None = setting(None, group=RUN, lifetime=RUNTIME)
    deterministic: bool = setting(False, group=RUN, lifetime=EXPERIMENT)

    # Data.
    dataset: str = setting("cifar10", group=DATA, lifetime=ARCHITECTURE)
    data_dir: str | None = setting(None, group=DATA, lifetime=LOCATION)
    train_split: str = setting("train", group=DATA, lifetime=EXPERIMENT)
    test_split: str = setting("test", group=DATA, lifetime=EXPERIMENT)
    validation_split: float = setting(0.1, group=DATA, lifetime=EXPERIMENT)
    test_split_fraction: float = setting(0.0, group=DATA, lifetime=EXPERIMENT)
    strict: bool = setting(False, group=DATA, lifetime=EXPERIMENT)
    class_weight: str = setting("none", group=DATA, lifetime=EXPERIMENT)
    image_size: int = setting(32, group=DATA, lifetime=ARCHITECTURE)
    batch_size: int = setting(64, group=DATA, lifetime=EXPERIMENT)
    augment: str = setting("flip_translate", group=DATA, lifetime=EXPERIMENT)
    randaugment_ops: int = setting(2, group=DATA, lifetime=EXPERIMENT)
    randaugment_magnitude: float = setting(0.5, group=DATA, lifetime=EXPERIMENT)
    erasing_probability: float = setting(0.25, group=DATA, lifetime=EXPERIMENT)
    mixup_alpha: float = setting(0.2, group=DATA, lifetime=EXPERIMENT)
    cutmix_alpha: float = setting(1.0, group=DATA, lifetime=EXPERIMENT)
    seed: int = setting(42, group=DATA, lifetime=EXPERIMENT)

    # Model.
    backbone: str = setting("vgg16", group=MODEL, lifetime=ARCHITECTURE)
    weights: str = setting("imagenet", group=MODEL, lifetime=EXPERIMENT)
    backbone_bn: str = setting(registry.BN_FROZEN, group=MODEL, lifetime=EXPERIMENT)
    head_units: tuple[int, ...] = setting((256,), group=MODEL, lifetime=ARCHITECTURE)
    head_batchnorm: bool = setting(True, group=MODEL, lifetime=ARCHITECTURE)
    dropout: float = setting(0.3, group=MODEL, lifetime=EXPERIMENT)

    # Schedule.
    head_epochs: int = setting(3, group=SCHEDULE, lifetime=EXPERIMENT)
    head_learning_rate: float | str = setting(1e-3, group=SCHEDULE, lifetime=EXPERIMENT)
    cache_features: str = setting("auto", group=SCHEDULE, lifetime=EXPERIMENT)
    finetune_epochs: int = setting(3, group=SCHEDULE, lifetime=EXPERIMENT)
    finetune_learning_rate: float | str = setting(1e-4, group=SCHEDULE, lifetime=EXPERIMENT)
    finetune_warmup_epochs: float = setting(0.2, group=SCHEDULE, lifetime=EXPERIMENT)
    fine_tune_at: str = setting("block4_conv1", group=SCHEDULE, lifetime=EXPERIMENT)
    unfreeze_schedule: str | None = setting(None, group=SCHEDULE, lifetime=EXPERIMENT)
    stage_lr_schedule: str = setting("shared", group=SCHEDULE, lifetime=EXPERIMENT)
    layerwise_lr_decay: float | None = setting(None, group=SCHEDULE, lifetime=EXPERIMENT)
    early_stopping_patience: int | None = setting(None, group=SCHEDULE, lifetime=EXPERIMENT)
    lr_find_stage: str | None = setting(None, group=SCHEDULE, lifetime=RUNTIME)
    lr_find_steps: int = setting(100, group=SCHEDULE, lifetime=RUNTIME)
    label_smoothing: float = setting(0.0, group=SCHEDULE, lifetime=EXPERIMENT)
    ema_decay: float | None = setting(None, group=SCHEDULE, lifetime=EXPERIMENT)
    scale_lr_with_batch: bool = setting(False, group=SCHEDULE, lifetime=EXPERIMENT)
    steps_per_epoch: int | None = setting(None, group=SCHEDULE, lifetime=EXPERIMENT)
    time_budget: str | None = setting(None, group=SCHEDULE, lifetime=EXPERIMENT)
    eval_steps: int | None = setting(None, group=SCHEDULE, lifetime=RUNTIME)

    # Devices.
    distribution_strategy: str = setting("auto", group=DEVICES, lifetime=RUNTIME)
    num_gpus: int | None = setting(None, group=DEVICES, lifetime=RUNTIME)
    tpu: str | None = setting(None, group=DEVICES, lifetime=RUNTIME)
    mixed_precision: str = setting("auto", group=DEVICES, lifetime=EXPERIMENT)
    jit_compile: bool = setting(False, group=DEVICES, lifetime=RUNTIME)
    steps_per_execution: int = setting(1, group=DEVICES, lifetime=RUNTIME)

    # Serving.
    # What is exported and how it is checked happens after training, so a resumed run may change it.
    export_formats: tuple[str, ...] = setting(("saved_model",), group=SERVING, lifetime=RUNTIME)
    export_tflite: bool = setting(False, group=SERVING, lifetime=EXPERIMENT)
    # Test-time augmentation changes what is measured and exported, not what trains.
    tta: str = setting("none", group=SERVING, lifetime=RUNTIME)
    export_tta: bool = setting(False, group=SERVING, lifetime=RUNTIME)
    parity_examples: int | None = setting(None, group=SERVING, lifetime=RUNTIME)
    calibrate: str = setting("auto", group=SERVING, lifetime=RUNTIME)
    target_accuracy: float = setting(0.95, group=SERVING, lifetime=RUNTIME)
    min_accuracy: float | None = setting(None, group=SERVING, lifetime=EXPERIMENT)
    images: str | None = setting(None, group=SERVING, lifetime=EXPERIMENT)
    export_dir: str | None = setting(None, group=SERVING, lifetime=EXPERIMENT)
    output_json: str | None = setting(None, group=SERVING, lifetime=EXPERIMENT)
    top_k: int = setting(5, group=SERVING, lifetime=EXPERIMENT)
    max_image_pixels: int = setting(50_000_000, group=SERVING, lifetime=RUNTIME)

    # TensorBoard.
    log_every_steps: int = setting(100, group=TENSORBOARD, lifetime=RUNTIME)
    profile_steps: tuple[int, ...] = setting((), group=TENSORBOARD, lifetime=RUNTIME)

    def __post_init__(self):
        self.validate()
        # One spelling per set, so that a resumed run and flags.txt compare equal whatever the order.
        object.__setattr__(self, "augment", ",".join(self.augmentations) or "none")
        if self.unfreeze_schedule:  # It replaces both; flags.txt then repeats the values it implies.
            points = parse_unfreeze_schedule(self.unfreeze_schedule)
            object.__setattr__(self, "fine_tune_at", points[0][0])
            object.__setattr__(self, "finetune_epochs", sum(epochs for _, epochs in points))

    @property
    def unfreeze_points(self) -> list[tuple[str, int]]:
        """(first trainable backbone layer, epochs) of each fine-tuning stage, bottom of the list last."""
        if self.unfreeze_schedule:
            return parse_unfreeze_schedule(self.unfreeze_schedule)
        return [(self.fine_tune_at, self.finetune_epochs)] if self.finetune_epochs else []

    @property
    def time_budget_seconds(self) -> float | None:
        return parse_duration(self.time_budget) if self.time_budget else None

    @property
    def augmentations(self) -> tuple[str, ...]:
        """--augment's names in AUGMENTATIONS' order; () for none."""
        return tuple(sorted(parse_augment(self.augment), key=AUGMENTATIONS.index))

    @property
    def weights_path(self) -> str | None:
        """The weights file, or None for the named weights 'imagenet' and 'none'."""
        return None if self.weights in ("imagenet", "none") else self.weights

    def validate(self):
        """Raise UserError naming the first bad setting, in Keras's 'Received:' style.

        Only the values themselves: what exists on disk is the runner's to check, when it uses the paths.
        """
        for field in dataclasses.fields(self):  # inf and nan pass every range check below.
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                _fail(f"--{field.name} must be a finite number", **{field.name: value})
        if not self.model_dir and not (self.mode == "predict" and self.export_dir):
            _fail("--model_dir is required (for --mode=predict, or --export_dir)", model_dir=self.model_dir)
        if self.mode not in MODES:
            _fail(f"--mode must be one of {', '.join(MODES)}", mode=self.mode)
        if self.distribution_strategy not in STRATEGIES:
            _fail(
                f"--distribution_strategy must be one of {', '.join(STRATEGIES)}",
                distribution_strategy=self.distribution_strategy,
            )
        # --mode=predict reads the export alone: no model code, so no keras_hub either.
        problem = registry.check_backbone(self.backbone, needs_package=self.mode != "predict")
        if problem is not None:
            _fail(problem, backbone=self.backbone)
        if self.backbone_bn not in registry.BACKBONE_BN:
            _fail(f"--backbone_bn must be one of {', '.join(registry.BACKBONE_BN)}",
                  backbone_bn=self.backbone_bn)
        min_size = registry.min_image_size(self.backbone)
        if self.image_size < min_size:
            _fail(
                f"--image_size must be at least {min_size} for backbone {self.backbone}",
                image_size=self.image_size,
            )
        if self.batch_size < 1:
            _fail("--batch_size must be positive", batch_size=self.batch_size)
        if not 0.0 <= self.validation_split < 1.0:
            _fail("--validation_split must be in [0, 1)", validation_split=self.validation_split)
        if not 0.0 <= self.test_split_fraction < 1.0:
            _fail("--test_split_fraction must be in [0, 1)", test_split_fraction=self.test_split_fraction)
        if self.validation_split + self.test_split_fraction >= 1.0:
            _fail("--validation_split plus --test_split_fraction must leave training data (sum below 1)",
                  test_split_fraction=self.test_split_fraction)
        if self.dataset == FOLDER_PREFIX:
            _fail("--dataset=folder:PATH needs PATH to be a directory with one subfolder per class",
                  dataset=self.dataset)
        if self.class_weight not in CLASS_WEIGHTS:
            _fail(f"--class_weight must be one of {', '.join(CLASS_WEIGHTS)}", class_weight=self.class_weight)
        if self.weights_path is not None and not self.weights_path.endswith(".h5"):
            _fail("--weights must be imagenet, none or a .h5 weights file", weights=self.weights)
        if any(u < 1 for u in self.head_units):
            _fail("--head_units must all be positive", head_units=_csv(self.head_units))
        if not 0.0 <= self.dropout < 1.0:
            _fail("--dropout must be in [0, 1)", dropout=self.dropout)
        if not 0.0 <= self.label_smoothing < 1.0:
            _fail("--label_smoothing must be in [0, 1)", label_smoothing=self.label_smoothing)
        for name in ("head_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                _fail(f"--{name} must not be negative", **{name: getattr(self, name)})
        for name in ("head_learning_rate", "finetune_learning_rate"):
            value = getattr(self, name)
            if value != AUTO and not (isinstance(value, (int, float)) and value > 0):
                _fail(f"--{name} must be positive, or auto", **{name: value})
        if self.unfreeze_schedule:
            try:
                points = parse_unfreeze_schedule(self.unfreeze_schedule)
            except ValueError as e:
                _fail(f"--unfreeze_schedule must be LAYER=EPOCHS,... such as block5_conv1=1,all=2 ({e})",
                      unfreeze_schedule=self.unfreeze_schedule)
            implied = {"fine_tune_at": points[0][0], "finetune_epochs": sum(e for _, e in points)}
            for name, value in implied.items():
                if getattr(self, name) not in (value, Config.__dataclass_fields__[name].default):
                    _fail("--unfreeze_schedule replaces --fine_tune_at and --finetune_epochs; give one or "
                          "the other", **{name: getattr(self, name)})
        if self.stage_lr_schedule not in STAGE_LR_SCHEDULES:
            _fail(f"--stage_lr_schedule must be one of {', '.join(STAGE_LR_SCHEDULES)}",
                  stage_lr_schedule=self.stage_lr_schedule)
        if self.layerwise_lr_decay is not None and not 0.0 < self.layerwise_lr_decay <= 1.0:
            _fail("--layerwise_lr_decay must be in (0, 1]", layerwise_lr_decay=self.layerwise_lr_decay)
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            _fail("--early_stopping_patience must be positive when set",
                  early_stopping_patience=self.early_stopping_patience)
        if self.lr_find_steps < 10:
            _fail("--lr_find_steps must be at least 10", lr_find_steps=self.lr_find_steps)
        if self.finetune_warmup_epochs < 0:
            _fail("--finetune_warmup_epochs must not be negative",
                  finetune_warmup_epochs=self.finetune_warmup_epochs)
        for name in ("steps_per_epoch", "eval_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                _fail(f"--{name} must be positive when set", **{name: value})
        try:
            augmentations = parse_augment(self.augment)
        except ValueError as e:
            _fail(f"--augment must be none or a comma-separated set of {', '.join(AUGMENTATIONS[1:])} ({e})",
                  augment=self.augment)
        if self.cache_features == "true" and augmentations - CACHEABLE_AUGMENTATIONS - {"flip_translate"}:
            stored = ", ".join(sorted(augmentations - CACHEABLE_AUGMENTATIONS - {"flip_translate"}))
            _fail(f"--cache_features=true cannot store {stored}: a cached stage would train without it. "
                  "Pass --cache_features=auto (off for this augmentation) or false", cache_features="true")
        if self.randaugment_ops < 1:
            _fail("--randaugment_ops must be positive", randaugment_ops=self.randaugment_ops)
        for name in ("randaugment_magnitude", "erasing_probability", "mixup_alpha", "cutmix_alpha"):
            if not 0.0 < getattr(self, name) <= 1.0:
                _fail(f"--{name} must be in (0, 1]", **{name: getattr(self, name)})
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            _fail("--ema_decay must be in (0, 1), such as 0.999", ema_decay=self.ema_decay)
        if self.tta not in TTA_MODES:
            _fail(f"--tta must be one of {', '.join(TTA_MODES)}", tta=self.tta)
        if self.export_tta and self.tta == "none":
            _fail("--export_tta puts --tta's views into the export; pass --tta=flip as well",
                  export_tta=self.export_tta)
        if self.cache_features not in CACHE_FEATURES:
            _fail(f"--cache_features must be one of {', '.join(CACHE_FEATURES)}",
                  cache_features=self.cache_features)
        if self.mixed_precision not in PRECISIONS:
            _fail(f"--mixed_precision must be one of {', '.join(PRECISIONS)}",
                  mixed_precision=self.mixed_precision)
        if self.steps_per_execution < 1:
            _fail("--steps_per_execution must be positive", steps_per_execution=self.steps_per_execution)
        if self.num_gpus is not None and self.num_gpus < 1:
            _fail("--num_gpus must be positive when set", num_gpus=self.num_gpus)
        if self.checkpoint not in CHECKPOINTS:
            _fail(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}", checkpoint=self.checkpoint)
        if self.save_every_steps is not None and self.save_every_steps < 1:
            _fail("--save_every_steps must be positive when set", save_every_steps=self.save_every_steps)
        if not self.fine_tune_at:
            _fail("--fine_tune_at must be all, top:N, a stage or a backbone layer name",
                  fine_tune_at=self.fine_tune_at)
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            _fail("--min_accuracy must be in [0, 1]", min_accuracy=self.min_accuracy)
        unknown = [name for name in self.export_formats if name not in EXPORT_FORMATS]
        if unknown or not self.export_formats:
            _fail(f"--export_formats must be a comma-separated list of {', '.join(EXPORT_FORMATS)}",
                  export_formats=_csv(self.export_formats))
        if self.parity_examples is not None and self.parity_examples < 1:
            _fail("--parity_examples must be positive when set", parity_examples=self.parity_examples)
        if self.calibrate not in CALIBRATIONS:
            _fail(f"--calibrate must be one of {', '.join(CALIBRATIONS)}", calibrate=self.calibrate)
        if not 0.0 < self.target_accuracy <= 1.0:
            _fail("--target_accuracy must be in (0, 1]", target_accuracy=self.target_accuracy)
        if self.mode == "predict" and not self.images:
            _fail("--mode=predict needs --images=GLOB", images=self.images)
        if self.top_k < 1:
            _fail("--top_k must be positive", top_k=self.top_k)
        if self.time_budget is not None:
            try:
                seconds = parse_duration(self.time_budget)
            except ValueError:
                seconds = 0
            if not seconds > 0:
                _fail("--time_budget must be a duration such as 30m, 1h30m or 90s",
                      time_budget=self.time_budget)
            if self.cache_features == "true":
                _fail("--time_budget plans runs that train on images; the feature cache's extraction "
                      "cannot be timed before it runs. Pass --cache_features=auto or false",
                      cache_features="true")
        if self.max_image_pixels < 1:
            _fail("--max_image_pixels must be positive", max_image_pixels=self.max_image_pixels)
        if self.log_every_steps is not None and self.log_every_steps < 0:
            _fail("--log_every_steps must not be negative", log_every_steps=self.log_every_steps)
        if self.profile_steps and not (len(self.profile_steps) == 2
                                       and 0 < self.profile_steps[0] <= self.profile_steps[1]):
            _fail("--profile_steps must be START,END with 0 < START <= END",
                  profile_steps=_csv(self.profile_steps))

    def to_flagfile(self) -> str:
        """The effective settings as flagfile text, so a run can be repeated exactly."""
        lines = ["# Effective flags of this run; reuse with --flagfile=THIS_FILE."]
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, bool):
                lines.append(f"--{field.name}" if value else f"--no{field.name}")
            elif isinstance(value, tuple):
                lines.append(f"--{field.name}={_csv(value)}")
            else:
                lines.append(f"--{field.name}={value}")
        return "\n".join(lines) + "\n"


def parse_augment(text: str) -> frozenset[str]:
    """'flip_translate,mixup' -> {'flip_translate', 'mixup'}, 'none' -> {}; else ValueError saying why."""
    names = [name.strip() for name in text.split(",")] if text else []
    if names == ["none"]:
        return frozenset()
    if "none" in names:
        raise ValueError("none stands alone")
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown or not names:
        raise ValueError(f"{unknown[0] if unknown else text!r} is not one of them")
    if len(set(names)) != len(names):
        raise ValueError("a name appears twice")
    if {"flip", "flip_translate"} <= set(names):
        raise ValueError("flip_translate already flips")
    return frozenset(names)


def parse_unfreeze_schedule(text: str) -> list[tuple[str, int]]:
    """'block5_conv1=1,all=2' -> [('block5_conv1', 1), ('all', 2)]; ValueError saying what is wrong."""
    points = []
    for item in text.split(","):
        name, sep, epochs = item.strip().partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{item.strip()!r} is not LAYER=EPOCHS")
        try:
            count = int(epochs)
        except ValueError:
            raise ValueError(f"{epochs.strip()!r} is not a whole number of epochs") from None
        if count < 1:
            raise ValueError(f"{name.strip()} has {count} epochs; each stage needs at least 1")
        points.append((name.strip(), count))
    names = [name for name, _ in points]
    if len(set(names)) != len(names):
        raise ValueError("a layer appears twice")
    return points


def names(*lifetimes: str) -> frozenset[str]:
    """The settings with any of `lifetimes`: names(RUNTIME, LOCATION) is what a resumed run may change."""
    for lifetime in lifetimes:
        if lifetime not in LIFETIMES:
            raise ValueError(f"lifetime must be one of {', '.join(LIFETIMES)}. Received: lifetime={lifetime}")
    return frozenset(f.name for f in dataclasses.fields(Config) if f.metadata["lifetime"] in lifetimes)


def group_of(name: str) -> str:
    """The group a setting belongs to, one of GROUPS' ids."""
    return _field(name).metadata["group"]


def lifetime_of(name: str) -> str:
    """When a setting may change, one of LIFETIMES."""
    return _field(name).metadata["lifetime"]


def _field(name: str) -> dataclasses.Field:
    try:
        return Config.__dataclass_fields__[name]
    except KeyError:
        raise ValueError(f"name must be a Config field. Received: name={name}") from None


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """'30m', '1h30m', '90s', '1.5h' -> seconds; ValueError when it is none of these."""
    match = _DURATION.match(text.strip()) if text else None
    if not match or not any(match.groups()):
        raise ValueError(f"not a duration such as 30m, 1h30m or 90s: {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return 3600 * hours + 60 * minutes + seconds


def differences(saved: dict, config: Config, fields) -> list[str]:
    """'name: old -> new' for each of `fields` where a saved run's settings differ from `config`."""
    current = dataclasses.asdict(config)
    diffs = []
    for name in sorted(fields):
        old, new = saved.get(name), current.get(name)
        if isinstance(old, list):
            old = tuple(old)
        if name in saved and old != new:
            diffs.append(f"{name}: {_show(old)} -> {_show(new)}")
    return diffs


def _show(value):
    return _csv(value) if isinstance(value, tuple) else value


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def _fail(message: str, **received):
    (name, value), = received.items()
    raise UserError(f"{message}. Received: {name}={value}")
