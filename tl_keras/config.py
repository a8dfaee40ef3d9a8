"""The run's settings as one frozen, validated value that library code receives instead of FLAGS."""

import dataclasses
import os

from tl_keras import backbones
from tl_keras.errors import UserError

MODES = ("train", "evaluate", "export", "predict")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
CACHE_FEATURES = ("auto", "true", "false")
CHECKPOINTS = ("latest", "best")
# Settings a resumed run may change: where things are and how the run is driven, not what it trains.
RESUME_MAY_CHANGE = frozenset({
    "model_dir", "data_dir", "mode", "checkpoint", "overwrite", "save_every_steps",
    "distribution_strategy", "log_every_steps", "profile_steps", "eval_steps", "num_gpus", "tpu",
    "jit_compile", "steps_per_execution",
})
# Settings that define the model's architecture; evaluate, export and predict need them unchanged.
ARCHITECTURE = frozenset({"backbone", "image_size", "head_units", "head_batchnorm", "dataset"})
AUGMENTATIONS = ("none", "flip", "flip_translate")
CLASS_WEIGHTS = ("none", "balanced")
FOLDER_PREFIX = "folder:"


@dataclasses.dataclass(frozen=True)
class Config:
    """Field names equal flag names, so flags.txt round-trips through --flagfile."""

    model_dir: str
    dataset: str = "cifar10"
    data_dir: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    validation_split: float = 0.1
    test_split_fraction: float = 0.0
    strict: bool = False
    class_weight: str = "none"
    image_size: int = 32
    batch_size: int = 64
    backbone: str = "vgg16"
    weights: str = "imagenet"
    head_units: tuple[int, ...] = (256,)
    head_batchnorm: bool = True
    dropout: float = 0.3
    head_epochs: int = 3
    head_learning_rate: float = 1e-3
    finetune_epochs: int = 3
    finetune_learning_rate: float = 1e-4
    finetune_warmup_epochs: float = 0.2
    fine_tune_at: str = "block4_conv1"
    label_smoothing: float = 0.0
    augment: str = "flip_translate"
    cache_features: str = "auto"
    seed: int = 42
    distribution_strategy: str = "auto"
    steps_per_epoch: int | None = None
    eval_steps: int | None = None
    mode: str = "train"
    checkpoint: str = "latest"
    overwrite: bool = False
    save_every_steps: int | None = None
    deterministic: bool = False
    num_gpus: int | None = None
    tpu: str | None = None
    mixed_precision: str = "auto"
    jit_compile: bool = False
    steps_per_execution: int = 1
    scale_lr_with_batch: bool = False
    export_tflite: bool = False
    min_accuracy: float | None = None
    images: str | None = None
    export_dir: str | None = None
    output_json: str | None = None
    top_k: int = 5
    log_every_steps: int = 100
    profile_steps: tuple[int, ...] = ()

    def __post_init__(self):
        self.validate()

    @property
    def weights_path(self) -> str | None:
        """The weights file, or None for the named weights 'imagenet' and 'none'."""
        return None if self.weights in ("imagenet", "none") else self.weights

    def validate(self):
        """Raise UserError naming the first bad setting, in Keras's 'Received:' style."""
        if not self.model_dir and not (self.mode == "predict" and self.export_dir):
            _fail("--model_dir is required (for --mode=predict, or --export_dir)", model_dir=self.model_dir)
        if self.model_dir and os.path.exists(self.model_dir) and not os.path.isdir(self.model_dir):
            _fail("--model_dir exists and is not a directory", model_dir=self.model_dir)
        if self.mode not in MODES:
            _fail(f"--mode must be one of {', '.join(MODES)}", mode=self.mode)
        if self.distribution_strategy not in STRATEGIES:
            _fail(
                f"--distribution_strategy must be one of {', '.join(STRATEGIES)}",
                distribution_strategy=self.distribution_strategy,
            )
        if self.backbone not in backbones.BACKBONES:
            _fail(
                f"--backbone must be one of {', '.join(sorted(backbones.BACKBONES))}",
                backbone=self.backbone,
            )
        min_size = backbones.BACKBONES[self.backbone].min_image_size
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
        if self.dataset.startswith(FOLDER_PREFIX):
            folder = os.path.expanduser(self.dataset[len(FOLDER_PREFIX):])
            if not folder or not os.path.isdir(folder):
                _fail("--dataset=folder:PATH needs PATH to be a directory with one subfolder per class",
                      dataset=self.dataset)
        if self.class_weight not in CLASS_WEIGHTS:
            _fail(f"--class_weight must be one of {', '.join(CLASS_WEIGHTS)}", class_weight=self.class_weight)
        if self.weights_path is not None:
            if not self.weights_path.endswith(".h5"):
                _fail("--weights must be imagenet, none or a .h5 weights file", weights=self.weights)
            if not os.path.isfile(self.weights_path):
                _fail("--weights file does not exist", weights=self.weights)
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
            if not getattr(self, name) > 0:
                _fail(f"--{name} must be positive", **{name: getattr(self, name)})
        if self.finetune_warmup_epochs < 0:
            _fail("--finetune_warmup_epochs must not be negative",
                  finetune_warmup_epochs=self.finetune_warmup_epochs)
        for name in ("steps_per_epoch", "eval_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                _fail(f"--{name} must be positive when set", **{name: value})
        if self.augment not in AUGMENTATIONS:
            _fail(f"--augment must be one of {', '.join(AUGMENTATIONS)}", augment=self.augment)
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
            _fail("--fine_tune_at must be a backbone layer name or 'all'", fine_tune_at=self.fine_tune_at)
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            _fail("--min_accuracy must be in [0, 1]", min_accuracy=self.min_accuracy)
        if self.mode == "predict" and not self.images:
            _fail("--mode=predict needs --images=GLOB", images=self.images)
        if self.top_k < 1:
            _fail("--top_k must be positive", top_k=self.top_k)
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
