"""Label functions, the Oxford file-name parser, label-scheme detection and the image checks."""
import csv
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastai.data.transforms import RandomSplitter
from PIL import Image

from conftest import SHARED, make_folder_dataset, run, shapes, write_image
from imagelab import UserError
from imagelab.data import (Presized, breed, check_image, check_oxford_names, classifier_dls, detect_labels, find_images,
                           folder_split, is_cat, label_function, open_rgb, parent_label, presize, split_counts)
from uploads import png_header_only

OXFORD = ["Abyssinian_12.jpg", "Egyptian_Mau_100.jpg", "american_bulldog_3.jpg", "great_pyrenees_7.jpg"]


@pytest.fixture
def oxford_dir(tmp_path):
    for i, name in enumerate(OXFORD * 3):
        stem, ext = name.rsplit(".", 1)
        write_image(tmp_path / f"{stem[:stem.rindex('_')]}_{i}.{ext}", (40 * i % 255, 90, 150))
    return tmp_path


def test_oxford_labels(tmp_path):
    paths = [write_image(tmp_path / n, (0, 0, 0)) for n in OXFORD]
    assert [is_cat(p) for p in paths] == ["cat", "cat", "dog", "dog"]
    assert [breed(p) for p in paths] == ["Abyssinian", "Egyptian_Mau", "american_bulldog", "great_pyrenees"]
    with pytest.raises(ValueError, match="not an Oxford"):
        breed(tmp_path / "holiday.jpg")


def test_detect_labels(tmp_path, oxford_dir):
    folders = make_folder_dataset(tmp_path / "folders", n=2)
    files, _ = find_images(folders)
    assert detect_labels(folders, files) == "folder"
    assert label_function("folder", "breed")(files[0]) == files[0].parent.name
    files, _ = find_images(oxford_dir)
    assert detect_labels(oxford_dir, files) == "filename"
    assert [label_function("filename", "is_cat")(f) for f in files] == [is_cat(f) for f in files]
    assert [label_function("filename", "breed")(f) for f in files] == [breed(f) for f in files]
    loose = tmp_path / "loose"
    write_image(loose / "holiday.jpg", (0, 0, 0))
    write_image(loose / "beach.jpg", (0, 0, 0))
    with pytest.raises(UserError, match="cannot tell the labels"):
        detect_labels(loose, find_images(loose)[0])
    stray = tmp_path / "stray"
    for name in [*OXFORD, "README.jpg"]:  # one name among Oxford-style ones: named, to be fixed
        write_image(stray / name, (0, 0, 0))
    with pytest.raises(UserError, match=r"^cannot tell the labels of .*: some images are outside class sub-folders, "
                                        r"and 1 of 5 are not named like Abyssinian_12.jpg \(such as README.jpg\)"):
        detect_labels(stray, find_images(stray)[0])


def test_flagged_images_keep_their_folders_class_beside_oxford_names(oxford_dir):
    """Oxford-IIIT Pet labels by file name; a flagged upload is named after its content, its class is its folder."""
    write_image(oxford_dir / "flagged" / "cat" / "0a1b2c3d4e5f6a7b.jpg", (60, 200, 60))
    write_image(oxford_dir / "flagged" / "Bengal" / "f0e1d2c3b4a59687.jpg", (60, 200, 60))
    files = find_images(oxford_dir, flagged=True)[0]
    assert detect_labels(oxford_dir, files) == "filename"
    flagged = [f for f in files if f.parts[-3] == "flagged"]
    assert [label_function("filename", "is_cat")(f) for f in flagged] == ["Bengal", "cat"]
    assert [label_function("filename", "breed")(f) for f in flagged] == ["Bengal", "cat"]
    # a dataset kept under a folder that happens to be called "flagged" is labelled by its names
    assert label_function("filename", "breed")(Path("/data/flagged/images/Abyssinian_3.jpg")) == "Abyssinian"
    own = [f for f in files if f not in flagged]
    assert [label_function("filename", "is_cat")(f) for f in own] == [("cat" if f.name[0].isupper() else "dog")
                                                                      for f in own]


def test_photos_of_one_layout_are_not_lookalikes(tmp_path):
    """Small objects on white (a shop's pictures) share their broad shapes; only copies are look-alikes, and a
    look-alike of a look-alike is not one of the first (no chains)."""
    from imagelab.lookalikes import fingerprints, groups, pairs
    photos = sorted((SHARED / "catsdogs").rglob("*.jpg"))[:200]
    shots = []
    for i, photo in enumerate(photos):
        with Image.open(photo) as im:
            im.thumbnail((90, 90))
            canvas = Image.new("RGB", (256, 256), "white")
            canvas.paste(im, ((256 - im.width) // 2, (256 - im.height) // 2))
            canvas.save(tmp_path / f"{i}.jpg", quality=90)
            shots.append(tmp_path / f"{i}.jpg")
    assert pairs(fingerprints(shots)) == []
    with Image.open(shapes(tmp_path / "a.png", seed=1)) as a, Image.open(shapes(tmp_path / "b.png", seed=2)) as b:
        for k in range(13):  # from one picture to another in steps: neighbours alike, the ends not
            Image.blend(a, b, k / 12).save(tmp_path / f"step{k}.png")
    prints = fingerprints([tmp_path / f"step{k}.png" for k in range(13)])
    first, near = groups(prints), set(pairs(prints))
    assert (0, 1) in near and first[1] == 0 and (0, 12) not in near and first[12] != 0
    assert all((first[k], k) in near for k in range(13) if first[k] != k)


def test_lookalikes_are_held_out_together_and_flagged_copies_of_held_out_images_do_not_train(tmp_path, capsys):
    """One picture in two files (resized, recompressed, mirrored: training flips pictures) on both sides of the
    split would be measured on what was trained on; without look-alikes the split is fastai's own."""
    from imagelab.data import random_split
    pictures = [shapes(tmp_path / ("cats" if i % 2 else "dogs") / f"{i}.jpg", seed=i) for i in range(40)]
    own = find_images(tmp_path)[0]
    for seed in range(3):
        assert random_split(tmp_path, 0.2, seed)(own) == tuple(map(sorted, RandomSplitter(0.2, seed=seed)(own)))
    for k, picture in enumerate(pictures[::4]):  # a tenth of the pictures twice: bigger, as another JPEG, or mirrored
        with Image.open(picture) as im:
            copy = im.resize((192, 144)) if k % 2 else im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            copy.save(picture.with_name(f"{picture.stem}-copy.jpg"), quality=80)
    files = find_images(tmp_path)[0]
    copies = [(files.index(f), files.index(f.with_name(f.name.replace("-copy", "")))) for f in files
              if "-copy" in f.name]
    for seed in range(10):
        train, valid = random_split(tmp_path, 0.2, seed)(files)
        assert sorted(train + valid) == list(range(len(files)))
        assert all((a in valid) == (b in valid) for a, b in copies), seed
    assert "note: 10 of 50 files repeat a picture another file holds" in capsys.readouterr().out
    held_out = files[valid[0]]  # an app's example, say, flagged: it must not train
    flagged = tmp_path / "flagged" / held_out.parent.name / "0a1b2c3d4e5f6a7b.jpg"
    flagged.parent.mkdir(parents=True)
    with Image.open(held_out) as im:
        im.save(flagged, quality=90)
    files = find_images(tmp_path, flagged=True)[0]
    train, valid = random_split(tmp_path, 0.2, seed)(files)
    assert files.index(flagged) not in train + valid and len(train + valid) == len(files) - 1
    assert "note: 1 flagged file looks like held-out images and is left out" in capsys.readouterr().out


def test_a_chain_of_lookalikes_does_not_cross_the_split(tmp_path, capsys):
    """A like B like C (not A like C) make two groups, (A, B) and (C): with C held out, B must not train."""
    from imagelab.data import random_split
    from imagelab.lookalikes import fingerprints, pairs
    for i in range(20):
        shapes(tmp_path / "data" / ("cats" if i % 2 else "dogs") / f"{i}.jpg", seed=10 + i)
    with Image.open(shapes(tmp_path / "a.png", seed=1)) as a, Image.open(shapes(tmp_path / "b.png", seed=2)) as b:
        for k in range(13):  # from one picture to another in steps: neighbours alike, the ends not
            Image.blend(a, b, k / 12).save(tmp_path / "data" / ("cats" if k % 2 else "dogs") / f"step{k}.png")
    files = find_images(tmp_path / "data")[0]
    crossed = 0
    for seed in range(10):
        train, valid = random_split(tmp_path / "data", 0.3, seed)(files)
        assert pairs(fingerprints([files[i] for i in train]), fingerprints([files[i] for i in valid])) == [], seed
        crossed += len(files) - len(train) - len(valid)
    assert crossed and "are left out of training" in capsys.readouterr().out


def test_the_next_split_of_a_folder_decodes_no_picture_to_find_lookalikes(tmp_path, decodes):
    """A run keeps the fingerprints of its images, flagged ones too, in --cache: the next run on the folder reads
    them (imagelab.lookalikes)."""
    from imagelab.data import random_split
    data, cache = tmp_path / "data", tmp_path / "cache"
    for i in range(20):
        shapes(data / ("cats" if i % 2 else "dogs") / f"{i}.jpg", seed=i)
    shapes(data / "flagged" / "cats" / "0a1b2c3d4e5f6a7b.jpg", seed=100)
    files = find_images(data, flagged=True)[0]
    decodes.clear()
    split = random_split(data, 0.2, 42, cache)(files)
    assert sorted(decodes) == files
    decodes.clear()
    assert random_split(data, 0.2, 42, cache)(files) == split and decodes == []
    assert len(list((cache / "fingerprints").iterdir())) == 3  # one a folder of images


def test_linked_class_folders_are_read_once_each(tmp_path):
    """A class folder is often a link to where the photos are; a link back up must not loop."""
    from imagelab.paths import visible_files
    write_image(tmp_path / "elsewhere" / "cats" / "c.jpg", (220, 60, 60))
    write_image(tmp_path / "data" / "dogs" / "d.jpg", (60, 60, 220))
    (tmp_path / "data" / "cats").symlink_to(tmp_path / "elsewhere" / "cats", target_is_directory=True)
    (tmp_path / "data" / "dogs" / "up").symlink_to(tmp_path / "data", target_is_directory=True)
    data = tmp_path / "data"
    assert visible_files(data) == [data / "cats" / "c.jpg", data / "dogs" / "d.jpg"]


def test_bad_files_are_skipped_with_reasons(tmp_path):
    good = write_image(tmp_path / "a" / "ok.jpg", (10, 200, 10), size=(300, 200))
    odd = write_image(tmp_path / "a" / "00000005.jpg?width=3200&height=1680&fit=crop", (10, 200, 10), fmt="JPEG")
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    (tmp_path / "a" / "text.jpg").write_text("this is not a picture")
    (tmp_path / "a" / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "a" / "bomb.png").write_bytes(png_header_only(40000, 40000))
    (tmp_path / "a" / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(good.read_bytes())
    files, bad = find_images(tmp_path)
    assert sorted(f.name for f in files) == sorted([good.name, odd.name])
    assert {f.name: reason.split(" (")[0] for f, reason in bad} == {  # the apps' words for the same files
        "bomb.png": "image too large", "empty.jpg": "empty file", "gone.jpg": "a link that leads nowhere",
        "text.jpg": "not an image",
        "truncated.jpg": "truncated image"}
    assert check_image(good) is None
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_text("nope")
    with pytest.raises(UserError, match="no readable images"):
        find_images(only_bad)


FIND_IMAGES = """
import sys
from imagelab.data import find_images
good, bad = find_images(sys.argv[1])
print(len(good), *sorted(f"{f.name}: {why}" for f, why in bad), sep="\\n")
"""


def test_named_pipes_are_skipped_never_opened(tiny_model, tmp_path):
    """A named pipe (or a link to one) in a dataset, or named to predict: opened, it would wait for a writer forever
    (and Ctrl-C would not stop the threads that wait). Each is skipped with its reason; bounded runs, so that a
    regression fails instead of hanging the tests."""
    data = make_folder_dataset(tmp_path / "data", n=3)
    os.mkfifo(tmp_path / "pipe")
    (data / "cats" / "pipe.jpg").symlink_to(tmp_path / "pipe")
    os.mkfifo(data / "dogs" / "fifo.jpg")
    (data / "dogs" / "zero.jpg").symlink_to("/dev/zero")  # a device: it would never end
    res = run(["-c", FIND_IMAGES, data], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines() == ["6", "fifo.jpg: not a regular file", "pipe.jpg: not a regular file",
                                       "zero.jpg: not a regular file"]
    out = tmp_path / "out.csv"
    res = run(["-m", "imagelab.predict", tiny_model, tmp_path / "pipe", data, "--csv", out], timeout=120)
    assert res.returncode == 0 and "6 classified, 4 not (the error column says why)" in res.stderr, res.stderr[-2000:]
    errors = {Path(r["path"]).name: r["error"] for r in csv.DictReader(out.open()) if r["error"]}
    assert errors == dict.fromkeys(["pipe", "pipe.jpg", "fifo.jpg", "zero.jpg"], "not a regular file")


def test_open_rgb_handles_alpha_palette_and_exif():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert open_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert open_rgb(Image.new("P", (4, 4))).mode == "RGB"
    assert open_rgb(Image.new("I;16", (4, 4), 300)).mode == "RGB"
    # 16 bits a channel, as the browser draws them: a dark 16-bit image stays dark, whatever its brightest pixel
    assert open_rgb(Image.new("I;16", (4, 4), 120 * 257)).getpixel((0, 0)) == (120,) * 3
    assert open_rgb(Image.new("I;16", (4, 4), 200)).getpixel((0, 0)) == (1,) * 3
    # 32-bit float: 0 to 1 as the float images of science and graphics have it, else as the integers are read
    for values, grey in (([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 100.0, 200.0], [0, 100, 200]),
                         ([0.0, 60 * 257.0, 70000.0], [0, 60, 255]), ([float("nan"), 0.25, 1.0], [0, 64, 255])):
        f = open_rgb(Image.fromarray(np.array([values], dtype=np.float32)))
        assert f.mode == "RGB" and [f.getpixel((x, 0)) for x in range(3)] == [(g,) * 3 for g in grey], values
    wide = Image.new("RGB", (30, 10), "blue")
    exif = wide.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buf = io.BytesIO()
    wide.save(buf, "JPEG", exif=exif)
    assert open_rgb(io.BytesIO(buf.getvalue())).size == (10, 30)


def test_dataloaders_from_oxford_names(oxford_dir):
    files, _ = find_images(oxford_dir)
    dls = classifier_dls(files, is_cat, splitter=RandomSplitter(0.25, seed=42), size=32, min_scale=0.35, bs=4,
                         workers=0)
    assert list(dls.vocab) == ["cat", "dog"]
    x, y = dls.one_batch()
    assert tuple(x.shape[1:]) == (3, 32, 32)
    counts = split_counts(dls, is_cat)
    assert sum(counts["train"].values()) + sum(counts["valid"].values()) == len(files) == 12
    assert counts["valid"] == {"cat": sum(is_cat(f) == "cat" for f in dls.valid_ds.items),
                               "dog": sum(is_cat(f) == "dog" for f in dls.valid_ds.items)}


def test_presized_copies_are_small_upright_and_follow_their_file(tmp_path, capsys):
    photo = write_image(tmp_path / "data" / "a" / "photo.jpg", (200, 30, 30), size=(400, 300))
    tall = tmp_path / "data" / "a" / "rotated.jpg"
    exif = Image.new("RGB", (30, 10)).getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the copy must be upright
    Image.new("RGB", (300, 200), "blue").save(tall, exif=exif)
    cache = tmp_path / "cache"
    copies = presize([photo, tall], size=32, cache=cache)
    with Image.open(copies[photo]) as im:
        assert im.mode == "RGB" and im.size == (64, 48)  # short side 1.5 x 32
    with Image.open(copies[tall]) as im:
        assert im.size == (48, 72)
    made = copies[photo].stat().st_mtime_ns
    assert presize([photo], size=32, cache=cache)[photo].stat().st_mtime_ns == made  # reused, not remade
    write_image(photo, (30, 200, 30), size=(400, 300), seed=1)  # the file changes: so does its copy
    assert presize([photo], size=32, cache=cache)[photo] != copies[photo]
    assert presize([photo], size=64, cache=cache)[photo].parent.parent.name == "96px"
    latin1 = photo.with_name(os.fsdecode(b"\xe9t\xe9.jpg"))  # a name a disk may hold that is not UTF-8
    shutil.copy(photo, latin1)
    with Image.open(presize([latin1], size=32, cache=cache)[latin1]) as im:
        assert im.size == (64, 48)
    (tmp_path / "not-a-folder").write_text("")  # a cache that cannot be written: the files train, and it is said
    assert presize([photo, tall], size=32, cache=tmp_path / "not-a-folder") == {}
    assert "note: 2 of 2 presized copies could not be made in" in capsys.readouterr().out
    get_x = Presized(copies)
    assert get_x(photo) == copies[photo] and Presized()(photo) == photo
    im = Image.new("RGB", (5, 5))
    assert get_x(im) is im  # uploads (PIL images) pass through untouched


def test_train_and_valid_folders_keep_their_split_and_copies_of_valid_images_do_not_train(tmp_path, capsys):
    for k, (split, n) in enumerate((("train", 6), ("valid", 2))):
        for label, color in (("cats", (220, 60, 60)), ("dogs", (60, 60, 220))):
            for i in range(n):
                write_image(tmp_path / split / label / f"{i}.jpg", color, seed=100 * k + i)
    files, _ = find_images(tmp_path)
    assert detect_labels(tmp_path, files) == "folder"
    dls = classifier_dls(files, parent_label, splitter=folder_split(tmp_path, files), size=32, min_scale=0.35,
                         bs=4, workers=0)
    assert all(f.relative_to(tmp_path).parts[0] == "valid" for f in dls.valid_ds.items) and len(dls.valid_ds) == 4
    assert len(dls.train_ds) == 12 and list(dls.vocab) == ["cats", "dogs"]
    assert folder_split(tmp_path / "train", find_images(tmp_path / "train")[0]) is None
    assert "look like images of valid/" not in capsys.readouterr().out
    # a held-out picture also in train/, mirrored and smaller: it would be measured on itself
    picture = shapes(tmp_path / "valid" / "cats" / "photo.jpg", seed=7)
    with Image.open(picture) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((48, 36)).save(tmp_path / "train" / "cats" / "copy.jpg")
    files, _ = find_images(tmp_path)
    dls = classifier_dls(files, parent_label, splitter=folder_split(tmp_path, files), size=32, min_scale=0.35,
                         bs=4, workers=0)
    assert len(dls.valid_ds) == 5 and len(dls.train_ds) == 12
    assert tmp_path / "train" / "cats" / "copy.jpg" not in dls.train_ds.items
    assert ("note: 1 files of train/ look like images of valid/ (a copy, resized, recompressed or mirrored) and are "
            "left out of training, which would be measured on itself (such as train/cats/copy.jpg, like "
            "valid/cats/photo.jpg)") in capsys.readouterr().out


def test_oxford_names_in_train_and_valid_folders_are_labelled_by_name(oxford_dir):
    """Oxford-IIIT Pet split into train/ and valid/ (a test/ beside them, left out): the classes are the names', not
    the folders' "train" and "valid"."""
    for split in ("train", "valid", "test"):
        (oxford_dir / split).mkdir()
    for i, f in enumerate(sorted(oxford_dir.glob("*.jpg"))):
        f.rename(oxford_dir / ("train", "train", "valid", "test")[i % 4] / f.name)
    write_image(oxford_dir / "test" / "holiday.jpg", (1, 2, 3))  # left out with test/: its name labels nothing
    files = find_images(oxford_dir)[0]
    assert detect_labels(oxford_dir, files) == "filename"
    check_oxford_names(oxford_dir, files)
    dls = classifier_dls(files, label_function("filename", "is_cat"), splitter=folder_split(oxford_dir, files),
                         size=32, min_scale=0.35, bs=2, workers=0)
    assert list(dls.vocab) == ["cat", "dog"]


def test_a_test_folder_beside_train_and_valid_is_neither_trained_on_nor_measured(tmp_path, capsys):
    for k, (split, n) in enumerate((("train", 6), ("valid", 2), ("test", 3))):
        for label, color in (("cats", (220, 60, 60)), ("dogs", (60, 60, 220))):
            for i in range(n):
                write_image(tmp_path / split / label / f"{i}.jpg", color, seed=100 * k + i)
    files, _ = find_images(tmp_path)
    dls = classifier_dls(files, parent_label, splitter=folder_split(tmp_path, files), size=32, min_scale=0.35,
                         bs=4, workers=0)
    assert {f.relative_to(tmp_path).parts[0] for f in dls.train_ds.items} == {"train"} and len(dls.train_ds) == 12
    assert {f.relative_to(tmp_path).parts[0] for f in dls.valid_ds.items} == {"valid"} and len(dls.valid_ds) == 4
    assert "note: test left out: with train/ and valid/ folders" in capsys.readouterr().out


def test_a_class_with_no_training_images_stops_the_run_before_training(tmp_path):
    """Its held-out images name a label that the model's classes (the training images') lack: fastai would fail on
    the first of them (mid-epoch, in a loader process), a traceback after minutes of training."""
    for split, label, n in (("train", "cats", 6), ("train", "dogs", 6), ("valid", "cats", 2), ("valid", "dogs", 2),
                            ("valid", "birds", 2)):
        for i in range(n):
            write_image(tmp_path / "folders" / split / label / f"{i}.jpg", (40 * i, 90, 30), seed=i)
    files, _ = find_images(tmp_path / "folders")
    with pytest.raises(UserError, match=r"^no training images of birds: all 2 are held out, so the model could not "
                                        r"learn it; add photos of it \(to train/"):
        classifier_dls(files, parent_label, splitter=folder_split(tmp_path / "folders", files), size=32,
                       min_scale=0.35, bs=4, workers=0)
    data = make_folder_dataset(tmp_path / "data", n=10)
    write_image(data / "bears" / "bear_0.jpg", (90, 60, 30))  # one photo: held out by some seeds
    files, _ = find_images(data)
    stopped = []
    for seed in range(8):
        try:
            classifier_dls(files, parent_label, splitter=RandomSplitter(0.2, seed=seed), size=32, min_scale=0.35,
                           bs=4, workers=0)
        except UserError as e:
            stopped.append(str(e))
    assert stopped and len(stopped) < 8
    assert all(s.startswith("no training images of bears: the only one is held out") for s in stopped)


def test_a_class_whose_only_photo_is_held_out_is_named_not_taken_for_a_missing_class(tmp_path):
    """Two classes of one photo each: held out, a's photo leaves fastai's vocab one class, yet a is there; at the
    default split none is held out, and no --valid-pct helps (the tester's "raise --valid-pct", then "only one
    class (b)")."""
    for label, color in (("a", (220, 60, 60)), ("b", (60, 60, 220))):
        write_image(tmp_path / label / "1.jpg", color)
    files, _ = find_images(tmp_path)

    def dls(valid_pct, seed=0):
        return classifier_dls(files, parent_label, splitter=RandomSplitter(valid_pct, seed=seed), size=32,
                              min_scale=0.35, bs=2, workers=0)
    stopped = set()
    for seed in range(4):  # a or b held out, by the seed
        with pytest.raises(UserError) as e:
            dls(0.5, seed)
        stopped.add(str(e.value))
    assert stopped == {f"no training images of {c}: the only one is held out, so the model could not learn it; add "
                       "photos of it (to train/ where folders hold the split)" for c in "ab"}  # moved out: one class
    with pytest.raises(UserError, match=r"^2 images for 2 classes \(a, b\), one each: a class needs a photo to train "
                                        r"on and one to hold out; add photos, at least two of each class$"):
        dls(0.2)
    write_image(tmp_path / "b" / "2.jpg", (60, 60, 220), seed=1)
    write_image(tmp_path / "b" / "3.jpg", (60, 60, 220), seed=2)
    files, _ = find_images(tmp_path)
    with pytest.raises(UserError, match=r"^no validation images among 4 images: raise --valid-pct$"):
        dls(0.2)  # more photos than classes: a larger share holds one out


def test_a_class_folder_of_unreadable_files_is_named_not_missing(tmp_path):
    """b/ holds only files that are not images: it is there, and the line says why it does not count."""
    for i in range(3):
        write_image(tmp_path / "a" / f"{i}.jpg", (220, 60, 60), seed=i)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jpg").write_text("not an image")
    files, skipped = find_images(tmp_path)
    assert [f for f, _ in skipped] == [tmp_path / "b" / "x.jpg"]
    with pytest.raises(UserError, match=rf"^b/ in {re.escape(str(tmp_path))} has no readable image \(its file was "
                                        r"skipped as unreadable\), so a/ is the only class: a classifier needs at "
                                        r"least two; "
                                        r"add photos to it$"):
        detect_labels(tmp_path, files)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "y.png").write_text("nor this")
    (tmp_path / "c" / "z.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"^b/, c/ in .* have no readable image \(their 3 files were skipped as "
                                        r"unreadable\), so a/ is the only class"):
        detect_labels(tmp_path, find_images(tmp_path)[0])
    shutil.rmtree(tmp_path / "b")
    shutil.rmtree(tmp_path / "c")
    with pytest.raises(UserError, match=r"^only one class in .* \(a/\): a classifier needs one sub-folder per class"):
        detect_labels(tmp_path, find_images(tmp_path)[0])


def test_a_class_folder_of_unreadable_files_beside_other_classes_is_said_to_be_no_class(tmp_path, capsys):
    """With two classes left the run goes on: its files were each said to be skipped, and so is the class."""
    from imagelab.classifier import Classifier
    from imagelab.config import ClassifierConfig

    data = make_folder_dataset(tmp_path / "data", n=5)
    (data / "panda").mkdir()
    (data / "panda" / "bad.jpg").write_text("not an image")
    cfg = ClassifierConfig(data=str(data), size=16, bs=2, pretrained=False, arch="resnet18")
    dls = Classifier().dataloaders(cfg, data, find_images(data)[0], None, 0)
    assert list(dls.vocab) == ["cats", "dogs"]
    assert capsys.readouterr().out.splitlines()[0] == ("note: panda/ has no readable image (its file was skipped "
                                                       "as unreadable): not a class of this model")


def test_a_class_with_no_held_out_images_is_named_before_training(tmp_path, capsys):
    from imagelab.classifier import Classifier
    from imagelab.config import ClassifierConfig

    data = make_folder_dataset(tmp_path / "data", n=10)
    write_image(data / "bears" / "bear_0.jpg", (90, 60, 30))  # one photo: it cannot be both trained and held out
    files, _ = find_images(data)
    task = Classifier()
    cfg = ClassifierConfig(data=str(data), size=32, bs=4, pretrained=False, arch="resnet18")
    dls = task.dataloaders(cfg, data, files, None, 0)
    assert "bears" in {parent_label(f) for f in dls.train_ds.items}  # so it is not held out
    assert capsys.readouterr().out.splitlines() == [
        "classes from the folder names: bears, cats, dogs",
        "note: no held-out images of bears (1 in training): the report cannot measure it; add photos or raise "
        "--valid-pct"]
    assert task.describe(cfg, data, dls)["counts"]["valid"] == {"bears": 0, "cats": 2, "dogs": 2}


def test_the_line_before_training_counts_the_images_left_out(tmp_path, capsys):
    import torch
    from imagelab.classifier import Classifier
    from imagelab.config import ClassifierConfig
    from imagelab.train import prepare
    data = make_folder_dataset(tmp_path / "data", n=5)
    write_image(data / "flagged" / "polar" / "f0e1d2c3b4a59687.jpg", (60, 220, 60))  # a class the data lacks
    (data / "cats" / "broken.jpg").write_text("not an image")
    cfg = ClassifierConfig(data=str(data), out=str(tmp_path / "m.pkl"), size=16, bs=2, flagged=True,
                           pretrained=False, arch="resnet18", cache=str(tmp_path / "cache"))
    prepare(Classifier(), cfg, data, torch.device("cpu"), "fp32")
    out = capsys.readouterr().out
    assert "are left out" in out and "11 images (1 skipped): 8 to train (0 flagged in the apps), 2 held out, 1 left out\n" in out


def test_the_run_says_which_classes_it_learns_and_where_their_names_come_from(oxford_dir, tmp_path_factory, capsys):
    """A `--task` given for class folders has no file names to read: the line says the folders name the classes."""
    from imagelab.classifier import Classifier
    from imagelab.config import ClassifierConfig
    tmp_path = tmp_path_factory.mktemp("more")  # oxford_dir is the test's own tmp_path

    def said(data, **options):
        cfg = ClassifierConfig(data=str(data), size=16, bs=2, pretrained=False, arch="resnet18",
                               cache=str(tmp_path / "cache"), **options)
        Classifier().dataloaders(cfg, data, find_images(data)[0], None, 0)
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("classes from")]

    assert said(oxford_dir, task="is_cat") == ["classes from Oxford-style file names, --task is_cat: cat, dog"]
    many = make_folder_dataset(tmp_path / "many", n=5, classes=[(f"c{i:02d}", (10 * i, 90, 30)) for i in range(13)])
    assert said(many, task="breed") == [
        "classes from the folder names: c00, c01, c02, c03, c04, c05, c06, c07, c08, c09, c10, c11, ... (13)"]
