"""Class-folder datasets: messy files, splits, errors, tolerant decoding and class weights."""

import json
import logging
import os

from absl.testing import flagsaver
import keras
import numpy as np
import pytest
import tensorflow as tf

from tl_keras import files
from tl_keras import flags as tl_flags
from tl_keras.data import folder_dataset
from tl_keras.data import image_files
from tl_keras.data import pipeline
from tl_keras.errors import UserError
from tl_keras.training import run as train
from tl_keras.training import run_dir

from helpers import (BAD_FILES, CLASSES, animated_gif, encode, exif_jpeg, fake_unreadable_folders,
                     make_image_folder, photo, run_cli, upright, write)


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos") / "my photos"
    counts = make_image_folder(root)
    return str(root), counts


def _load(root, validation_split=0.25, test_split_fraction=0.2, seed=0, strict=False):
    return folder_dataset.load_folder(root, validation_split, test_split_fraction, seed, strict)


def _examples(ds):
    return [(image.numpy(), int(label)) for image, label in ds]


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_messy_folder_keeps_every_readable_image_and_names_every_skipped_file(messy_folder, caplog):
    root, counts = messy_folder
    with caplog.at_level(logging.INFO, logger="absl"):
        splits = _load(root)
    assert splits.class_names == sorted(CLASSES)
    total = splits.num_train + splits.num_validation + splits.num_test
    assert total == sum(counts.values())
    by_label = np.zeros(3, int)
    for name, ds, n in (("train", splits.train, splits.num_train),
                        ("validation", splits.validation, splits.num_validation),
                        ("test", splits.test, splits.num_test)):
        examples = _examples(ds)
        assert len(examples) == n, name  # Counts are exact.
        for image, label in examples:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
            by_label[label] += 1
    np.testing.assert_array_equal(by_label, [counts[c] for c in sorted(CLASSES)])
    # One warning lists every skipped file with its reason.
    skipped = [m for m in _warnings(caplog) if m.startswith("Skipped")]
    assert len(skipped) == 1
    assert skipped[0].startswith(f"Skipped {len(BAD_FILES)} of ")
    for folder, name, _, reason in BAD_FILES:
        line = next(line for line in skipped[0].splitlines() if f"{folder}/{name}:" in line)
        assert reason in line, line
    info = " ".join(r.getMessage() for r in caplog.records)
    assert "Ignored 6 files" in info and ".txt: 1" in info and "hidden: 2" in info
    assert "png named jpeg 9.jpg (PNG data)" in info  # Decoded by content, and said so.


def test_gray_palette_rgba_and_gif_first_frame_become_rgb(tmp_path):
    array = photo(1, 5, (20, 30))
    gray = tmp_path / "a" / "gray.png"
    write(str(gray), encode(array, "PNG", "L"))
    write(str(tmp_path / "a" / "anim.gif"), animated_gif(array, 255 - array))
    write(str(tmp_path / "b" / "rgba.PNG"), encode(array, "PNG", "RGBA"))
    write(str(tmp_path / "b" / "pal.png"), encode(array, "PNG", "P"))
    splits = folder_dataset.load_folder(str(tmp_path), 0.0, 0.5, seed=0)
    images = [image for image, _ in _examples(splits.train) + _examples(splits.test)]
    assert all(image.shape == (20, 30, 3) for image in images)
    decoded = {os.path.basename(p): folder_dataset.decode_image(tf.io.read_file(p)).numpy()
               for p in map(str, [gray, tmp_path / "a" / "anim.gif", tmp_path / "b" / "rgba.PNG"])}
    assert (decoded["gray.png"][..., 0] == decoded["gray.png"][..., 2]).all()
    np.testing.assert_array_equal(decoded["rgba.PNG"], array)
    # The GIF's first frame, not its (inverted) second one.
    assert abs(decoded["anim.gif"].mean() - array.mean()) < 10


def test_stratified_split_is_seeded_and_keeps_every_class(messy_folder):
    root, counts = messy_folder

    def split_of(seed):
        splits = _load(root, seed=seed)
        return {name: sorted(img.tobytes() for img, _ in _examples(ds))
                for name, ds in (("validation", splits.validation), ("test", splits.test))}, splits

    first, splits = split_of(3)
    again, _ = split_of(3)
    other, _ = split_of(4)
    assert first == again
    assert first != other
    validation_labels = [label for _, label in _examples(splits.validation)]
    test_labels = [label for _, label in _examples(splits.test)]
    # Every class, even the 4-image one, is held out in proportion (at least one image each).
    assert set(validation_labels) == set(test_labels) == {0, 1, 2}
    assert validation_labels.count(0) == round(counts["cat"] * 0.25)
    assert test_labels.count(0) == round(counts["cat"] * 0.2)
    assert splits.train_class_counts == [counts[c] - validation_labels.count(i) - test_labels.count(i)
                                         for i, c in enumerate(sorted(CLASSES))]


def test_training_order_is_mixed_not_class_sorted(tmp_path):
    make_image_folder(tmp_path, {"a": 10, "b": 10}, bad=False)
    labels = [label for _, label in _examples(folder_dataset.load_folder(str(tmp_path), 0.0, 0.2).train)]
    assert labels != sorted(labels)


def test_held_out_order_is_mixed_so_a_capped_evaluation_sees_every_class(tmp_path):
    # --eval_steps and --parity_examples read the first batches only: in class order they would score
    # the first classes alone.
    make_image_folder(tmp_path / "carved", {"a": 12, "b": 12, "c": 12}, bad=False)
    make_image_folder(tmp_path / "presplit" / "train", {"a": 2, "b": 2, "c": 2}, bad=False, seed=1)
    make_image_folder(tmp_path / "presplit" / "test", {"a": 3, "b": 3, "c": 3}, bad=False, seed=2)
    carved = folder_dataset.load_folder(str(tmp_path / "carved"), 0.25, 0.25, seed=0)
    presplit = folder_dataset.load_folder(str(tmp_path / "presplit"), 0.0, 0.0, seed=0)
    for ds in (carved.validation, carved.test, presplit.test):
        labels = [label for _, label in _examples(ds)]
        assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert len(set(labels[:3])) > 1, labels
    again = folder_dataset.load_folder(str(tmp_path / "presplit"), 0.0, 0.0, seed=0)
    assert [label for _, label in _examples(again.test)] == [label for _, label in _examples(presplit.test)]


def test_no_test_split_scores_on_validation(tmp_path, caplog):
    make_image_folder(tmp_path, {"a": 4, "b": 4}, bad=False)
    splits = folder_dataset.load_folder(str(tmp_path), 0.25, 0.0)
    assert splits.test is splits.validation and splits.num_test == splits.num_validation == 2
    with pytest.raises(UserError, match="needs a test/ or validation/ folder"):
        folder_dataset.load_folder(str(tmp_path), 0.0, 0.0)


@pytest.mark.parametrize("validation_dir", ["val", "validation"])
def test_presplit_folders_are_used_as_they_are(tmp_path, validation_dir):
    make_image_folder(tmp_path / "train", {"a": 5, "b": 3}, bad=False, seed=1)
    make_image_folder(tmp_path / validation_dir, {"a": 2, "b": 1}, bad=False, seed=2)
    make_image_folder(tmp_path / "test", {"a": 1, "b": 2}, bad=False, seed=3)
    splits = folder_dataset.load_folder(str(tmp_path), 0.5, 0.5, seed=0)
    assert splits.class_names == ["a", "b"]
    assert (splits.num_train, splits.num_validation, splits.num_test) == (8, 3, 3)
    assert sorted(label for _, label in _examples(splits.test)) == [0, 1, 1]


def test_presplit_without_validation_carves_it_from_train(tmp_path):
    make_image_folder(tmp_path / "train", {"a": 8, "b": 4}, bad=False)
    make_image_folder(tmp_path / "test", {"a": 1, "b": 1}, bad=False, seed=3)
    splits = folder_dataset.load_folder(str(tmp_path), 0.25, 0.0)
    assert (splits.num_train, splits.num_validation, splits.num_test) == (9, 3, 2)


def test_strict_fails_with_one_line(messy_folder):
    root, _ = messy_folder
    with pytest.raises(UserError) as error:
        _load(root, strict=True)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{len(BAD_FILES)} of ") and "Received: strict=True" in message
    assert "cat/empty.jpg (empty file (0 bytes))" in message


@pytest.mark.parametrize("setup, expected", [
    (lambda root: (make_image_folder(root, {"a": 2, "b": 2}, bad=False), os.makedirs(root / "c")),
     "has no images"),
    (lambda root: make_image_folder(root, {"only": 3}, bad=False), "only one class"),
    (lambda root: [write(str(root / c / "x.txt"), b"x") for c in "ab"], "has no images"),
    (lambda root: write(str(root / "x.jpg"), b"x"), "no class subfolders"),
    (lambda root: (make_image_folder(root, {"a": 2}, bad=False),
                   write(str(root / "b" / "bad.jpg"), b""), write(str(root / "b" / "bad2.png"), b"x")),
     "has no readable images (2 skipped"),
    (lambda root: (make_image_folder(root / "train", {"a": 2, "b": 2}, bad=False),
                   make_image_folder(root / "val", {"a": 1, "z": 1}, bad=False)),
     "'z'"),
])
def test_unusable_folders_are_one_line_errors(tmp_path, setup, expected):
    root = tmp_path / "data"
    root.mkdir()
    setup(root)
    with pytest.raises(UserError) as error:
        folder_dataset.load_folder(str(root), 0.25, 0.0)
    message = str(error.value)
    assert expected in message and "\n" not in message
    assert message.endswith(f"Received: dataset=folder:{root}")


def test_a_file_that_breaks_after_the_check_is_replaced_not_fatal(tmp_path, caplog):
    make_image_folder(tmp_path, {"a": 3, "b": 3}, bad=False)
    splits = folder_dataset.load_folder(str(tmp_path), 0.0, 0.3)
    assert int(splits.train.cardinality()) == splits.num_train == 4
    sorted((tmp_path / "a").iterdir())[0].write_bytes(b"overwritten by a sync tool")
    sorted((tmp_path / "b").iterdir())[0].unlink()
    with caplog.at_level(logging.WARNING, logger="absl"):
        examples = _examples(splits.train) + _examples(splits.test)
    # Still exactly as many examples, so steps per epoch hold; broken ones are stood in for.
    assert len(examples) == 6
    assert all(image.shape[-1] == 3 for image, _ in examples)
    assert "became unreadable after the up-front check" in caplog.text


def test_class_weight_balanced_reaches_fit(make_config, tmp_path, monkeypatch, caplog):
    make_image_folder(tmp_path / "data", {"many": 9, "few": 3}, bad=False)
    seen = []
    real_fit = keras.Model.fit

    def fit(self, *args, **kwargs):
        seen.append(kwargs.get("class_weight"))
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)
    config = make_config(dataset=f"folder:{tmp_path / 'data'}", class_weight="balanced",
                         validation_split=0.0, test_split_fraction=0.34, cache_features="true")
    with caplog.at_level(logging.INFO, logger="absl"):
        metrics = train.run(config)
    # 6 "many" and 2 "few" train images: weights 8 / (2 * n).
    assert seen == [{0: 2.0, 1: 8 / 12}] * 2
    assert "Class weights (balanced): few 2.000 (2 images), many 0.667 (6 images)." in caplog.text
    model_dir = config.model_dir
    with open(os.path.join(model_dir, "labels.txt"), encoding="utf-8") as f:
        assert f.read() == "few\nmany\n"
    saved = tf.saved_model.load(metrics["export_path"])
    out = saved.signatures["serving_default"](images=tf.constant(photo(0, 1)[None]))
    assert out["class_names"].numpy()[0].decode() in ("few", "many")
    with open(os.path.join(model_dir, "metrics.json")) as f:
        assert {"head", "finetune"} <= set(json.load(f)["stages"])


def test_balanced_weights_and_counting_tfds_style_splits(tiny_splits):
    assert pipeline.balanced_class_weights([30, 10, 0]) == {0: 40 / 60, 1: 40 / 20, 2: 1.0}
    counted = pipeline.train_class_counts(tiny_splits)
    labels = [int(label) for _, label in tiny_splits.train]
    np.testing.assert_array_equal(counted, np.bincount(labels, minlength=3))


def test_changed_files_change_the_fingerprint(tmp_path):
    make_image_folder(tmp_path, {"a": 3, "b": 3}, bad=False)
    first = folder_dataset.load_folder(str(tmp_path), 0.0, 0.3).fingerprint
    assert folder_dataset.load_folder(str(tmp_path), 0.0, 0.3).fingerprint == first
    write(str(tmp_path / "a" / "new.png"), encode(photo(0, 99), "PNG"))
    assert folder_dataset.load_folder(str(tmp_path), 0.0, 0.3).fingerprint != first


@pytest.mark.parametrize("overrides, message", [
    (dict(test_split_fraction=1.0), "Received: test_split_fraction=1.0"),
    (dict(validation_split=0.6, test_split_fraction=0.4),
     r"\(sum below 1\). Received: test_split_fraction=0.4"),
    (dict(class_weight="inverse"), "Received: class_weight=inverse"),
    (dict(dataset="folder:"), "Received: dataset=folder:"),
])
def test_bad_values_name_the_flag_and_value(make_config, overrides, message):
    with pytest.raises(UserError, match=message):
        make_config(**overrides)


def test_missing_folder_is_refused_by_the_runner(make_config):
    """The file system is checked by the runner, before any work; the config checks only values."""
    config = make_config(dataset="folder:/no/such/folder")
    with pytest.raises(UserError, match="Received: dataset=folder:/no/such/folder"):
        run_dir.check_paths(config)
    with pytest.raises(UserError, match="Received: dataset=folder:/no/such/folder"):
        train.run(config)


def test_folder_path_with_spaces_and_accents_round_trips_through_flags_txt(make_config, tmp_path):
    folder = tmp_path / "mes photos d'été"
    make_image_folder(folder, {"a": 1, "b": 1}, bad=False)
    config = make_config(dataset=f"folder:{folder}", strict=True, class_weight="balanced",
                         test_split_fraction=0.2)
    flagfile = tmp_path / "flags.txt"
    files.write_text(str(flagfile), config.to_flagfile())
    with flagsaver.flagsaver():
        tl_flags.FLAGS.unparse_flags()
        tl_flags.FLAGS(["prog", f"--flagfile={flagfile}"])
        assert tl_flags.get_config() == config


@pytest.mark.slow
def test_cli_on_a_messy_folder(tmp_path, messy_folder):
    root, _ = messy_folder
    model_dir = tmp_path / "run"
    result = run_cli("--flagfile=configs/smoke.flags", f"--dataset=folder:{root}", "--backbone=tiny",
                     "--weights=none", "--batch_size=4", "--steps_per_epoch=1", "--head_units=8",
                     "--finetune_epochs=0", "--test_split_fraction=0.2", "--class_weight=balanced",
                     "--mixed_precision=float32", f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert f"Skipped {len(BAD_FILES)} of 30 images that cannot be read" in log
    for folder, name, _, reason in BAD_FILES:
        assert any(f"  {folder}/{name}: " in line and reason in line for line in log.splitlines())
    assert "Ignored 6 files" in log and "Class weights (balanced): cat " in log
    labels = (model_dir / "labels.txt").read_text(encoding="utf-8")
    assert labels == "".join(f"{name}\n" for name in sorted(CLASSES))
    saved = tf.saved_model.load(str(model_dir / "export" / "1"))
    out = saved.signatures["serving_default"](images=tf.constant(photo(1, 0)[None]))
    assert out["class_names"].numpy()[0].decode() in CLASSES


# Hostile names, links and folders: each is a skipped file or folder with its reason, never a traceback.

def _skipped_lines(caplog):
    (warning,) = [m for m in _warnings(caplog) if m.startswith("Skipped")]
    return warning


def test_a_file_name_that_is_not_utf8_is_skipped_with_its_reason(tmp_path, caplog):
    make_image_folder(tmp_path, {"a": 3, "b": 3}, bad=False)
    write(os.fsdecode(os.fsencode(str(tmp_path / "a")) + b"/caf\xe9.jpg"), encode(photo(0, 1), "JPEG"))
    with caplog.at_level(logging.INFO, logger="absl"):
        splits = folder_dataset.load_folder(str(tmp_path), 0.0, 0.34)
    assert splits.num_train + splits.num_test == 6
    assert len(_examples(splits.train)) == splits.num_train
    assert "a/caf\\xe9.jpg: file name is not valid UTF-8" in _skipped_lines(caplog)
    bad_name = r"caf\\xe9.jpg \(file name is not valid UTF-8\).*Received: strict=True"
    with pytest.raises(UserError, match=bad_name):
        folder_dataset.load_folder(str(tmp_path), 0.0, 0.34, strict=True)


def test_symlink_loops_and_unreadable_folders_are_skipped_with_their_reason(tmp_path, monkeypatch, caplog):
    make_image_folder(tmp_path, {"a": 3, "b": 3}, bad=False)
    os.symlink("loop", tmp_path / "loop")  # At class level: is_dir() itself raises.
    make_image_folder(tmp_path / "a" / "locked", {"inner": 2}, bad=False)  # A subfolder of a class.
    make_image_folder(tmp_path / "locked class", {"x": 2}, bad=False)  # A whole class folder.
    os.makedirs(os.fsencode(str(tmp_path)) + b"/\xff class")  # A class folder named in Latin-1.
    os.symlink("gone.jpg", tmp_path / "b" / "dangling.jpg")
    fake_unreadable_folders(monkeypatch, {"locked", "locked class"})
    with caplog.at_level(logging.INFO, logger="absl"):
        splits = folder_dataset.load_folder(str(tmp_path), 0.0, 0.34)
    assert splits.class_names == ["a", "b"]
    assert splits.num_train + splits.num_test == 6
    warning = _skipped_lines(caplog)
    assert warning.startswith("Skipped 1 of 7 images, and 4 folders, that cannot be read")
    for line in ("loop/: cannot be read (Too many levels of symbolic links)",
                 "locked class/: cannot be listed (Permission denied)",
                 "a/locked/: cannot be listed (Permission denied)",
                 "\\xff class/: folder name is not valid UTF-8",
                 "b/dangling.jpg: cannot be read (No such file or directory)"):
        assert line in warning, line
    with pytest.raises(UserError) as error:
        folder_dataset.load_folder(str(tmp_path), 0.0, 0.34, strict=True)
    message = str(error.value)
    assert "\n" not in message and message.endswith("Received: strict=True")
    assert message.startswith("1 of 7 images and 4 folders are unreadable (--strict): ")


# EXIF orientation and the pixel limit, read from the file's first bytes.

@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_read_and_undone_as_pil_does(orientation):
    stored = photo(0, orientation, (6, 10))
    data = exif_jpeg(stored, orientation)
    assert image_files.exif_orientation(data) == orientation
    expected = upright(stored, orientation)
    np.testing.assert_array_equal(image_files.apply_orientation(tf.constant(stored), orientation), expected)
    # The same inside a tf.data graph, with the orientation as a tensor.
    ds = tf.data.Dataset.from_tensors((stored, orientation)).map(image_files.apply_orientation)
    (in_graph,) = list(ds.as_numpy_iterator())
    np.testing.assert_array_equal(in_graph, expected)


def test_exif_orientation_defaults_to_1_and_reads_big_endian_tiff():
    assert image_files.exif_orientation(encode(photo(0, 1), "JPEG")) == 1
    assert image_files.exif_orientation(encode(photo(0, 1), "PNG")) == 1
    assert image_files.exif_orientation(exif_jpeg(photo(0, 1), 6)[:30]) == 1  # Truncated.
    assert image_files.exif_orientation(b"") == 1
    # Motorola byte order, one IFD entry: tag 0x0112, SHORT, count 1, value 8.
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x08\x00\x00"
    app1 = b"Exif\x00\x00" + tiff
    jpeg = b"\xff\xd8\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + b"\xff\xda\x00\x02"
    assert image_files.exif_orientation(jpeg) == 8


@pytest.mark.parametrize("fmt, kwargs", [
    ("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("GIF", {}), ("BMP", {}),
    ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80}), ("WEBP", {"exif": b"Exif\x00\x00II*\x00"}),
])
def test_header_size_reads_height_and_width_without_decoding(fmt, kwargs):
    data = encode(photo(0, 1, (37, 53)), fmt, **kwargs)
    assert image_files.header_size(data) == (37, 53)
    assert image_files.header_size(data[:8]) is None


def test_header_size_of_unknown_or_top_down_data():
    assert image_files.header_size(b"shopping list") is None
    assert image_files.header_size(encode(photo(0, 1), "TIFF")) is None
    bmp = bytearray(encode(photo(0, 1, (5, 7)), "BMP"))
    bmp[22:26] = (-5).to_bytes(4, "little", signed=True)  # Rows stored top-down.
    assert image_files.header_size(bytes(bmp)) == (5, 7)


def test_folder_images_are_turned_upright(tmp_path):
    stored = photo(0, 3, (20, 30))
    write(str(tmp_path / "a" / "phone.jpg"), exif_jpeg(stored, 6))
    write(str(tmp_path / "a" / "phone too.jpg"), exif_jpeg(stored, 6))
    for name in ("plain.png", "plain too.png"):
        write(str(tmp_path / "b" / name), encode(photo(1, 4, (20, 30)), "PNG"))
    splits = folder_dataset.load_folder(str(tmp_path), 0.0, 0.5, seed=0)
    images = _examples(splits.train) + _examples(splits.test)
    turned = upright(folder_dataset.decode_image(tf.constant(exif_jpeg(stored, 1))).numpy(), 6)
    assert turned.shape == (30, 20, 3)
    for image, label in images:
        if label == 0:
            np.testing.assert_array_equal(image, turned)
        else:
            assert image.shape == (20, 30, 3)


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, caplog):
    make_image_folder(tmp_path, {"a": 3, "b": 3}, bad=False)
    write(str(tmp_path / "a" / "panorama.jpg"), encode(photo(0, 1, (20, 300)), "JPEG"))
    # A header that announces 100,000 x 100,000 pixels: decoding it would try to allocate 30 GB.
    huge = encode(photo(0, 1, (4, 4)), "PNG")
    huge = huge[:16] + (100_000).to_bytes(4, "big") * 2 + huge[24:]
    write(str(tmp_path / "b" / "bomb.png"), huge)
    with caplog.at_level(logging.INFO, logger="absl"):
        splits = folder_dataset.load_folder(str(tmp_path), 0.0, 0.34, max_image_pixels=5000)
    assert splits.num_train + splits.num_test == 6
    warning = _skipped_lines(caplog)
    assert "a/panorama.jpg: 300 x 20 pixels, over --max_image_pixels" in warning
    assert "b/bomb.png: 100000 x 100000 pixels, over --max_image_pixels" in warning
    assert folder_dataset.load_folder(str(tmp_path), 0.0, 0.34).num_train == 5  # The default limit: 50 MP.
    with pytest.raises(UserError, match=r"over --max_image_pixels.*Received: strict=True"):
        folder_dataset.load_folder(str(tmp_path), 0.0, 0.34, strict=True, max_image_pixels=5000)


def test_the_check_is_remembered_for_unchanged_files(tmp_path):
    make_image_folder(tmp_path / "data", {"a": 3, "b": 3}, bad=False)
    root, memo = str(tmp_path / "data"), str(tmp_path / "memo")
    first = folder_dataset.load_folder(root, 0.0, 0.34, check_cache_dir=memo)
    assert len(os.listdir(memo)) == 1
    # Same size and time: trusted without decoding; the pipeline stands in for it if it breaks.
    trusted = tmp_path / "data" / "a" / "0.jpg"
    stat = trusted.stat()
    trusted.write_bytes(b"x" * stat.st_size)
    os.utime(trusted, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # Changed: checked again, and now skipped.
    changed = sorted((tmp_path / "data" / "b").iterdir())[0]
    changed.write_bytes(b"not an image any more")
    again = folder_dataset.load_folder(root, 0.0, 0.34, check_cache_dir=memo)
    assert first.num_train + first.num_test == 6 and again.num_train + again.num_test == 5
    without = folder_dataset.load_folder(root, 0.0, 0.34)  # No memo: every file decoded.
    assert without.num_train + without.num_test == 4


# The in-memory cache of preprocessed images: its size is logged, and it is bounded.

def _counting_examples(n):
    """n images, and a counter of how many times any of them was produced."""
    produced = tf.Variable(0, dtype=tf.int64)

    def make(i):
        produced.assign_add(1)
        return tf.fill([4, 4, 3], tf.cast(i, tf.uint8)), i

    examples = tf.data.Dataset.range(n).map(make).apply(tf.data.experimental.assert_cardinality(n))
    return examples, produced


def _preprocess(image):
    return tf.image.resize(image, (2, 2)) / 255.0


def test_preprocess_and_cache_logs_the_expected_size_and_caches_below_the_bound(caplog):
    examples, produced = _counting_examples(10)
    with caplog.at_level(logging.INFO, logger="absl"):
        ds = pipeline.preprocess_and_cache(examples, _preprocess)
    first, second = list(ds.as_numpy_iterator()), list(ds.as_numpy_iterator())
    assert int(produced.numpy()) == 10  # Decoded once, read back from memory the second time.
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, second))
    assert "Caching 10 preprocessed examples in memory (480 bytes" in caplog.text


def test_preprocess_and_cache_does_not_cache_above_the_bound(monkeypatch, caplog):
    monkeypatch.setattr(pipeline, "MEMORY_CACHE_BYTES", 100)
    examples, produced = _counting_examples(10)
    with caplog.at_level(logging.INFO, logger="absl"):
        ds = pipeline.preprocess_and_cache(examples, _preprocess)
    first, second = list(ds.as_numpy_iterator()), list(ds.as_numpy_iterator())
    assert int(produced.numpy()) == 20  # Preprocessed again each pass, nothing held.
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, second))
    assert "Not caching 10 preprocessed examples: 480 bytes expected, over the in-memory bound" in caplog.text
