"""What a user meets first: a model checked once at start, every offered form served, instant --help, clear reasons."""
import csv
import json
import os
import shutil
import socket
import subprocess

import numpy as np
import pytest
from gradio_client import handle_file

from checkouts import hub_cache, repo_app_without_models, with_env
from conftest import (Client, ROOT, answers_as_the_model, fails_with_one_line, free_port, in_fresh_process, run, served,
                      write_image)
from imagelab.loading import SERVED_FROM, open_model

APPS = ["app.py", "apps/pets/app.py", "apps/bears/app.py", "apps/autoencoder/app.py", "apps/cleaner/app.py"]
BENCHMARKS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").glob("*.py"))


def only(files, folder):
    """Copies of `files` alone in `folder`: a model form without its siblings."""
    folder.mkdir(parents=True, exist_ok=True)
    return [shutil.copy(f, folder / f.name) for f in files]


def artifacts(model, *suffixes):
    return [model.with_name(model.stem + s) for s in suffixes]


@pytest.fixture(scope="module")
def ae_weights(tiny_autoencoder):
    """The tiny autoencoder's weights-only export (beside its config), as training wrote it."""
    config, weights = artifacts(tiny_autoencoder, ".config.json", ".safetensors")
    assert config.is_file() and weights.is_file()
    return weights


# --- --help ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("app", APPS + ["-m imagelab.predict"])
def test_help_answers_at_once_and_loads_no_model(app):
    code = ("import runpy, sys, time\nstart = time.monotonic()\napp = sys.argv[1]\nsys.argv = [app, '--help']\n"
            "try:\n    runpy.run_module(app[3:], run_name='__main__') if app.startswith('-m ') "
            "else runpy.run_path(app, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(round(time.monotonic() - start, 2), sorted({'gradio', 'torch', 'fastai', 'onnxruntime'} & set(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MODEL_PATH": "models/never-loaded.pkl",
           "PETS_MODEL": "never-loaded.pkl", "CLEANER_DATA": "."}
    seconds, loaded = in_fresh_process(code, app, cwd=ROOT, env=env).split(" ", 1)
    assert loaded == "[]" and float(seconds) < 10, (app, seconds, loaded)


def test_the_shell_scripts_answer_help_and_start_nothing():
    """quickstart.sh passes its arguments to train_pets.py: with --help it says what it does, shows that help and
    serves nothing."""
    made = sorted((ROOT / "build").glob("*")) if (ROOT / "build").exists() else []
    for script, says in [("quickstart.sh", "then serve it on http://127.0.0.1:7860"), ("quickstart.sh", "--time-budget"),
                         ("benchmarks/gpu_check.sh", "Every GPU check in one call"),
                         ("benchmarks/gpu_stack_check.sh", "with the GPU machine's software")]:
        res = subprocess.run(["bash", script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and says in res.stdout, (script, res.stdout[-2000:], res.stderr[-2000:])
        assert "Running on" not in res.stdout + res.stderr
    assert (sorted((ROOT / "build").glob("*")) if (ROOT / "build").exists() else []) == made  # no check was started


@pytest.mark.parametrize("script", BENCHMARKS)
def test_every_benchmark_answers_help_and_refuses_a_bad_option_before_torch_loads(script):
    """As `python benchmarks/X.py` runs: the script's own folder first on sys.path (its siblings import each other)."""
    code = ("import os, runpy, sys, time\nstart = time.monotonic()\nscript, option = sys.argv[1:]\n"
            "sys.argv, sys.path[0] = [script, option], os.path.dirname(os.path.abspath(script))\n"
            "try:\n    runpy.run_path(script, run_name='__main__')\nexcept SystemExit as e:\n    status = e.code\n"
            "print(status, round(time.monotonic() - start, 2), "
            "sorted({'gradio', 'torch', 'fastai', 'onnxruntime'} & set(sys.modules)))")
    for option, status in [("--help", "0"), ("--no-such-option", "2")]:
        line = in_fresh_process(code, script, option, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        said, seconds, loaded = line.split(" ", 2)
        assert said == status and loaded == "[]" and float(seconds) < 10, (script, option, line)


def test_the_load_benchmark_says_in_one_line_that_nothing_answers_at_its_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    image = write_image(tmp_path / "load.jpg", (60, 60, 220))
    res = run(["benchmarks/load.py", "--url", url, "--image", image, "--clients", "2", "--requests", "1"], timeout=60)
    fails_with_one_line(res, url, "no Gradio app answers there")


def test_an_empty_variable_of_the_apps_is_unset_not_the_working_folder():
    env = {**os.environ, "MODEL_PATH": "", "GRADIO_SERVER_PORT": "", "GRADIO_SERVER_NAME": "", "CLEANER_DATA": ""}
    res = run(["apps/pets/app.py", "--help"], env=env)
    shown = " ".join(res.stdout.split())  # argparse wraps the help
    assert res.returncode == 0 and f"(default: {ROOT / 'models' / 'pets.pkl'})" in shown, res.stderr[-2000:]
    assert "GRADIO_SERVER_PORT (default: 7860)" in shown and "GRADIO_SERVER_NAME (default: 127.0.0.1)" in shown
    fails_with_one_line(run(["apps/cleaner/app.py"], env=env), "the following arguments are required: --data")


def test_the_quick_start_finds_its_port_taken_or_no_port_before_it_sets_up_or_trains(tmp_path):
    copy = tmp_path / "checkout"  # a checkout without .venv: the check comes before the set-up
    shutil.copytree(ROOT / "imagelab", copy / "imagelab", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "training").mkdir()
    shutil.copy(ROOT / "training" / "train_pets.py", copy / "training")
    shutil.copy(ROOT / "quickstart.sh", copy)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRADIO_SERVER_NAME")}

    def quickstart(port):
        return subprocess.run(["bash", "quickstart.sh", "--data", "photos"], cwd=copy, capture_output=True, text=True,
                              timeout=60, env={**env, "GRADIO_SERVER_PORT": port})
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        res = quickstart(str(port))
    fails_with_one_line(res, f"error: cannot listen on 127.0.0.1:{port}: the port is in use (choose another with "
                             f"GRADIO_SERVER_PORT={port + 1} bash quickstart.sh ...)")
    for port in ("0", "65536", "-1", "abc", "1e3"):  # 0 would listen on any free port, not the one announced
        fails_with_one_line(quickstart(port), f"error: GRADIO_SERVER_PORT: not a port number (1 to 65535): {port!r}")

    # the options too, with paths read from where it is run (which need not be the checkout)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "photos").mkdir(parents=True)
    with socket.create_server(("127.0.0.1", 0)) as free:
        port = str(free.getsockname()[1])  # closed again: free for the check

    def options(*args):
        return subprocess.run(["bash", copy / "quickstart.sh", *args], cwd=elsewhere, capture_output=True, text=True,
                              timeout=60, env={**env, "GRADIO_SERVER_PORT": port})
    fails_with_one_line(options("--data", "photos", "--out", "photos/m.pkl"), "error: --out photos/m.pkl is inside "
                                                                               "--data photos")
    fails_with_one_line(options("--data", "typo"), "error: no such folder: typo")
    fails_with_one_line(options("--epochs", "0"), "error: --epochs must be at least 1, not 0")
    assert sorted(p.name for p in copy.iterdir()) == ["imagelab", "quickstart.sh", "training"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["photos"] and not any((elsewhere / "photos").iterdir())


# --- one check at start ------------------------------------------------------------------------------------

def test_a_standalone_app_without_its_default_model_says_how_to_train_it(tmp_path):
    for app, train in [("apps/pets/app.py", "training/train_pets.py"), ("apps/bears/app.py", "training/train_bears.py"),
                       ("apps/autoencoder/app.py", "training/train_autoencoder.py")]:
        path, env = repo_app_without_models(app, tmp_path / app.split("/")[1])
        res = run([path, "--port", "1"], timeout=120, env=with_env(env))
        fails_with_one_line(res, "no model at", "models/", train)


def test_models_that_cannot_be_served_stop_every_entry_point_with_one_line(tiny_model, tiny_autoencoder, tmp_path):
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(b"this is not a pickle")
    typo = tmp_path / "pest.pkl"
    data = tmp_path / "data"
    data.mkdir()
    damaged = tmp_path / "damaged" / "pets.safetensors"  # its weights are whole, the graph served with them is not
    shutil.copytree(tiny_model.parent, damaged.parent)
    damaged.with_suffix(".onnx").write_bytes(tiny_model.with_suffix(".onnx").read_bytes()[:1000])
    newer = tmp_path / "newer" / "pets.onnx"  # a config a later version wrote: its fields may mean something else
    shutil.copytree(tiny_model.parent, newer.parent)
    config = json.loads(newer.with_suffix(".config.json").read_text())
    newer.with_suffix(".config.json").write_text(json.dumps({**config, "format": "imagelab-classifier/2"}))
    cases = [
        (["-m", "imagelab.predict", newer, data], ["of format imagelab-classifier/2, not imagelab-classifier/1"]),
        (["-m", "imagelab.predict", damaged, data], ["cannot load the ONNX graph", str(damaged.with_suffix(".onnx"))]),
        (["apps/pets/app.py", "--model", typo], ["no model at", str(typo)]),
        (["apps/bears/app.py", "--model", corrupt], ["cannot load the model", str(corrupt)]),
        (["apps/pets/app.py", "--model", tiny_autoencoder], ["is an autoencoder model, not a classifier"]),
        (["apps/autoencoder/app.py", "--model", tiny_model], ["is a classifier model, not an autoencoder"]),
        (["apps/autoencoder/app.py", "--model", tiny_model.with_suffix(".onnx")], ["is a classifier model, not an"]),
        (["apps/autoencoder/app.py", "--model", tiny_autoencoder.with_name("ae.config.json")],
         ["an autoencoder is served from"]),
        (["apps/cleaner/app.py", "--model", tiny_autoencoder, "--data", data], ["not a classifier"]),
        (["apps/cleaner/app.py", "--model", tiny_model, "--data", tmp_path / "nodata"], ["no such folder"]),
        (["-m", "imagelab.predict", tiny_autoencoder, data], ["is an autoencoder model, not a classifier"]),
        (["-m", "imagelab.predict", typo, data], ["no model at", str(typo)]),
    ]
    for args, fragments in cases:
        fails_with_one_line(run(args, timeout=120), *fragments)


@pytest.mark.parametrize("given, fragments", [
    ({"PETS_MODEL": "{tmp}/pest.pkl"}, ["PETS_MODEL: no model at", "pest.pkl"]),
    ({"BEARS_MODEL": "{autoencoder}"}, ["BEARS_MODEL: ", "is an autoencoder model, not a classifier"]),
    ({"AUTOENCODER_MODEL": "{classifier}"}, ["AUTOENCODER_MODEL: ", "is a classifier model, not an autoencoder"]),
    ({"CLEANER_MODEL": "{classifier}"}, ["needs both CLEANER_MODEL and CLEANER_DATA"]),
    ({"CLEANER_MODEL": "{classifier}", "CLEANER_DATA": "{tmp}/bears"}, ["CLEANER_MODEL, CLEANER_DATA: no such folder"]),
])
def test_root_app_stops_on_a_model_it_was_given_but_cannot_serve(tiny_model, tiny_autoencoder, tmp_path,
                                                                  given, fragments):
    """In one line that names the environment variable it came from."""
    given = {k: v.format(tmp=tmp_path, autoencoder=tiny_autoencoder, classifier=tiny_model) for k, v in given.items()}
    app, env = repo_app_without_models("app.py", tmp_path)  # no default model: only the one given can stop it
    res = run([app, "--port", "1"], timeout=120, env=with_env({**env, **given}))
    fails_with_one_line(res, *fragments)


# --- every offered form works ------------------------------------------------------------------------------

def test_the_help_offers_exactly_the_forms_tested_here():
    assert SERVED_FROM == {kind: (".pkl", ".onnx", ".safetensors") for kind in ("classifier", "autoencoder")}
    for app, kind in [("apps/pets/app.py", "classifier"), ("apps/cleaner/app.py", "classifier"),
                      ("apps/autoencoder/app.py", "autoencoder"), ("-m imagelab.predict", "classifier")]:
        out = " ".join(run([*app.split(), "--help"], timeout=60).stdout.split())
        assert ", ".join(SERVED_FROM[kind]) + " or hf://USER/REPO/FILE[@REVISION]" in out.replace("- ", "-"), app


@pytest.mark.parametrize("suffix", SERVED_FROM["classifier"])
def test_classifier_forms_predict_and_clean_alike(tiny_bears, tmp_path, suffix):
    from imagelab.cleaning import Cleaner
    model, data, _ = tiny_bears
    files = [model] if suffix == ".pkl" else artifacts(model, suffix, ".config.json")
    alone = only(files, tmp_path / "alone")[0]  # a .pkl alone is unpickled; the others run without it
    reference, got = open_model(model, "classifier"), open_model(alone, "classifier")
    image = write_image(tmp_path / "x.jpg", (150, 100, 50))
    assert got.vocab == reference.vocab
    np.testing.assert_allclose(got.probabilities([image]), reference.probabilities([image]), atol=1e-4)
    ranked, expected = Cleaner(alone, data).rank("grizzly"), Cleaner(model, data).rank("grizzly")
    assert [r["file"] for r in ranked] == [r["file"] for r in expected]


@pytest.mark.parametrize("form", ["pkl", "onnx", "safetensors"])
def test_autoencoder_forms_run_the_torch_models_function(tiny_autoencoder, tmp_path, form):
    """Each form alone (a .pkl without its graphs exports them in memory) runs ONNX Runtime, and gives what the
    trained torch model gives: the reconstruction, PCA's, the code, their PSNRs, the walk between two codes."""
    import torch
    from imagelab.autoencoder import load_autoencoder
    from imagelab.inference import psnr, square_input
    suffixes = {"pkl": [".pkl"], "onnx": [".onnx", ".decoder.onnx", ".config.json"],
                "safetensors": [".safetensors", ".config.json"]}[form]
    got = open_model(only(artifacts(tiny_autoencoder, *suffixes), tmp_path / "alone")[0], "autoencoder")
    model = load_autoencoder(tiny_autoencoder)
    images = [write_image(tmp_path / f"{i}.jpg", (200, 90, 40 * i), size=size, seed=i)
              for i, size in enumerate([(50, 37), (16, 16), (37, 300)])]
    for image in images:
        x = square_input(image, model.size)
        with torch.no_grad():
            code = model.encode(torch.from_numpy(x))
            want = {"reconstruction": model.decode(code), "pca": model.pca(torch.from_numpy(x)), "code": code}
        out = got.run(x)
        for name, value in want.items():
            np.testing.assert_allclose(out[name], value.numpy(), atol=1e-5, err_msg=name)
        r = got.reconstruct(image)
        for output, db in (("reconstruction", r.psnr), ("pca", r.pca_psnr)):
            assert db == pytest.approx(psnr(float(((want[output].numpy() - x) ** 2).mean())), abs=1e-4)
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(np.concatenate([square_input(im, model.size) for im in images[:2]])))
        t = torch.linspace(0, 1, 5)[:, None]
        frames = model.decode((1 - t) * codes[0] + t * codes[1])
    strip = np.round(torch.cat(list(frames), dim=2).permute(1, 2, 0).numpy() * 255)
    assert np.abs(np.asarray(got.interpolate(*images[:2], steps=5)).astype(int) - strip).max() <= 1


def test_an_autoencoder_exported_before_its_decoder_serves_from_its_weights_or_says_retrain(tiny_autoencoder, tmp_path):
    """Its graph of an image returned the reconstruction alone, and no graph of a code was beside it."""
    from imagelab.autoencoder import autoencoder_config, load_autoencoder
    from imagelab.export import to_onnx
    old = only(artifacts(tiny_autoencoder, ".pkl", ".safetensors", ".config.json"), tmp_path / "old")
    model = load_autoencoder(tiny_autoencoder)
    to_onnx(model, autoencoder_config(model), tmp_path / "old" / "ae.onnx", outputs=["reconstruction"])
    image = write_image(tmp_path / "x.jpg", (200, 90, 40), size=(40, 30))
    reference = open_model(tiny_autoencoder, "autoencoder").reconstruct(image).psnr
    for form in (".pkl", ".onnx"):  # the graphs are made again from the weights beside
        ae = open_model(tmp_path / "old" / f"ae{form}", "autoencoder")
        assert ae.reconstruct(image).psnr == pytest.approx(reference)
    for f in old[:2]:  # the learner and the weights: the old graph and its config are all there is
        f.unlink()
    res = run(["apps/autoencoder/app.py", "--model", tmp_path / "old" / "ae.onnx", "--port", "1"], timeout=120)
    fails_with_one_line(res, "exported by an older version", "retrain it with training/train_autoencoder.py")


def test_autoencoder_prepares_images_exactly_as_its_learner(tiny_autoencoder, tmp_path):
    from imagelab.autoencoder import preprocessed
    from imagelab.data import RGBImage
    from imagelab.images import read_image
    from imagelab.inference import square_input
    from imagelab.loading import load_trusted_learner
    learn = load_trusted_learner(tiny_autoencoder)
    for i, size in enumerate([(48, 40), (40, 48), (17, 91), (300, 200), (16, 16)]):
        f = write_image(tmp_path / f"{i}.png", (30 * i, 90, 200), size=size, seed=i)
        expected = preprocessed(learn.dls, [RGBImage.create(read_image(f))]).numpy()
        got = square_input(f, learn.model.size)
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-6, size


def test_pets_app_serves_a_hub_model_offline(tiny_model, tmp_path):
    env = hub_cache(tmp_path / "hf", "someone/pets", artifacts(tiny_model, ".pkl", ".onnx", ".config.json"))
    with served(["apps/pets/app.py", "--model", "hf://someone/pets/pets.pkl"], env=env) as url:
        image = write_image(tmp_path / "x.jpg", (220, 60, 60))
        answers_as_the_model(Client(url, verbose=False).predict(handle_file(str(image)), api_name="/predict"),
                             tiny_model, image)


def test_autoencoder_loads_a_hub_model_offline(tiny_autoencoder, tmp_path):
    """Its graph of an image is fetched with its graph of a code; from a repo without the latter, the weights."""
    code = ("import sys; from imagelab.loading import open_model; ae = open_model(sys.argv[1], 'autoencoder'); "
            "print(ae.path.name, *ae.reconstruct(sys.argv[2]).reconstruction.size)")
    image = write_image(tmp_path / "x.jpg", (200, 90, 40), size=(40, 30))
    for suffixes, served_from in [((".pkl", ".onnx", ".decoder.onnx", ".config.json", ".safetensors"), "ae.onnx"),
                                  ((".pkl", ".onnx", ".config.json", ".safetensors"), "ae.safetensors")]:
        env = hub_cache(tmp_path / f"hf{len(suffixes)}", "someone/ae", artifacts(tiny_autoencoder, *suffixes))
        res = run(["-c", code, "hf://someone/ae/ae.pkl", image], env=with_env(env), timeout=120)
        assert res.stdout.split() == [served_from, "16", "16"], res.stderr[-2000:]


def test_cleaner_serves_a_hub_model_offline(tiny_bears, tmp_path):
    model, data, _ = tiny_bears
    env = with_env(hub_cache(tmp_path / "hf", "someone/bears", artifacts(model, ".safetensors", ".config.json")))
    code = ("import sys\nfrom imagelab.cleaning import Cleaner\n"
            "print([r['file'] for r in Cleaner(sys.argv[1], sys.argv[2]).rank('teddy')][:3])")
    from imagelab.cleaning import Cleaner
    expected = [r["file"] for r in Cleaner(model, data).rank("teddy")][:3]
    assert in_fresh_process(code, "hf://someone/bears/bears.pkl", data, cwd=tmp_path, env=env) == str(expected)


def test_autoencoder_app_on_hub_weights_has_named_api_parameters_and_no_pickle_warning(ae_weights, tmp_path):
    env = hub_cache(tmp_path / "hf", "someone/ae", [ae_weights, *artifacts(ae_weights, ".config.json")])
    with served(["apps/autoencoder/app.py", "--model", f"hf://someone/ae/{ae_weights.stem}.pkl"], env=env) as url:
        api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
        names = {name: [p["parameter_name"] for p in api[name]["parameters"]] for name in ("/reconstruct", "/interpolate")}
        assert names == {"/reconstruct": ["image"], "/interpolate": ["a", "b", "steps"]}
        photo = write_image(tmp_path / "a.jpg", (220, 60, 60))
        assert Client(url, verbose=False).predict(handle_file(str(photo)), api_name="/reconstruct")


def test_no_pickle_warning_when_the_owner_serves_a_learner(tiny_model, tiny_autoencoder, tmp_path):
    pkl_alone = only([tiny_model], tmp_path / "pets")[0]  # no ONNX beside it: the learner is unpickled
    env = {"PETS_MODEL": str(pkl_alone), "AUTOENCODER_MODEL": str(tiny_autoencoder), "BEARS_MODEL": None,
           "CLEANER_MODEL": str(pkl_alone), "CLEANER_DATA": str(make_data(tmp_path / "data"))}
    app, path_env = repo_app_without_models("app.py", tmp_path)
    with served([app], env={**env, **path_env}) as url:
        log = url.log.read_text()
    assert "insecure pickle" not in log and "Traceback" not in log, log


def make_data(root):
    for label, color in (("cats", (220, 60, 60)), ("dogs", (60, 60, 220))):
        write_image(root / label / "a.jpg", color)
    return root


# --- the batch CLI -----------------------------------------------------------------------------------------

def test_batch_cli_gives_each_bad_path_a_row_with_its_reason(tiny_model, tmp_path):
    from conftest import make_folder_dataset
    folder = make_folder_dataset(tmp_path / "photos", n=1)
    good = (folder / "cats" / "cats_0.jpg").read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("<html>not an image</html>")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out.csv"
    res = run(["-m", "imagelab.predict", tiny_model, folder, tmp_path / "missing.jpg", "--csv", out])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["path"].rsplit("/", 1)[1]: r for r in csv.DictReader(out.open())}
    reasons = {name: rows[name]["error"] for name in ("empty.jpg", "notes.jpg", "truncated.jpg", "missing.jpg")}
    assert reasons == {"empty.jpg": "not a readable image: empty file",
                       "notes.jpg": "not a readable image: not an image (or not one of the formats read: JPEG, PNG, "
                                    "WEBP, GIF, TIFF, BMP, AVIF, JPEG2000, PPM, ICO)",
                       "truncated.jpg": "not a readable image: truncated image (the file ends before the picture does)",
                       "missing.jpg": "no such file or folder"}
    assert rows["cats_0.jpg"]["label1"] in ("cats", "dogs") and not rows["cats_0.jpg"]["error"]
    assert "2 classified, 4 not (the error column says why)" in res.stderr
    res = run(["-m", "imagelab.predict", tiny_model, tmp_path / "nope.jpg", folder / "empty.jpg"])
    fails_with_one_line(res, "nothing classified", "nope.jpg: no such file or folder", "(and 1 more)")
    assert "no such file or folder" in res.stdout  # the rows are written all the same
