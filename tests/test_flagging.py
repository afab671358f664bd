"""Flag to retrain: a wrong answer flagged in the app lands in flagged/<class>/, shows in the cleaner, and a
retrain with --flagged includes it; hostile uploads are refused or stored only as a re-encoded JPEG."""
import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image

from conftest import (BEARS, Client, fails_with_one_line, free_port, make_folder_dataset, run, served,
                      write_image)
from imagelab import UserError
from imagelab.cleaning import Cleaner
from imagelab.flagging import FLAGGED_NAME, MAX_SIDE, Flagger
from imagelab.paths import example_images
from uploads import invalid_uploads, valid_uploads

CLASSES = [label for label, _ in BEARS]
SAVED = re.compile(rf"`(flagged/(\w+)/{FLAGGED_NAME.pattern})`")


def all_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_flag_in_the_app_then_clean_then_retrain_with_flagged(tiny_bears, tmp_path):
    model, bears, _ = tiny_bears
    data = shutil.copytree(bears, tmp_path / "data")
    photo = write_image(tmp_path / "up.png", (230, 200, 120), size=(1600, 1200))
    with served(["apps/bears/app.py", "--model", model, "--flag-data", data]) as url:
        client = Client(url, verbose=False)
        api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/flag"]
        assert [p["parameter_name"] for p in api["parameters"]] == ["image", "label"]
        assert [r["label"] for r in api["returns"]] == ["where the image was kept"]  # not Gradio's "value_10"
        assert client.predict(handle_file(str(photo)), api_name="/predict")["label"] in CLASSES
        before = all_files(data)
        kept, label = SAVED.search(client.predict(handle_file(str(photo)), "teddy", api_name="/flag")).groups()
        assert label == "teddy" and all_files(data) == sorted(before + [kept])
        with Image.open(data / kept) as im:  # a new JPEG, shrunk: not the bytes that were uploaded
            assert im.format == "JPEG" and max(im.size) == MAX_SIDE

        for name, (path, message) in invalid_uploads(tmp_path / "bad").items():
            with pytest.raises(AppError, match=message):
                client.predict(handle_file(str(path)), "black", api_name="/flag")
        for bad_label, says in [("../black", "not a class of this model: '../black'"), ("panda", "not a class"),
                                ("flagged", "not a class"), ("", "choose a class")]:
            with pytest.raises(AppError, match=re.escape(f"{says}") + r".* \(classes: black, grizzly, teddy\)"):
                client.predict(handle_file(str(photo)), bad_label, api_name="/flag")
        example = example_images(model)[0]  # held out: flagged, the next model would train on it
        with pytest.raises(AppError, match="one of the app's examples, a held-out image"):
            client.predict(handle_file(str(example)), "teddy", api_name="/flag")
        assert all_files(data) == sorted(before + [kept])  # nothing refused was written
        kept_all = {kept}
        odd = valid_uploads(tmp_path / "odd")
        for name in ["big_6000x4000.jpg", "rgba.png", "animated.gif", "exif_rotated.jpg", "cmyk.jpg", "jpeg_named.png"]:
            path = odd[name]  # odd but valid: kept, as JPEG
            saved, _ = SAVED.search(client.predict(handle_file(str(path)), "grizzly", api_name="/flag")).groups()
            kept_all.add(saved)
            with Image.open(data / saved) as im:
                assert im.format == "JPEG" and max(im.size) <= MAX_SIDE, name
        assert url.proc.poll() is None and "Traceback" not in url.log.read_text()
        assert client.predict(handle_file(str(photo)), api_name="/predict")["label"] in CLASSES  # still serving
    flagged = [f for f in all_files(data) if f.startswith("flagged/")]
    assert set(flagged) == kept_all and len(kept_all) == 7

    # The cleaner lists the flagged images of a class; "add to <class>" moves one in, undo puts it back.
    cleaner = Cleaner(model, data)
    assert [r["file"] for r in cleaner.rank("teddy", "flagged")] == [kept]
    assert cleaner.apply([{"file": kept, "action": "relabel", "to": "teddy"}]) == [
        {"from": kept, "to": "teddy/" + kept.split("/")[-1]}]
    cleaner.undo()
    assert (data / kept).is_file()

    # Training without --flagged leaves them out; with it, they are in the data like any other image.
    out = tmp_path / "models" / "bears.pkl"
    res = run(["training/train_bears.py", "--data", data, "--no-pretrained", "--arch", "resnet18", "--epochs", "1",
               "--size", "32", "--bs", "8", "--workers", "0", "--out", out, "--flagged"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    split = json.loads(out.with_name("bears.report").joinpath("split.json").read_text())
    used = set(split["train"]) | set(split["valid"])
    assert set(flagged) <= used and len(used) == 24 + len(flagged)
    assert f"({len(flagged)} flagged in the apps)" in res.stdout  # flagged images train, never held out
    metrics = json.loads(out.with_name("bears.report").joinpath("metrics.json").read_text())
    assert metrics["flagged"] is True


def test_an_apps_endpoints_take_turns_together(tiny_model, tmp_path):
    """Two requests run at once in the whole app, not two per endpoint: with two predictions running, flags wait."""
    big = tmp_path / "big.png"  # 36 megapixels: each request decodes it for a while
    Image.new("RGB", (6000, 6000), (200, 100, 50)).save(big)
    (tmp_path / "data").mkdir()
    with served(["apps/pets/app.py", "--model", tiny_model, "--flag-data", tmp_path / "data"]) as url:
        client = Client(url, verbose=False)
        jobs = [client.submit(handle_file(str(big)), api_name="/predict") for _ in range(2)]
        jobs += [client.submit(handle_file(str(big)), "cats", api_name="/flag") for _ in range(2)]
        seen, deadline = set(), time.monotonic() + 120
        while not all(job.done() for job in jobs) and time.monotonic() < deadline:
            seen.add(tuple(job.status().code for job in jobs))
            time.sleep(0.02)
        assert [job.result(timeout=1)["label"] in ("cats", "dogs") for job in jobs[:2]] == [True, True]
        assert all(SAVED.search(job.result(timeout=1)) for job in jobs[2:])
    assert any(Status.IN_QUEUE in codes for codes in seen), seen  # 4 requests, 2 turns: some waited


def test_the_latest_flag_of_a_picture_wins(tiny_model, tmp_path):
    """A picture flagged as cats, then as dogs, is kept once, as dogs: two labels would train it both ways."""
    photo = write_image(tmp_path / "up.jpg", (220, 60, 60))
    (tmp_path / "data").mkdir()
    with served(["apps/pets/app.py", "--model", tiny_model, "--flag-data", tmp_path / "data"]) as url:
        client = Client(url, verbose=False)
        first = SAVED.search(client.predict(handle_file(str(photo)), "cats", api_name="/flag"))[1]
        latest = SAVED.search(client.predict(handle_file(str(photo)), "dogs", api_name="/flag"))[1]
    assert first.replace("/cats/", "/dogs/") == latest
    assert all_files(tmp_path / "data") == [latest]


def test_concurrent_flags_of_one_picture_keep_exactly_one_copy(tmp_path):
    image = write_image(tmp_path / "x.jpg", (40, 40, 40), size=(640, 480))
    flagger = Flagger(tmp_path, CLASSES, per_minute=1000)
    labels = CLASSES * 8
    with ThreadPoolExecutor(len(labels)) as pool:
        kept = list(pool.map(lambda label: flagger.flag(image, label), labels))
    files = all_files(tmp_path / "flagged")
    assert len(files) == 1 and f"flagged/{files[0]}" in kept, files
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no staged copy left


def test_flags_are_rate_limited_and_the_folder_is_capped(tmp_path):
    image = write_image(tmp_path / "x.jpg", (40, 40, 40))
    fast = Flagger(tmp_path, CLASSES, per_minute=3)
    for label in ["../black", "flagged", "panda"]:  # what a caller other than the page could send
        with pytest.raises(UserError, match="not a class of this model"):
            fast.flag(image, label)
    for label in ["", None]:
        with pytest.raises(UserError, match=r"^choose a class \(classes: black, grizzly, teddy\)$"):
            fast.flag(image, label)
    for i, label in enumerate(CLASSES):  # three pictures: one flagged under three labels is kept once
        fast.flag(write_image(tmp_path / f"{i}.jpg", (40, 40, 40), seed=i), label)
    with pytest.raises(UserError, match="too many flags"):
        fast.flag(image, "black")
    assert len(list((tmp_path / "flagged").rglob("*.jpg"))) == 3
    full = Flagger(tmp_path, CLASSES, max_files=3)
    with pytest.raises(UserError, match="full"):
        full.flag(write_image(tmp_path / "y.jpg", (1, 2, 3)), "black")
    with pytest.raises(UserError, match="no such folder"):
        Flagger(tmp_path / "missing", CLASSES)
    other = make_folder_dataset(tmp_path / "other", classes=(("cats", (1, 1, 1)), ("dogs", (2, 2, 2))), n=1)
    with pytest.raises(UserError, match="holds the folders cats, dogs and none of this model's classes"):
        Flagger(other, CLASSES)  # another model's dataset: a flag would add a class it never had
    for layout in (["train/black", "valid/black"], ["train/black"], ["images/black"], ["train/x", "valid/teddy"]):
        ours = tmp_path / "ours" / "-".join(layout).replace("/", "_")
        for folder in layout:  # a class is named by its images' folder, wherever that is
            write_image(ours / folder / "1.jpg", (1, 1, 1))
        Flagger(ours, CLASSES)


def test_flagged_images_of_a_class_the_dataset_does_not_have_do_not_train(tmp_path, capsys):
    from imagelab.data import find_images, parent_label, unknown_flagged
    data = make_folder_dataset(tmp_path / "data", n=5)
    write_image(data / "flagged" / "cats" / "0a1b2c3d4e5f6a7b.jpg", (60, 220, 60))
    polar = write_image(data / "flagged" / "polar" / "f0e1d2c3b4a59687.jpg", (60, 220, 60))
    files = find_images(data, flagged=True)[0]
    assert unknown_flagged(data, files, parent_label) == [polar]
    from imagelab.classifier import Classifier
    from imagelab.config import ClassifierConfig
    cfg = ClassifierConfig(data=str(data), out=str(tmp_path / "m.pkl"), size=16, bs=2, flagged=True)
    dls = Classifier().dataloaders(cfg, data, files, None, 0)
    assert list(dls.vocab) == ["cats", "dogs"] and polar not in dls.train_ds.items + dls.valid_ds.items
    assert "note: 1 flagged images of polar, which the dataset has no images of, are left out" in \
        capsys.readouterr().out


def test_flagged_images_train_when_the_folders_hold_the_split(tmp_path):
    from imagelab.data import find_images, folder_split
    for top, color in [("train", (220, 60, 60)), ("valid", (60, 60, 220)), ("flagged", (60, 220, 60))]:
        write_image(tmp_path / top / "cats" / "a.jpg", color)
    assert [f.parts[-3] for f in find_images(tmp_path)[0]] == ["train", "valid"]
    files = find_images(tmp_path, flagged=True)[0]
    train, valid = folder_split(tmp_path, files)(files)
    assert [files[i].parts[-3] for i in train] == ["flagged", "train"] and [files[i].parts[-3] for i in valid] == ["valid"]


def test_a_missing_flag_folder_stops_the_app_with_one_line(tiny_model, tmp_path):
    res = run(["apps/pets/app.py", "--model", tiny_model, "--flag-data", tmp_path / "typo", "--port", "1"], timeout=120)
    fails_with_one_line(res, "no such folder to keep flagged images in", "typo")


# Runs an app (argv[3:]) with mounts of its own, `folder` (argv[1]) bound onto itself, read-only with argv[2] "ro": as a
# read-only disk is for the app alone (root writes through file permissions, not through a read-only mount).
OWN_MOUNTS = """
import ctypes, os, runpy, subprocess, sys
if ctypes.CDLL(None, use_errno=True).unshare(0x20000):  # CLONE_NEWNS
    sys.exit(f"unshare: {os.strerror(ctypes.get_errno())}")
folder, mode = sys.argv[1:3]
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["mount", "--bind", folder, folder], check=True)
if mode == "ro":
    subprocess.run(["mount", "-o", "remount,ro,bind", folder], check=True)
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts of its own need root (as a user, chmod makes a folder read-only)")
def test_a_flag_folder_that_cannot_be_written_is_one_line(tiny_model, tmp_path):
    """Found when the app starts, which stops; and when it turns read-only later, each flag is told in one line."""
    data = tmp_path / "data"
    data.mkdir()
    app = ["apps/pets/app.py", "--model", tiny_model, "--flag-data", data]
    res = run(["-c", OWN_MOUNTS, data, "ro", *app, "--port", free_port()], timeout=60)  # not served: it stops
    fails_with_one_line(res, f"cannot keep flagged images in {data}: Read-only file system")
    with served(["-c", OWN_MOUNTS, data, "rw", *app]) as url:
        client = Client(url, verbose=False)
        kept = SAVED.search(client.predict(handle_file(str(write_image(tmp_path / "a.jpg", (220, 60, 60)))), "cats",
                                           api_name="/flag"))[1]
        subprocess.run(["nsenter", "-t", str(url.proc.pid), "-m", "mount", "-o", "remount,ro,bind", data], check=True,
                       timeout=30)
        other = handle_file(str(write_image(tmp_path / "b.jpg", (60, 60, 220))))
        for _ in range(2):
            with pytest.raises(AppError, match="^could not keep the image: Read-only file system$"):
                client.predict(other, "dogs", api_name="/flag")
        assert client.predict(other, api_name="/predict")["label"] in ("cats", "dogs")  # still serving
        assert "Traceback" not in url.log.read_text()
    assert all_files(data) == [kept]


def test_flagged_images_train_and_leave_a_random_split_as_it_was(tmp_path):
    from imagelab.data import find_images, random_split
    for i in range(20):
        write_image(tmp_path / ("cats" if i % 2 else "dogs") / f"{i}.jpg", (200, 60, 60), seed=i)
    for i in range(5):
        write_image(tmp_path / "flagged" / "cats" / f"f{i}.jpg", (60, 200, 60), seed=i)
    own, everything = find_images(tmp_path)[0], find_images(tmp_path, flagged=True)[0]
    valid_before = [own[i] for i in random_split(tmp_path, 0.25, 42)(own)[1]]
    train, valid = random_split(tmp_path, 0.25, 42)(everything)
    assert [everything[i] for i in valid] == valid_before
    assert sum(everything[i].parts[-3] == "flagged" for i in train) == 5


def test_a_flag_that_contradicts_a_training_images_label_is_named(tmp_path, capsys):
    """A visitor flags a training photo of a cat as a dog: the picture would train under both labels. Said as a run
    reads its data, before it trains."""
    from imagelab.classifier import Classifier
    from imagelab.config import ClassifierConfig
    from imagelab.data import find_images

    def notes(flagged):
        cfg = ClassifierConfig(data=str(data), size=16, bs=2, pretrained=False, arch="resnet18", flagged=flagged,
                               cache=str(tmp_path / "cache"))
        Classifier().dataloaders(cfg, data, find_images(data, flagged=flagged)[0], None, 0)
        return [line for line in capsys.readouterr().out.splitlines() if "another label" in line]
    data = tmp_path / "data"
    make_folder_dataset(data / "train", n=8)
    make_folder_dataset(data / "valid", n=2, seed=100)
    flagged = data / "flagged" / "dogs" / "x.jpg"
    flagged.parent.mkdir(parents=True)
    shutil.copy(data / "train" / "cats" / "cats_3.jpg", flagged)
    shutil.copy(data / "train" / "dogs" / "dogs_5.jpg", flagged.with_name("y.jpg"))  # agrees: nothing to say
    assert notes(flagged=True) == [
        "note: 1 flagged file looks like a training image with another label, and both train (such as "
        "flagged/dogs/x.jpg, dogs, like train/cats/cats_3.jpg, cats): the cleaner's flagged list moves or removes it"]
    assert notes(flagged=False) == []
