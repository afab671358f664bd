"""The autoencoder end to end: training, the PCA comparison, export, reloading elsewhere, the apps."""
import json
import os
import re
import shutil
import subprocess
import time

import gradio as gr
import numpy as np
import pytest
import torch
from fastai.learner import load_learner
from fastai.vision.all import RandomSplitter, set_seed
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from checkouts import repo_app_without_models
from uploads import invalid_uploads, valid_uploads
from conftest import AE_TINY, Client, PY, make_folder_dataset, run, same_picture, served, write_image
from imagelab import UserError
from imagelab.autoencoder import CodeSparsity, ConvAutoencoder, autoencoder_dls, autoencoder_learner, preprocessed
from imagelab.data import find_images
from imagelab.inference import psnr
from imagelab.loading import open_model
from imagelab.ui import autoencoder_panel

@pytest.fixture(scope="module")
def ae_model(tiny_autoencoder):
    return tiny_autoencoder


def tiny_learner(files, sparse=False):
    set_seed(0, reproducible=True)
    dls = autoencoder_dls(files, splitter=RandomSplitter(0.2, seed=42), size=16, bs=4, workers=0)
    return autoencoder_learner(dls, ConvAutoencoder(16, 8, depth=2, width=8, sparse=sparse))


def numpy_pca(train, valid, k):
    """PCA's reconstruction of `valid` from the top `k` axes of `train` (N x 3 x H x W) and its mirror images (the
    model trains on both), by numpy's SVD, clamped."""
    train, valid = torch.cat([train, train.flip(-1)]).flatten(1).double().numpy(), valid.flatten(1).double().numpy()
    mean = train.mean(0)
    axes = np.linalg.svd(train - mean, full_matrices=False)[2][:k]
    return np.clip((valid - mean) @ axes.T @ axes + mean, 0, 1), valid


def test_too_few_images_say_how_many_are_needed_not_to_raise_valid_pct(tmp_path):
    """One image (or one picture in several files) cannot both train and be held out: no --valid-pct helps."""
    from imagelab.data import dataset_split
    one = write_image(tmp_path / "one" / "1.jpg", (220, 60, 60))
    with pytest.raises(UserError, match=r"^only 1 image: the autoencoder needs at least 2, one to train on and one "
                                        r"to hold out; add images$"):
        autoencoder_dls([one], splitter=RandomSplitter(0.2, seed=42), size=16, bs=4, workers=0)
    copies = tmp_path / "copies"
    copies.mkdir()
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        shutil.copy(one, copies / name)
    files = find_images(copies)[0]
    splitter, _ = dataset_split(copies, files, valid_pct=0.5, seed=42, cache=tmp_path / "cache")
    with pytest.raises(UserError, match=r"^only 1 distinct picture among 3 images \(the others are copies of it, "
                                        r"resized or recompressed\): a model needs at least 2"):
        autoencoder_dls(files, splitter=splitter, size=16, bs=4, workers=0)


def test_at_init_the_model_is_pca_through_a_code_of_code_size_numbers(tmp_path):
    files, _ = find_images(make_folder_dataset(tmp_path, n=8))
    learn = tiny_learner(files)
    model, dls = learn.model.eval(), learn.dls
    train, valid = (preprocessed(dls, ds.items) for ds in (dls.train_ds, dls.valid_ds))
    pca, flat = numpy_pca(train, valid, 8)
    with torch.no_grad():
        out, code = model(valid), model.encode(valid)
        assert code.shape == (len(valid), 8)  # the bottleneck: 8 numbers an image, and decode sees only them
        assert torch.equal(model.decode(code), out)
    assert np.abs(out.flatten(1).double().numpy() - pca).max() < 1e-5
    assert learn.metrics[1].pca_mse == pytest.approx(((pca - flat) ** 2).mean(), rel=1e-4)


def test_sparsity_gives_exact_zeros_in_the_code(tmp_path):
    files, _ = find_images(make_folder_dataset(tmp_path, n=16))

    def codes(lam):
        learn = tiny_learner(files, sparse=True)
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(16, 1e-2, cbs=[CodeSparsity(lam)])
        x = preprocessed(learn.dls, learn.dls.valid_ds.items)
        with torch.no_grad():
            return learn.model.eval().encode(x)
    plain, sparse = codes(0.0), codes(1.0)
    assert (sparse == 0).sum() > (plain == 0).sum() + sparse.numel() / 4  # a margin no one number decides
    assert sparse.abs().mean() < plain.abs().mean()


def test_a_sparse_models_loss_is_its_objective_and_its_threshold_is_not_decayed(tmp_path):
    files, _ = find_images(make_folder_dataset(tmp_path, n=8))
    learn, lam = tiny_learner(files, sparse=True), 0.5
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2, wd=0.1, cbs=[CodeSparsity(lam)])
    assert learn.opt.state[learn.model.shrink.threshold]["do_wd"] is False
    x = preprocessed(learn.dls, learn.dls.valid_ds.items)
    with torch.no_grad():
        penalty = lam * float(learn.model.eval().encode(x).abs().mean())
    assert penalty > 0
    # validate() runs a fit's callbacks too: the held-out loss that picks epochs is what training minimises
    assert learn.validate(cbs=[CodeSparsity(lam)])[0] == pytest.approx(learn.validate()[0] + penalty, rel=1e-4)


def test_a_sparse_run_under_keep_best_exports_its_sparsest_best_epoch_not_pca(tmp_path):
    data, out = make_folder_dataset(tmp_path / "data", n=16), tmp_path / "sparse.pkl"
    res = run(["training/train_autoencoder.py", "--data", data, "--epochs", "8", "--lr", "1e-2", *AE_TINY,
               "--sparsity", "1", "--out", out])
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "sparse.report" / "metrics.json").read_text())
    losses = m["valid_loss_per_epoch"]
    assert m["kept"] == "best" and m["kept_epoch"] == 1 + losses.index(min(losses))  # by reconstruction: PCA's
    assert m["code_zero_fraction"] > 0
    assert f"{m['code_zero_fraction']:.0%} of the code's numbers are 0" in res.stdout


def test_report_and_pca_on_the_same_images(ae_model):
    report = ae_model.with_name("ae.report")
    for name in ["reconstructions.png", "loss_curve.png", "ratio_curve.png", "metrics.json"]:
        assert (report / name).stat().st_size > 0, name
    for png in report.glob("*.png"):
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert sorted(p.name for p in (report / "examples").iterdir())
    m = json.loads((report / "metrics.json").read_text())
    assert (m["code_size"], m["depth"], m["width"], m["size"], m["epochs"], m["loss"]) == (8, 2, 8, 16, 2, "mse")
    assert m["blocks"] == 1 and m["presize"] is True
    assert m["counts"] == {"train": 20, "valid": 4, "skipped": 1} and m["skipped_files"][0].endswith("/broken.jpg")
    assert m["pca_components"] == 8 and m["train_seconds"] > 0
    assert m["ae_psnr"] == pytest.approx(psnr(m["ae_mse"])) and m["pca_psnr"] == pytest.approx(psnr(m["pca_mse"]))
    assert m["mse_ratio_ae_to_pca"] == pytest.approx(m["ae_mse"] / m["pca_mse"])
    assert m["beats_pca"] == (m["ae_mse"] < m["pca_mse"])
    assert [e for e, _ in m["mse_ratio_per_epoch"]] == [1, 2] and all(r > 0 for _, r in m["mse_ratio_per_epoch"])

    # Rebuild the same split independently and score both methods again: the exported model and its own PCA path,
    # which was fitted on the presized copies; numpy's SVD fitted on the original files comes within a few percent.
    files, _ = find_images(m["data"])
    dls = autoencoder_dls(files, splitter=RandomSplitter(0.2, seed=42), size=16, bs=8, workers=0)
    refit, valid = numpy_pca(*(preprocessed(dls, ds.items) for ds in (dls.train_ds, dls.valid_ds)), 8)
    model = load_learner(ae_model, cpu=True).model.eval()
    with torch.no_grad():
        x = torch.from_numpy(valid).float().view(-1, 3, 16, 16)
        out, pca = (y.flatten(1).double().numpy() for y in (model(x), model.pca(x)))
    assert ((out - valid) ** 2).mean() == pytest.approx(m["ae_mse"], rel=1e-3)
    assert ((pca - valid) ** 2).mean() == pytest.approx(m["pca_mse"], rel=1e-3)
    assert ((refit - valid) ** 2).mean() == pytest.approx(m["pca_mse"], rel=0.1)


def test_model_loads_in_a_fresh_process_elsewhere(ae_model, tmp_path):
    img = write_image(tmp_path / "red.png", (220, 60, 60), size=(60, 30))
    code = ("import sys; from imagelab.loading import open_model\n"
            "ae = open_model(sys.argv[1], 'autoencoder')\n"
            "original, rebuilt, db, pca, pca_db = ae.reconstruct(sys.argv[2])\n"
            "print(ae.code_size, original.size, rebuilt.size, db > 0,"
            " ae.interpolate(sys.argv[2], sys.argv[2], 5).size, pca.size, pca_db > 0, 'torch' in sys.modules)")
    res = subprocess.run([PY, "-c", code, str(ae_model), str(img)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "8 (16, 16) (16, 16) True (80, 16) (16, 16) True False"  # served without torch


def test_weights_of_the_format_before_the_pca_path_are_refused_in_one_line(ae_model, tmp_path):
    for suffix in (".safetensors", ".config.json"):
        shutil.copy(ae_model.with_suffix(suffix), tmp_path / f"old{suffix}")
    config = json.loads((tmp_path / "old.config.json").read_text())
    assert config["format"] == "imagelab-autoencoder/2"
    (tmp_path / "old.config.json").write_text(json.dumps({**config, "format": "imagelab-autoencoder/1"}))
    with pytest.raises(UserError, match="format imagelab-autoencoder/1, not imagelab-autoencoder/2: retrain"):
        open_model(tmp_path / "old.safetensors", "autoencoder")


def test_serving_benchmark_runs_torch_and_onnxruntime_alike(ae_model):
    res = run(["benchmarks/autoencoder_serving.py", "--model", ae_model, "--images", ae_model.parents[1] / "data",
               "--limit", "4", "--starts", "1"], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["images"] == 4 and out["max_grey_levels_apart"] <= 1 and out["max_psnr_db_apart"] < 1e-3
    assert all(out[k] > 0 for k in ("torch_reconstruct_ms", "onnxruntime_reconstruct_ms", "torch_start_s",
                                    "onnxruntime_start_s", "reconstruct_speedup", "interpolate_speedup"))


def test_app_reconstructs_over_http(ae_model, tmp_path):
    photo, other = write_image(tmp_path / "a.jpg", (220, 60, 60)), write_image(tmp_path / "b.png", (60, 60, 220))
    with served(["apps/autoencoder/app.py", "--model", ae_model]) as url:
        client = Client(url, verbose=False)
        ae = open_model(ae_model, "autoencoder")  # what the app's model makes of them
        shown = client.predict(handle_file(str(photo)), api_name="/reconstruct")
        with Image.open(shown) as im:
            assert (im.format, im.size, im.mode) == ("PNG", (16, 16), "RGB")
        same_picture(shown, ae.reconstruct(photo).reconstruction)
        strip = client.predict(handle_file(str(photo)), handle_file(str(other)), 4, api_name="/interpolate")
        same_picture(strip, ae.interpolate(photo, other, 4))  # 64 x 16: four decodings side by side
        for name, path in valid_uploads(tmp_path / "valid").items():  # 1x1, 4000x3, CMYK, 16-bit, EXIF-rotated, ...
            same_picture(client.predict(handle_file(str(path)), api_name="/reconstruct"),
                         ae.reconstruct(path).reconstruction)
        for name, (path, message) in invalid_uploads(tmp_path / "invalid").items():
            start = time.monotonic()
            with pytest.raises(AppError, match=message):
                client.predict(handle_file(str(path)), api_name="/reconstruct")
            with pytest.raises(AppError, match=f"^the second image: .*{message}"):  # which of the two
                client.predict(handle_file(str(photo)), handle_file(str(path)), 4, api_name="/interpolate")
            assert time.monotonic() - start < 15, name
        assert client.predict(handle_file(str(other)), api_name="/reconstruct")  # still serving


def test_bad_steps_are_one_line_and_no_traceback_in_the_servers_log(ae_model, tmp_path):
    """An API or MCP caller may send any steps: each bad one is told in one line, and the log stays quiet."""
    a, b = (handle_file(str(write_image(tmp_path / f"{i}.jpg", (60 * i, 60, 220)))) for i in range(2))
    with served(["apps/autoencoder/app.py", "--model", ae_model]) as url:
        client = Client(url, verbose=False)
        for steps, shown in ((None, "None"), ("abc", "'abc'"), (2, "2"), (13, "13"),
                             (True, "True"), ("x" * 500, "'" + "x" * 39 + "...")):
            with pytest.raises(AppError, match=rf"^steps must be a number from 3 to 12, not {re.escape(shown)}$"):
                client.predict(a, b, steps, api_name="/interpolate")
        with Image.open(client.predict(a, b, 4.4, api_name="/interpolate")) as im:
            assert im.size == (64, 16)  # 4 pictures
        assert "Traceback" not in url.log.read_text()


def test_root_app_has_an_autoencoder_tab(ae_model, tmp_path):
    app, env = repo_app_without_models("app.py", tmp_path)  # the pets and bears tabs were never trained
    with served([app], env={**env, "AUTOENCODER_MODEL": str(ae_model)}) as url:
        image = write_image(tmp_path / "x.jpg", (60, 60, 220))
        same_picture(Client(url, verbose=False).predict(handle_file(str(image)), api_name="/autoencoder_reconstruct"),
                     open_model(ae_model, "autoencoder").reconstruct(image).reconstruction)
    with gr.Blocks() as demo:  # the tab without a model explains how to train one
        autoencoder_panel(tmp_path / "missing.pkl", train_command="python training/train_autoencoder.py")
    assert "No model at" in json.dumps(demo.config) and "training/train_autoencoder.py" in json.dumps(demo.config)


def test_bad_arguments_and_offline_default_are_one_line_errors(tmp_path):
    res = run(["training/train_autoencoder.py", "--data", tmp_path, "--size", "30", "--depth", "2"])
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "divisible by" in res.stderr
    env = {**os.environ, "FASTAI_HOME": str(tmp_path / "fastai")}  # a cold dataset cache
    res = run(["training/train_autoencoder.py", "--out", tmp_path / "m.pkl"], env=env, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "could not download Oxford-IIIT Pet" in res.stderr and "--data" in res.stderr
    assert not (tmp_path / "m.pkl").exists()


def test_help_lists_the_knobs():
    res = run(["training/train_autoencoder.py", "--help"])
    assert res.returncode == 0
    for flag in ["--data", "--code-size", "--depth", "--width", "--blocks", "--loss", "--sparsity", "--size", "--epochs",
                 "--bs", "--lr", "--wd", "--presize", "--seed", "--out"]:
        assert flag in res.stdout, flag


def test_train_and_valid_folders_keep_their_split_and_a_task_trained_twice_reports_each_run_alone(tmp_path):
    """As the classifier does, the autoencoder is measured on the held-out images the user put in valid/; and one
    `AutoencoderTask` trained twice (the library's API) reports each run's epochs, not both runs'."""
    from imagelab.autoencoder import AutoencoderTask
    from imagelab.config import AutoencoderConfig
    from imagelab.train import train

    for part, n, seed in (("train", 8, 0), ("valid", 4, 100)):
        make_folder_dataset(tmp_path / "data" / part, n=n, classes=(("photos", (60, 60, 220)),), seed=seed)
    task = AutoencoderTask()
    for run_ in (1, 2):
        cfg = AutoencoderConfig(data=str(tmp_path / "data"), out=str(tmp_path / f"m{run_}.pkl"), size=16, depth=2,
                                width=8, code_size=8, bs=4, workers=0, epochs=2)
        m = train(task, cfg)
    split = json.loads((tmp_path / "m2.report" / "split.json").read_text())
    assert sorted(split["valid"]) == [f"valid/photos/photos_{i}.jpg" for i in range(4)]
    assert m["split"] == "train/ and valid/ folders" and m["counts"] == {"train": 8, "valid": 4, "skipped": 0}
    assert [epoch for epoch, _ in m["mse_ratio_per_epoch"]] == [1, 2]


def test_models_trained_wider_than_a_new_run_may_be_still_load():
    """--width is capped for new runs only: the weights of a model trained wider before the cap rebuild it."""
    model = ConvAutoencoder(size=16, code_size=8, depth=1, width=1024)
    assert model.encoder[0][0].out_channels == 512
