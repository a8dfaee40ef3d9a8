"""Training augmentation beyond flips and shifts: Keras's RandAugment, RandomErasing, MixUp and CutMix,
run in the tf.data pipeline on 0-255 RGB pixels, with randomness that depends only on explicit seeds.

Keras's augmentation layers draw their randomness from a SeedGenerator, a variable that advances with
every call. In a tf.data pipeline that makes an example's augmentation depend on how many were drawn
before it, so a resumed run would see other batches than an uninterrupted one. Here each call runs
with a SeedStream in place of the layer's generator: its k-th draw is fold_in(seed, k), and the seed
is (seed, epoch, example) for the per-image layers and (seed, epoch, step) for the per-batch ones. A
batch is itself a function of (seed, epoch): the epoch's shuffle is seeded. The layers are Keras's own,
unchanged; only where their seeds come from is ours.

Per image: RandAugment, then RandomErasing. Per batch, on one-hot labels: MixUp or CutMix (with both,
each batch gets one of the two, as timm does), which make soft labels.
"""

import contextlib
import dataclasses

import keras
import tensorflow as tf

from tl_keras import config as config_lib

RANDAUGMENT = "randaugment"
ERASING = "erasing"
MIXUP = "mixup"
CUTMIX = "cutmix"
PER_IMAGE = (RANDAUGMENT, ERASING)
PER_BATCH = (MIXUP, CUTMIX)
# Augmentations that must see 0-255 pixels, not the backbone's preprocessed input.
PIXEL_SPACE = frozenset(PER_IMAGE)
# Folded into a seed so that each layer's draws differ from the others' and from flips and shifts.
_STREAMS = {RANDAUGMENT: 1, ERASING: 2, MIXUP: 3, CUTMIX: 4, "choice": 5}


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What --augment names, with the strengths of its Keras layers."""

    names: frozenset = frozenset()
    randaugment_ops: int = config_lib.Config.randaugment_ops
    randaugment_magnitude: float = config_lib.Config.randaugment_magnitude
    erasing_probability: float = config_lib.Config.erasing_probability
    mixup_alpha: float = config_lib.Config.mixup_alpha
    cutmix_alpha: float = config_lib.Config.cutmix_alpha

    @classmethod
    def parse(cls, augment: str, **strengths) -> "Augmentation":
        """From --augment's text ('flip_translate,mixup'); ValueError when it names no valid set."""
        return cls(config_lib.parse_augment(augment), **strengths)

    @classmethod
    def from_config(cls, config: config_lib.Config) -> "Augmentation":
        return cls(frozenset(config.augmentations), config.randaugment_ops, config.randaugment_magnitude,
                   config.erasing_probability, config.mixup_alpha, config.cutmix_alpha)

    @property
    def flip(self) -> bool:
        return bool({"flip", "flip_translate"} & self.names)

    @property
    def translate(self) -> bool:
        return "flip_translate" in self.names

    @property
    def per_image(self) -> tuple:
        return tuple(name for name in PER_IMAGE if name in self.names)

    @property
    def per_batch(self) -> tuple:
        return tuple(name for name in PER_BATCH if name in self.names)

    @property
    def needs_pixels(self) -> bool:
        return bool(PIXEL_SPACE & self.names)

    @property
    def mixes_labels(self) -> bool:
        return bool(self.per_batch)


class SeedStream(keras.random.SeedGenerator):
    """A SeedGenerator without state: draw k is fold_in(seed, k), for a seed tensor of shape [2].

    It stands in for a layer's own generator while that layer is traced into a tf.data function, so
    the draws become functions of the seed tensor. SeedGenerator.__init__ is not called: it would
    create the state variable that this class exists to avoid.
    """

    def __init__(self, seed):  # noqa: super-init-not-called (see the docstring).
        self.name = "seed_stream"
        self.seed = tf.cast(seed, tf.int64)
        self.draws = 0

    def next(self, ordered=True):
        del ordered
        self.draws += 1
        return tf.random.experimental.stateless_fold_in(self.seed, self.draws)


@contextlib.contextmanager
def seeded(layer: keras.layers.Layer, seed):
    """Run `layer` with a SeedStream of `seed` as its generator (RandAugment gives its own to its
    operations); set without Keras's attribute tracking, and put back afterwards."""
    original = layer.generator
    object.__setattr__(layer, "generator", SeedStream(seed))
    try:
        yield
    finally:
        object.__setattr__(layer, "generator", original)


def stream_seed(seed, name: str):
    """The seed of one augmentation's draws, from an example's or a batch's seed [2]."""
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), _STREAMS[name])


def build_image_augmenter(augmentation: Augmentation):
    """fn(image float32 [H, W, 3] in 0-255, seed [2]) -> image, for the per-image layers; None if none.

    The layers compute in float32 whatever the global precision policy: they see pixels, not
    activations.
    """
    layers = {}
    if RANDAUGMENT in augmentation.names:
        layers[RANDAUGMENT] = keras.layers.RandAugment(
            value_range=(0, 255), num_ops=augmentation.randaugment_ops,
            factor=augmentation.randaugment_magnitude, dtype="float32", name="randaugment")
    if ERASING in augmentation.names:
        p = augmentation.erasing_probability
        layers[ERASING] = keras.layers.RandomErasing(factor=(p, p), value_range=(0, 255), dtype="float32",
                                                     name="random_erasing")
    if not layers:
        return None

    def augment(image, seed):
        for name, layer in layers.items():
            with seeded(layer, stream_seed(seed, name)):
                image = layer(image, training=True)
        return image

    return augment


def build_batch_mixer(augmentation: Augmentation):
    """fn(images [B, H, W, 3], one-hot labels [B, C], seed [2]) -> (images, soft labels); None if none."""
    layers = {}
    if MIXUP in augmentation.names:
        layers[MIXUP] = keras.layers.MixUp(alpha=augmentation.mixup_alpha, dtype="float32", name="mixup")
    if CUTMIX in augmentation.names:
        alpha = augmentation.cutmix_alpha
        layers[CUTMIX] = keras.layers.CutMix(factor=(alpha, alpha), dtype="float32", name="cutmix")
    if not layers:
        return None

    def apply(name, images, labels, seed):
        with seeded(layers[name], stream_seed(seed, name)):
            out = layers[name]({"images": images, "labels": labels}, training=True)
        return out["images"], tf.cast(out["labels"], tf.float32)

    def mix(images, labels, seed):
        labels = tf.cast(labels, tf.float32)
        if len(layers) == 1:
            (name,) = layers
            return apply(name, images, labels, seed)
        pick_mixup = tf.random.stateless_uniform([], stream_seed(seed, "choice")) < 0.5
        return tf.cond(pick_mixup, lambda: apply(MIXUP, images, labels, seed),
                       lambda: apply(CUTMIX, images, labels, seed))

    return mix


def weigh_soft_labels(labels, class_weights):
    """(labels, sample weights) that make the loss the class-weighted mixing loss, exactly.

    A mixed example of classes a and b with shares m and 1 - m must cost
    m * w_a * CE(smooth(a)) + (1 - m) * w_b * CE(smooth(b)): each source image's loss weighted by its
    class, as mixup defines its loss, and as PyTorch's weighted cross-entropy treats soft targets.
    Cross-entropy is linear in the target and label smoothing is affine, so sample weight
    s = sum_c y_c w_c on the target y * w / s gives exactly that, with or without label smoothing.
    (Keras's class_weight would weigh the whole example by its largest share's class.) For one-hot
    labels this is Keras's class_weight.
    """
    weights = tf.constant(class_weights, tf.float32)
    labels = tf.cast(labels, tf.float32)
    weighted = labels * weights
    sample_weights = tf.reduce_sum(weighted, axis=-1)
    return weighted / sample_weights[:, None], sample_weights
