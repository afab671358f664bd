"""The bears preset: training on a messy scraped-style folder, the bears app and the root app's new tabs."""
import json
import shutil
import urllib.request

import pytest
from gradio_client import handle_file
from PIL import Image

from checkouts import repo_app_without_models
from conftest import BEARS, Client, answers_as_the_model, script_main, served, write_image
from imagelab import run_cli

CLASSES = [label for label, _ in BEARS]


def test_trains_on_a_messy_folder_and_skips_bad_files(tiny_bears):
    model, data, res = tiny_bears
    report = model.with_name("bears.report")
    for name in ["confusion_matrix.png", "top_losses.png", "loss_curve.png", "metrics.json", "split.json"]:
        assert (report / name).stat().st_size > 0, name
    m = json.loads((report / "metrics.json").read_text())
    assert m["vocab"] == CLASSES and m["data"] == str(data)
    bad = sorted(f"{c}/{n}" for c in CLASSES for n in ("empty.jpg", "notes.jpg", "truncated.jpg"))
    assert sorted(m["skipped_files"]) == bad and m["counts"]["skipped"] == 9  # in the data folder, as split.json
    for f in bad:
        assert f"skipped {data / f}:" in res.stdout
    # 8 good images per class: the PNGs with alpha or a palette, WEBP and `?&` names all count; the
    # quarantine/, removed/ and summary beside the classes do not.
    assert sum(m["counts"]["train"].values()) + sum(m["counts"]["valid"].values()) == 24
    split = json.loads((report / "split.json").read_text())
    assert not set(split["train"]) & set(split["valid"])
    assert sorted(split["train"] + split["valid"]) == sorted(
        p.relative_to(data).as_posix() for c in CLASSES for p in (data / c).iterdir() if p.name not in
        ("empty.jpg", "notes.jpg", "truncated.jpg"))
    assert any("?width=3200&height=1680&fit=crop" in f for f in split["train"] + split["valid"])
    assert len(split["valid"]) == sum(m["counts"]["valid"].values())
    with Image.open(data / "teddy" / "00000001.png") as rgba, Image.open(data / "teddy" / "00000005.png") as pal:
        assert rgba.mode == "RGBA" and rgba.getpixel((0, 0))[3] == 0 and pal.mode == "P" and "transparency" in pal.info


def test_help_and_conflicting_options(capsys, tmp_path):
    main = script_main("train_bears")
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--download", "--download-only", "--classes", "--per-class", "--query", "--dest", "--timeout",
                 "--data", "--arch", "--no-pretrained", "--epochs", "--size", "--min-scale", "--out"]:
        assert flag in out, flag
    assert "models/bears.pkl" in out and "data/bears" in out
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["--data", str(tmp_path), "--download"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --data trains on a folder you have")
    # the training settings are checked before the search and the downloads, not after them
    for args, says in [(["--classes", "onlyone"], "a classifier needs at least two"),
                       (["--size", "0"], "--size must be between 8 and 2048"),
                       (["--download-workers", "0"], "--download-workers must be at least 1")]:
        with pytest.raises(SystemExit) as exit_:
            run_cli(main, ["--download", "--dest", str(tmp_path / "new"), *args])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "new").exists()


def test_bears_app_predicts_over_http(tiny_bears, tmp_path):
    model, _, _ = tiny_bears
    with served(["apps/bears/app.py", "--model", model]) as url:
        client = Client(url, verbose=False)
        for name, color in [("brown.jpg", (150, 100, 50)), ("teddy.webp", (230, 200, 120))]:
            img = write_image(tmp_path / name, color)
            out = client.predict(handle_file(str(img)), api_name="/predict")
            assert sorted(c["label"] for c in out["confidences"]) == CLASSES
            assert sum(c["confidence"] for c in out["confidences"]) == pytest.approx(1, abs=1e-4)
            answers_as_the_model(out, model, img)


def test_root_app_has_bears_and_cleaner_tabs(tiny_bears, tmp_path):
    model, data, _ = tiny_bears
    copy = shutil.copytree(data, tmp_path / "data")
    app, env = repo_app_without_models("app.py", tmp_path)  # pets never trained: the tab says how
    env.update({"BEARS_MODEL": str(model), "CLEANER_MODEL": str(model), "CLEANER_DATA": str(copy), "PETS_MODEL": None})
    with served([app], env=env) as url:
        client = Client(url, verbose=False)
        img = write_image(tmp_path / "x.png", (40, 40, 40))
        answers_as_the_model(client.predict(handle_file(str(img)), api_name="/bears_predict"), model, img)
        listed = client.predict("teddy", "all", 0, api_name="/cleaner_list")
        assert sorted(r["file"] for r in listed) == sorted(
            f"teddy/{p.name}" for p in (copy / "teddy").iterdir()
            if p.name not in ("empty.jpg", "notes.jpg", "truncated.jpg"))
        with urllib.request.urlopen(url + "config", timeout=10) as r:  # the missing pets model: instructions
            assert "training/train_pets.py" in json.dumps(json.load(r))

