"""The run's settings as one frozen, validated value that library code receives instead of FLAGS."""

import dataclasses
import os

from tl_keras import backbones
from tl_keras.errors import UserError

MODES = ("train", "evaluate", "export")
STRATEGIES = ("auto", "default", "one_device", "mirrored")
CACHE_FEATURES = ("auto", "true", "false")
AUGMENTATIONS = ("none", "flip", "flip_translate")


@dataclasses.dataclass(frozen=True)
class Config:
    """Field names equal flag names, so flags.txt round-trips through --flagfile."""

    model_dir: str
    dataset: str = "cifar10"
    data_dir: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    validation_split: float = 0.1
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
        if not self.model_dir:
            _fail("--model_dir is required", model_dir=self.model_dir)
        if os.path.exists(self.model_dir) and not os.path.isdir(self.model_dir):
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
        if not self.fine_tune_at:
            _fail("--fine_tune_at must be a backbone layer name or 'all'", fine_tune_at=self.fine_tune_at)
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


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def _fail(message: str, **received):
    (name, value), = received.items()
    raise UserError(f"{message}. Received: {name}={value}")
