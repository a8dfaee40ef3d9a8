"""Augmentation (issue 16): --augment's combinable names, Keras's RandAugment, RandomErasing, MixUp and
CutMix in the tf.data pipeline on 0-255 pixels with seeds from (seed, epoch, example or step), soft labels
with label smoothing and class weights, the feature cache's rules, the augmented-input grid; and
test-time augmentation in evaluation and in the export."""

import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tl_keras import config as config_lib
from tl_keras import files
from tl_keras.data import augment
from tl_keras.data import pipeline
from tl_keras.errors import UserError
from tl_keras.model import backbones
from tl_keras.model import classifier
from tl_keras.model import registry
from tl_keras.reporting import evaluation
from tl_keras.reporting import summaries
from tl_keras.serving import deploy
from tl_keras.serving import export as export_lib
from tl_keras.training import datasets

from helpers import config_from_flagfile, CLASS_NAMES, make_splits

KINDS = ["erasing", "mixup", "cutmix", "mixup,cutmix", "flip_translate,randaugment,erasing,mixup"]


def _pixels(backbone="tiny", size=32):
    return pipeline.Preprocessing.of(backbones.get_preprocess_input(backbone), size)


def _batches(ds, count):
    return [tuple(t.numpy() for t in batch) for batch in ds.take(count)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


# --augment and its flags.

@pytest.mark.parametrize("value, canonical", [
    ("none", "none"), ("flip", "flip"), ("mixup,flip", "flip,mixup"),
    (" cutmix , mixup,randaugment", "randaugment,mixup,cutmix"),
    ("erasing,flip_translate", "flip_translate,erasing"),
])
def test_augment_names_combine_in_one_spelling(make_config, value, canonical):
    config = make_config(augment=value)
    assert config.augment == canonical
    assert "--augment=" + canonical in config.to_flagfile()


def test_the_new_flags_round_trip_through_flags_txt(make_config, tmp_path):
    config = make_config(augment="mixup,flip_translate,randaugment", randaugment_ops=3, mixup_alpha=0.4,
                         ema_decay=0.999, tta="flip", export_tta=True)
    path = tmp_path / "flags.txt"
    path.write_text(config.to_flagfile())
    assert config_from_flagfile(path) == config


@pytest.mark.parametrize("value, reason", [
    ("sideways", "'sideways' is not one of them"),
    ("none,mixup", "none stands alone"),
    ("flip,flip_translate", "flip_translate already flips"),
    ("mixup,mixup", "a name appears twice"),
    ("", "'' is not one of them"),
])
def test_a_bad_augment_is_one_line(make_config, value, reason):
    with pytest.raises(UserError, match=rf"\({reason}\)\. Received: augment={value}$"):
        make_config(augment=value)


@pytest.mark.parametrize("overrides, received", [
    (dict(randaugment_ops=0), "randaugment_ops=0"),
    (dict(randaugment_magnitude=1.5), "randaugment_magnitude=1.5"),
    (dict(erasing_probability=0.0), "erasing_probability=0.0"),
    (dict(mixup_alpha=-1.0), "mixup_alpha=-1.0"),
    (dict(cutmix_alpha=2.0), "cutmix_alpha=2.0"),
    (dict(ema_decay=1.0), "ema_decay=1.0"),
    (dict(tta="five_crop"), "tta=five_crop"),
    (dict(export_tta=True), "export_tta=True"),
])
def test_bad_strengths_and_switches_are_one_line(make_config, overrides, received):
    with pytest.raises(UserError, match=rf"Received: {received}$"):
        make_config(**overrides)


# The feature cache's rules.

@pytest.mark.parametrize("augment_names, cached", [
    ("none", True), ("flip", True), ("flip_translate", False), ("randaugment", False), ("erasing", False),
    ("mixup", False), ("flip,cutmix", False),
])
def test_auto_caches_only_what_it_can_store(make_config, augment_names, cached):
    assert datasets.use_feature_cache(make_config(augment=augment_names, cache_features="auto")) is cached


@pytest.mark.parametrize("augment_names", ["randaugment", "erasing", "flip,mixup", "flip_translate,cutmix"])
def test_cache_features_true_refuses_what_it_cannot_store(make_config, augment_names):
    with pytest.raises(UserError, match=r"cannot store .*a cached stage would train without it.*"
                                        r"Received: cache_features=true$"):
        make_config(augment=augment_names, cache_features="true")


def test_cache_features_true_still_drops_only_translations(make_config):
    assert datasets.use_feature_cache(make_config(augment="flip_translate", cache_features="true"))


# Where augmentation happens: on cached, resized 0-255 pixels, before the backbone's preprocessing.

@pytest.mark.parametrize("backbone", sorted(registry.BACKBONES))
def test_preprocessing_in_two_parts_is_the_backbones_preprocessing(backbone):
    """The pipeline resizes, caches and augments, then normalizes; served images take
    backbones.get_preprocessing in one go. They must be the same function."""
    rng = np.random.default_rng(0)
    parts = _pixels(backbone, 32)
    whole = backbones.get_preprocessing(backbone, 32)
    for shape in ((20, 24, 3), (40, 36, 3)):  # Enlarged and shrunk.
        images = tf.constant(rng.integers(0, 256, (2, *shape), dtype=np.uint8))
        np.testing.assert_array_equal(parts(images).numpy(), whole(images).numpy())


def test_flips_and_shifts_give_the_same_batches_on_pixels():
    """Normalizing after flips and shifts, as the pipeline now does, changes no value: they only move
    pixels. (A plain preprocess function normalizes before, as before.)"""
    splits = make_splits(num_train=12, validation_split=0)
    for backbone in ("tiny", "vgg16"):
        before = pipeline.build_train_dataset(splits.train, backbones.get_preprocessing(backbone, 32), 4, 3,
                                              "flip_translate", seed=3)
        after = pipeline.build_train_dataset(splits.train, _pixels(backbone), 4, 3, "flip_translate", seed=3)
        _assert_same_batches(_batches(before, 6), _batches(after, 6))


def test_the_resized_images_stay_cached():
    """Each example is read from its source once, however many epochs run."""
    reads = []

    def read(index):
        reads.append(int(index))
        return np.full((40, 40, 3), int(index) * 20, np.uint8), np.int64(index % 3)

    source = tf.data.Dataset.range(8).map(
        lambda i: tf.numpy_function(read, [i], (tf.uint8, tf.int64))).map(
        lambda image, label: (tf.ensure_shape(image, (40, 40, 3)), tf.ensure_shape(label, ())))
    source = source.apply(tf.data.experimental.assert_cardinality(8))
    ds = pipeline.build_train_dataset(source, _pixels(), 4, 3, "randaugment,mixup", seed=0)
    _batches(ds, 6)  # Three epochs.
    assert sorted(reads) == list(range(8))


def test_randaugment_and_erasing_see_0_255_pixels(monkeypatch):
    """The tiny backbone's preprocess_input maps pixels to [-1, 1]: the layers must get 0-255 values."""
    real = augment.build_image_augmenter
    seen = []

    def spying(augmentation):
        augmenter = real(augmentation)

        def checked(image, seed):
            seen.append(True)
            checks = [tf.debugging.assert_greater_equal(tf.reduce_min(image), 0.0),
                      tf.debugging.assert_less_equal(tf.reduce_max(image), 255.0),
                      tf.debugging.assert_greater(tf.reduce_max(image), 2.0)]
            with tf.control_dependencies(checks):
                return augmenter(tf.identity(image), seed)

        return checked

    monkeypatch.setattr(augment, "build_image_augmenter", spying)
    splits = make_splits(num_train=8, validation_split=0)
    (images, _), = _batches(pipeline.build_train_dataset(splits.train, _pixels(), 8, 3, "randaugment,erasing",
                                                         seed=0), 1)
    assert seen and -1.0 - 1e-6 <= images.min() and images.max() <= 1.0 + 1e-6  # Normalized after.


def test_pixel_augmentations_need_a_preprocessing_in_two_parts():
    splits = make_splits(num_train=4, validation_split=0)
    with pytest.raises(ValueError, match="Received: augment=randaugment$"):
        pipeline.build_train_dataset(splits.train, backbones.get_preprocessing("tiny", 32), 4, 3,
                                     "randaugment", seed=0)


# Randomness: a function of (seed, epoch, example) and (seed, epoch, step), so a resume sees the same.

@pytest.mark.parametrize("augment_names", KINDS)
def test_a_resumed_pipeline_sees_the_same_batches(augment_names):
    """Epoch 1 from its second step, in a fresh pipeline (fresh Keras layers and seed generators),
    equals what an uninterrupted pipeline gave there; and every epoch is augmented anew."""
    splits = make_splits(num_train=12, validation_split=0)
    whole = _batches(pipeline.build_train_dataset(splits.train, _pixels(), 4, 3, augment_names, seed=5), 6)
    resumed = _batches(pipeline.build_train_dataset(splits.train, _pixels(), 4, 3, augment_names, seed=5,
                                                    start_epoch=1, skip_steps=1), 2)
    _assert_same_batches(whole[4:6], resumed)
    assert not np.array_equal(whole[0][0], whole[3][0])  # Epochs 0 and 1 differ.
    other_seed = _batches(pipeline.build_train_dataset(splits.train, _pixels(), 4, 3, augment_names, seed=6),
                          1)
    assert not np.array_equal(whole[0][0], other_seed[0][0])


def test_an_images_augmentation_does_not_depend_on_its_batch():
    """Per-image layers draw from (seed, epoch, example): the same images whatever the batch size."""
    splits = make_splits(num_train=12, validation_split=0)

    def epoch_images(batch_size):
        ds = pipeline.build_train_dataset(splits.train, _pixels(), batch_size, 3, "randaugment,erasing",
                                          seed=1)
        images = np.concatenate([b[0] for b in _batches(ds, 12 // batch_size)])
        return sorted(image.tobytes() for image in images)

    plain = pipeline.build_train_dataset(splits.train, _pixels(), 12, 3, "none", seed=1)
    assert epoch_images(4) == epoch_images(6) != sorted(i.tobytes() for i in _batches(plain, 1)[0][0])


def test_keras_layers_alone_would_not_repeat():
    """Why seeds are streamed: a layer drawing from its own SeedGenerator gives other images each time
    the same dataset is read again."""
    image = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)), tf.float32)
    layer = keras.layers.RandomErasing(factor=1.0, value_range=(0, 255), dtype="float32")
    ds = tf.data.Dataset.from_tensors(image).map(lambda x: layer(x, training=True))
    assert not np.array_equal(next(iter(ds)).numpy(), next(iter(ds)).numpy())
    seeded = augment.build_image_augmenter(augment.Augmentation.parse("erasing", erasing_probability=1.0))
    ds = tf.data.Dataset.from_tensors(image[0]).map(lambda x: seeded(x, tf.constant([1, 2], tf.int64)))
    assert np.array_equal(next(iter(ds)).numpy(), next(iter(ds)).numpy())


def test_mixup_and_cutmix_make_soft_labels_that_sum_to_one():
    splits = make_splits(num_train=16, validation_split=0)
    for name in ("mixup", "cutmix"):
        ds = pipeline.build_train_dataset(splits.train, _pixels(), 16, 3, name, seed=0)
        (images, labels), = _batches(ds, 1)
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-6)
        assert ((labels > 0) & (labels < 1)).any(), name  # Some example is mixed.
        assert images.shape == (16, 32, 32, 3)


# Soft labels: loss, metrics, label smoothing and class weights.

def _mixing_loss(labels, probabilities, class_weights, smoothing):
    """mixup's definition: each source image's class-weighted, smoothed cross-entropy, by its share.
    Smoothing is affine in the one-hot target: sum_j m_j w_j smooth(e_j) = (1 - ls) y*w + ls/K (y.w)."""
    k = labels.shape[1]
    weights = np.ones(k) if class_weights is None else np.asarray(class_weights)
    target = (1 - smoothing) * labels * weights + smoothing / k * (labels @ weights)[:, None]
    return np.mean(-(target * np.log(probabilities)).sum(axis=1))


@pytest.fixture(scope="module")
def untrained():
    keras.utils.set_random_seed(1)
    return classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,))


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_loss_of_mixed_batches_is_the_mixing_loss(name, smoothing, weighted, untrained):
    """The compiled loss on a pipeline batch (images, labels[, sample weights]) is exactly mixup's loss
    with class weights and label smoothing."""
    splits = make_splits(num_train=16, validation_split=0)
    class_weights = [0.5, 2.0, 1.25] if weighted else None
    build = lambda weights: pipeline.build_train_dataset(  # noqa: E731
        splits.train, _pixels(), 16, 3, name, seed=2, class_weights=weights)
    (images, soft), = _batches(build(None), 1)
    batch, = _batches(build(class_weights), 1)
    np.testing.assert_array_equal(batch[0], images)
    model = untrained
    model.compile(loss=keras.losses.CategoricalCrossentropy(label_smoothing=smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    probabilities = model.predict(images, verbose=0).astype(np.float64)
    logs = model.test_on_batch(*batch, return_dict=True)
    expected = _mixing_loss(soft, probabilities, class_weights, smoothing)
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)
    # Compiled metrics are not sample-weighted (as with Keras's class_weight): accuracy is the share of
    # examples whose largest (class-weighted) label share is the predicted class.
    target = soft * (1 if class_weights is None else np.asarray(class_weights))
    assert logs["accuracy"] == pytest.approx(np.mean(target.argmax(1) == probabilities.argmax(1)), abs=1e-6)


def test_class_weights_of_hard_labels_are_keras_class_weight():
    labels = tf.one_hot([0, 2, 1, 2], 3)
    weighted, sample_weights = augment.weigh_soft_labels(labels, [0.5, 2.0, 1.25])
    np.testing.assert_allclose(weighted.numpy(), labels.numpy())
    np.testing.assert_allclose(sample_weights.numpy(), [0.5, 1.25, 2.0, 1.25])


def test_mixing_moves_class_weights_into_the_batches(make_config):
    splits = make_splits(num_train=16, validation_split=0.25)
    data = datasets.build_data(make_config(augment="mixup", class_weight="balanced"), splits)
    assert data.class_weight is None
    images, labels, sample_weights = next(iter(data.train(0, 0)))
    assert sample_weights.shape == (4,)
    plain = datasets.build_data(make_config(augment="flip", class_weight="balanced"), splits)
    assert plain.class_weight and len(next(iter(plain.train(0, 0)))) == 2  # Keras's class_weight, as before.


# The augmented-input grid.

@pytest.mark.parametrize("augment_names", ["flip_translate", "randaugment,erasing", "mixup", "cutmix"])
def test_the_grid_shows_what_the_model_is_trained_on(make_config, augment_names):
    splits = make_splits(num_train=16, validation_split=0)
    config = make_config(augment=augment_names)
    board = summaries.RunSummaries(config, splits, 1)
    pictures, labels = board.augmented_examples()
    board.close()
    assert pictures.dtype == np.uint8 and pictures.shape == (16, 32, 32, 3)
    source = np.stack([image.numpy() for image, _ in splits.train.take(16)])
    assert sorted(p.tobytes() for p in pictures) != sorted(s.tobytes() for s in source)
    captions = [summaries.label_caption(label, CLASS_NAMES) for label in labels]
    if "mix" in augment_names or "cut" in augment_names:
        assert any(len(c) == 2 and c[0][0].endswith("%") for c in captions)
    else:
        assert all(len(c) == 1 and c[0][0] in CLASS_NAMES for c in captions)


def test_a_mixed_label_is_captioned_with_its_shares():
    ink = summaries.images.INK
    assert summaries.label_caption([0.0, 0.62, 0.38], CLASS_NAMES) == [("dog 62%", ink), ("frog 38%", ink)]
    assert summaries.label_caption([0.0, 0.0, 1.0], CLASS_NAMES) == [("frog", ink)]


# Test-time augmentation.

def _logits_of(model, images):
    logits = keras.Model(model.inputs, model.get_layer(classifier.LOGITS).output)
    return logits.predict(images, verbose=0).astype(np.float64)


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _tiny_model_and_test(num_test=8):
    splits = make_splits(num_test=num_test)
    keras.utils.set_random_seed(1)
    model = classifier.build_classifier("tiny", 32, 3, "none", head_units=(8,))
    batches = pipeline.build_eval_dataset(splits.test, backbones.get_preprocessing("tiny", 32), 4, 3,
                                          cache=False)
    images = np.concatenate([x.numpy() for x, _ in batches])
    return splits, model, batches, images


def test_tta_averages_the_logits_of_the_image_and_its_mirror():
    splits, model, batches, images = _tiny_model_and_test()
    plain = evaluation.evaluate(model, batches)
    result = evaluation.evaluate(model, batches, tta="flip")
    expected = _softmax((_logits_of(model, images) + _logits_of(model, images[:, :, ::-1])) / 2)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    assert not np.allclose(result.probabilities, plain.probabilities, atol=1e-6)
    assert result.single_view_metrics == plain.metrics and result.tta == "flip" and plain.tta is None
    assert result.metrics == evaluation.metrics_of(result.probabilities, result.labels)
    metrics = evaluation.split_metrics(result, "test")
    assert metrics["tta"] == "flip" and metrics["single_view_test_accuracy"] == plain.metrics["accuracy"]
    assert metrics["test_accuracy"] == result.metrics["accuracy"]
    assert evaluation.split_metrics(plain, "test") == evaluation.prefixed(plain.metrics, "test")


def test_the_report_says_which_numbers_used_tta(tmp_path):
    splits, model, batches, _ = _tiny_model_and_test()
    plain = evaluation.evaluate(model, batches, tta="none")
    report = evaluation.write_report(plain, splits.test, CLASS_NAMES, str(tmp_path / "plain"), "test")
    assert "tta" not in report and "single_view" not in report
    result = evaluation.evaluate(model, batches, tta="flip")
    report = evaluation.write_report(result, splits.test, CLASS_NAMES, str(tmp_path / "tta"), "test")
    assert report["tta"] == "flip" and report["accuracy"] == result.metrics["accuracy"]
    assert report["single_view"] == result.single_view_metrics


def test_the_export_averages_the_same_views(tmp_path):
    """serving_default and the deploy model (every other format) with --export_tta: softmax of the mean
    logits of the image and its mirror image, divided by the temperature."""
    splits, model, _, _ = _tiny_model_and_test()
    raw = np.stack([image.numpy() for image, _ in splits.test])
    preprocess = backbones.get_preprocessing("tiny", 32)
    inputs = preprocess(tf.constant(raw)).numpy()
    expected = _softmax((_logits_of(model, inputs) + _logits_of(model, inputs[:, :, ::-1])) / 2 / 2.0)
    export_lib.write_saved_model(model, str(tmp_path / "tta"), preprocess, CLASS_NAMES, temperature=2.0,
                                 tta=True)
    served = tf.saved_model.load(str(tmp_path / "tta")).signatures["serving_default"](images=tf.constant(raw))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)
    deployed = deploy.build_deploy_model(deploy.float32_copy(model), preprocess, 32, 2.0, tta=True)
    np.testing.assert_allclose(deployed.predict(raw, verbose=0)["probabilities"], expected, atol=1e-5)
    single = deploy.build_deploy_model(deploy.float32_copy(model), preprocess, 32, 2.0)
    assert not np.allclose(single.predict(raw, verbose=0)["probabilities"], expected, atol=1e-5)
    metadata = deploy.build_metadata(["saved_model"], CLASS_NAMES, "tiny", 32, 2.0, True, None, None,
                                     tta=True)
    assert metadata["test_time_augmentation"] == "flip" and "mirror" in metadata["outputs"]["logits"]


def test_a_run_reports_tta_beside_the_single_view(make_config, tmp_path, caplog):
    """--tta=flip --export_tta on a run trained on images: every stage's test metrics average the views
    and say so, the export averages them too, and metrics.json says which numbers did."""
    from tl_keras.training import run as train

    config = make_config(tta="flip", export_tta=True, augment="flip", finetune_epochs=0)
    with caplog.at_level(logging.INFO, logger="absl"):
        metrics = train.run(config, splits=make_splits(num_train=16, validation_split=0.25))
    stage = metrics["stages"]["head"]
    assert stage["tta"] == "flip" and "single_view_test_accuracy" in stage, stage
    assert metrics["export_tta"] == "flip"
    export_dir = metrics["export_path"]
    assert deploy.read_metadata(export_dir)["test_time_augmentation"] == "flip"
    report = files.read_json(os.path.join(config.model_dir, "eval", "report.json"))
    assert report["tta"] == "flip"
    assert "averaged over flip views" in caplog.text


def test_evaluate_refuses_an_unknown_tta():
    _, model, batches, _ = _tiny_model_and_test(4)
    with pytest.raises(ValueError, match="Received: tta=ten_crop$"):
        evaluation.evaluate(model, batches, tta="ten_crop")


def test_config_knows_the_tta_modes():
    assert config_lib.TTA_MODES == ("none", evaluation.TTA_FLIP)
