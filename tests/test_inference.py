"""The predictor: same answers as fastai's learn.predict, weights-only loading, odd images, the batch CLI."""
import csv
import os
import shlex
import shutil
import stat
import subprocess

import numpy as np
import pytest

from conftest import PY, ROOT, fails_with_one_line, run, write_image
from imagelab import UserError
from imagelab.images import read_image
from uploads import invalid_uploads, valid_uploads


def test_predictor_matches_learn_predict(tiny_model, tmp_path):
    from fastai.learner import load_learner
    from imagelab.data import RGBImage
    from imagelab.inference import Predictor
    learn = load_learner(tiny_model, cpu=True)
    images = list(valid_uploads(tmp_path / "odd").values())
    images += [write_image(tmp_path / f"{i}.jpg", (30 * i, 200 - 20 * i, 90), size=(70 + 9 * i, 50)) for i in range(8)]
    for source in (tiny_model, tiny_model.with_suffix(".onnx")):
        predictor = Predictor(source)
        assert predictor.vocab == list(learn.dls.vocab)
        for f in images:
            with learn.no_bar():
                expected = learn.predict(RGBImage.create(read_image(f)))[2].numpy()
            got = predictor.probabilities([f])[0]
            assert got.argmax() == expected.argmax(), f
            assert np.abs(got - expected).max() < 1e-4, f


def test_weights_only_artifacts_load_without_pickle(tiny_model, tmp_path):
    """Only the safetensors + JSON config, in a process where unpickling anything raises."""
    for suffix in (".safetensors", ".config.json"):
        name = tiny_model.stem + suffix
        shutil.copy(tiny_model.with_name(name), tmp_path / name)
    img = write_image(tmp_path / "x.jpg", (220, 60, 60))
    code = ("import pickle, sys, torch\n"
            "def refuse(*a, **k): raise RuntimeError('unpickling was attempted')\n"
            "class Refuse(pickle.Unpickler):\n    load = refuse\n"
            "pickle.load = pickle.loads = torch.load = refuse\n"
            "pickle.Unpickler = Refuse\n"
            "from imagelab.inference import Predictor\n"
            "p = Predictor(sys.argv[1]); print(p.vocab, sorted(p.predict(sys.argv[2], k=2)))")
    res = run(["-c", code, tmp_path / f"{tiny_model.stem}.safetensors", img], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "['cats', 'dogs'] ['cats', 'dogs']"
    assert not (tmp_path / tiny_model.name).exists()


def test_a_model_form_whose_packages_are_not_installed_says_so(tiny_model, tmp_path):
    """A Space installs ONNX Runtime, not PyTorch: a .pkl or .safetensors alone there is not "a damaged copy"."""
    from imagelab.paths import artifact_paths
    code = ("import sys\nsys.modules['torch'] = None  # as if not installed\n"
            "from imagelab import run_cli\nfrom imagelab.loading import open_model\n"
            "run_cli(lambda argv: open_model(sys.argv[1], 'classifier'))")
    beside = artifact_paths(tiny_model)
    for name, files in (("weights", [beside["weights"], beside["config"]]), ("learner", [tiny_model])):
        (tmp_path / name).mkdir()
        for f in files:
            shutil.copy(f, tmp_path / name)
        res = run(["-c", code, tmp_path / name / files[0].name])
        fails_with_one_line(res, "it needs torch, which is not installed", "serve its .onnx")


def test_read_image_refuses_bad_files_quickly(tmp_path):
    for name, (path, message) in invalid_uploads(tmp_path).items():
        with pytest.raises(UserError, match=message):
            read_image(path)
    for name, path in valid_uploads(tmp_path / "ok").items():
        im = read_image(path)
        assert im.mode == "RGB", name
    assert read_image(tmp_path / "ok" / "exif_rotated.jpg").size == (48, 64)
    assert read_image(tmp_path / "ok" / "rgba.png").getpixel((0, 0)) == (255, 255, 255)
    assert read_image(tmp_path / "ok" / "animated.gif").getpixel((0, 0)) == (255, 0, 0)
    assert max(read_image(tmp_path / "ok" / "grey16.png").getextrema()[0]) > 200  # not clipped to white
    assert min(read_image(tmp_path / "ok" / "grey16.png").getextrema()[0]) < 50


def test_batch_cli_reports_bad_files_per_row(tiny_model, tmp_path):
    folder = tmp_path / "photos"
    write_image(folder / "a.jpg", (220, 60, 60))
    write_image(folder / "nested" / "b.png", (60, 60, 220))
    (folder / "broken.jpg").write_text("nope")
    out = tmp_path / "out.csv"
    res = run(["-m", "imagelab.predict", tiny_model, folder, "--top-k", "5", "--csv", out])
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.read_text().splitlines()[0] == "path,label1,prob1,label2,prob2,error"  # two classes: two columns
    rows = {r["path"].split("/photos/")[1]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"a.jpg", "nested/b.png", "broken.jpg"}
    assert rows["broken.jpg"]["error"].startswith("not a readable image") and not rows["broken.jpg"]["label1"]
    for name in ("a.jpg", "nested/b.png"):
        r = rows[name]
        assert {r["label1"], r["label2"]} == {"cats", "dogs"} and not r["error"]
        assert float(r["prob1"]) + float(r["prob2"]) == pytest.approx(1, abs=2e-4)
    assert "2 classified, 1 not (the error column says why)" in res.stderr
    res = run(["-m", "imagelab.predict", tiny_model, tmp_path / "missing"])
    assert res.returncode == 2 and "no such file or folder" in res.stderr and "Traceback" not in res.stderr


def test_batch_cli_names_any_file_and_refuses_bad_options_before_loading(tiny_model, tmp_path):
    """A name that is not UTF-8 (a disk may hold one) gets its row, as the bytes it is; a --csv that cannot be
    written, a --top-k below 1 and a folder without files stop with one line, leaving an earlier CSV as it was."""
    folder = tmp_path / "photos"
    odd = folder / os.fsdecode(b"caf\xe9.jpg")  # Latin-1 "café": not UTF-8
    write_image(odd, (220, 60, 60))
    out = tmp_path / "out.csv"
    for to_file in (True, False):
        res = run(["-m", "imagelab.predict", tiny_model, folder, *(["--csv", out] if to_file else [])],
                  env={**os.environ, "PYTHONIOENCODING": "utf-8"},  # strict (a C locale's stdout escapes)
                  errors="surrogateescape")
        assert res.returncode == 0 and res.stderr.splitlines()[-1] == "1 classified", res.stderr[-2000:]
    row = out.read_bytes().splitlines()[1]
    assert row.startswith(os.fsencode(odd) + b",") and row.split(b",")[1] in (b"cats", b"dogs")
    before = out.read_bytes()
    (tmp_path / "empty").mkdir()
    for args, message in ((["--csv", tmp_path], "that is a folder"), (["--csv", tmp_path / "no" / "x.csv"],
                                                                       "no such folder"),
                          (["--top-k", "0"], "must be at least 1"), (["--csv", out], "no files in")):
        fails_with_one_line(run(["-m", "imagelab.predict", tiny_model, tmp_path / "empty", *args]), message)
    assert out.read_bytes() == before and [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []
    out.write_text("old rows\n")
    (tmp_path / "link.csv").symlink_to(out)  # --csv names a link: the file it links to gets the rows
    assert run(["-m", "imagelab.predict", tiny_model, folder, "--csv", tmp_path / "link.csv"]).returncode == 0
    assert (tmp_path / "link.csv").is_symlink() and out.read_bytes() == before
    fifo = tmp_path / "fifo"  # not a file (as /dev/null, /dev/stdout): written as it is, never renamed over
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open first: the writer's open then does not wait
    try:
        assert run(["-m", "imagelab.predict", tiny_model, folder, "--csv", fifo]).returncode == 0
        assert os.read(reader, 1 << 16) == before and stat.S_ISFIFO(fifo.stat().st_mode)
    finally:
        os.close(reader)
    # a reader that stops reading (`| head`, here `| true`, gone before the first row): no error, status 0
    piped = subprocess.run(["bash", "-c", f"set -o pipefail; {shlex.quote(PY)} -m imagelab.predict "
                            f"{shlex.quote(str(tiny_model))} {shlex.quote(str(folder))} | true"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr[-2000:]


def test_batch_cli_refuses_an_empty_csv_or_path_before_loading(tmp_path):
    """`--csv ""` and a PATH of "" are Path("") (the current folder): refused at once, before the model loads (here
    there is none), not after classifying every file below the current folder."""
    image = write_image(tmp_path / "a.jpg", (220, 60, 60))
    (tmp_path / "rows.csv").mkdir()  # an existing folder as --csv: refused up front too
    for args, says in [([image, "--csv", ""], "error: --csv is empty: name the CSV file to write"),
                       ([image, "--csv", tmp_path / "rows.csv"], "that is a folder; name a file"),
                       ([""], "error: an empty PATH argument '': name an image file or folder (. for the current "
                              "folder)"),
                       (["", image, ""], "error: an empty PATH argument '' (PATH 1, 3 of 3)")]:
        res = run(["-m", "imagelab.predict", tmp_path / "no-model.pkl", *args], cwd=tmp_path)
        fails_with_one_line(res, says)


def test_the_batch_cli_and_the_cleaner_read_photos_as_big_as_training_does(tiny_model, tmp_path):
    """The apps refuse an upload over 40 megapixels; your own files are read as training reads them."""
    from PIL import Image
    from imagelab.cleaning import Cleaner
    big = tmp_path / "cats" / "big.png"
    big.parent.mkdir()
    Image.new("RGB", (7000, 6000), (220, 60, 60)).save(big)
    res = run(["-m", "imagelab.predict", tiny_model, big])
    assert res.returncode == 0 and res.stderr.splitlines()[-1] == "1 classified", res.stderr[-2000:]
    assert [r["file"] for r in Cleaner(tiny_model, tmp_path).rank("cats")] == ["cats/big.png"]


def test_exported_heatmap_of_a_map_without_evidence_is_zero_not_nan():
    """When the predicted class's Grad-CAM is zero everywhere (small inputs give a 1x1 map, where that is common),
    the graph's heatmap must be zeros, as torch's: the overlay cannot draw NaN."""
    import onnxruntime as ort
    import torch
    from fastai.vision.all import create_head
    from imagelab.export import to_onnx
    from imagelab.heatmaps import WithHeatmap
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=32), torch.nn.ReLU())
    torch.nn.init.zeros_(body[0].weight), torch.nn.init.constant_(body[0].bias, -1.0)  # every feature 0 after ReLU
    model = torch.nn.Sequential(body, create_head(8, 2)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert WithHeatmap(model)(x)[1].eq(0).all()
    graph = to_onnx(model, {"size": 32}, outputs=("logits", "heatmap"))
    heat = ort.InferenceSession(graph).run(["heatmap"], {"image": x.numpy()})[0]
    assert heat.shape == (1, 1, 1) and np.array_equal(heat, np.zeros_like(heat))


def test_exported_graphs_pool_without_adaptive_max_pool():
    """torch 2.11's ONNX exporter has no adaptive_max_pool2d: fastai's head exports as the plain maximum it is."""
    import torch
    from fastai.vision.all import create_head
    from imagelab.export import exportable
    head = create_head(8, 3).eval()
    x = torch.randn(4, 8, 5, 7)
    expected = head(x)
    assert torch.equal(exportable(head)(x), expected)
    assert not any(isinstance(m, torch.nn.AdaptiveMaxPool2d) for m in head.modules())


def test_a_tiff_whose_next_page_is_broken_decodes_as_it_was_checked(tmp_path):
    """Checking reads a file's first page; decoding for training must read no more, or a checked file fails later."""
    import torch
    from PIL import Image
    from imagelab.data import find_images
    from imagelab.images import check_image, open_rgb
    from imagelab.store import ImageStore
    from uploads import tiff_with_broken_next_page
    page = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8))
    (tmp_path / "cats").mkdir()
    tiff = tiff_with_broken_next_page(tmp_path / "cats" / "scan.tiff", page)
    write_image(tmp_path / "dogs" / "a.jpg", (60, 60, 220))
    assert check_image(tiff) is None
    assert np.array_equal(np.asarray(open_rgb(tiff)), np.asarray(page))
    files, skipped = find_images(tmp_path)
    assert tiff in files and skipped == []
    store = ImageStore(files, torch.device("cpu"))  # where training decoded every checked file
    assert torch.equal(store.image(files.index(tiff)), torch.from_numpy(np.asarray(page)).permute(2, 0, 1))


def whole_image_grey_to_8bit(im):
    """How open_rgb converted a 16-bit or 32-bit grey image before it went a strip at a time: the reference."""
    from PIL import Image
    a = np.nan_to_num(np.asarray(im, dtype=np.float64))
    top = a.max(initial=0)
    scale = 255 if im.mode == "F" and top <= 1 else 1 / 257 if im.mode.startswith("I;16") or top > 255 else 1
    return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8))


def test_wide_greys_convert_a_strip_at_a_time_as_the_whole_image_did(tmp_path):
    """16-bit and 32-bit greys give the pixels the whole-image conversion gave, in every mode and range, also where
    the brightest pixel is in a later strip than the first."""
    from PIL import Image
    from imagelab.images import STRIP, grey_to_8bit
    rng = np.random.default_rng(0)
    h, w = 3 * STRIP // 600 + 7, 600  # three strips and a few rows
    ramp = np.linspace(0, 1, h * w).reshape(h, w)
    arrays = {"16-bit": (ramp * 65535).astype(np.uint16), "16-bit big-endian": (ramp * 65535).astype(">u2"),
              "32-bit int in 8 bits": (ramp * 255).astype(np.int32),
              "32-bit int": (ramp * 70000 - 100).astype(np.int32), "float 0 to 1": ramp.astype(np.float32),
              "float 0 to 255": (ramp * 255).astype(np.float32), "float 16-bit": (ramp * 65535).astype(np.float32),
              "noise": rng.integers(0, 65536, (h, w)).astype(np.uint16)}
    odd = (ramp * 2).astype(np.float32)
    odd[0, :3], odd[-1, -2:] = [np.nan, np.inf, -np.inf], [np.nan, 0.5]
    arrays["float with nan and inf"] = odd
    modes = set()
    for name, a in arrays.items():
        images = [Image.fromarray(a)]
        if images[0].mode.startswith("I;16"):  # also as a PNG decodes it
            images[0].save(tmp_path / f"{name}.png")
            images.append(Image.open(tmp_path / f"{name}.png"))
        for im in images:
            modes.add(im.mode)
            assert np.array_equal(np.asarray(grey_to_8bit(im)), np.asarray(whole_image_grey_to_8bit(im))), name
    assert modes == {"I;16", "I;16B", "I", "F"}
    assert np.asarray(read_image(tmp_path / "16-bit.png")).max() == 255


def test_a_large_16_bit_grey_costs_the_memory_of_an_8_bit_one(tmp_path):
    """A 16-bit PNG of a few KB claims as many pixels as an 8-bit one: the float copies of the whole picture made each
    request cost hundreds of MB more (tracemalloc sees numpy's and Python's memory)."""
    import tracemalloc
    from PIL import Image
    from imagelab.images import open_rgb
    side = 3000  # 9 megapixels: a float64 copy of the whole picture is 72 MB
    wide = (np.add.outer(np.arange(side), np.arange(side)) * 7 % 65536).astype(np.uint16)
    peaks = {}
    for name, a in (("8-bit", (wide >> 8).astype(np.uint8)), ("16-bit", wide)):
        Image.fromarray(a).save(tmp_path / f"{name}.png")
        with Image.open(tmp_path / f"{name}.png") as im:
            im.load()
            tracemalloc.start()
            try:
                open_rgb(im)
                peaks[name] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    assert peaks["16-bit"] - peaks["8-bit"] < 16 * 2**20, peaks
