"""Publishing: the Space folder runs alone, the model card says everything, Hub models load from the cache."""
import json
import os
import shutil
import time

import gradio
import pytest
import yaml
from gradio_client import Client, handle_file
from PIL import Image

from conftest import run, served, write_image
from imagelab.deploy import build_model_repo, model_card


@pytest.fixture(scope="module")
def space(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "pets-space"
    res = run(["-m", "imagelab.deploy", "pets", "--model", tiny_model, "--out", out])
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_space_folder_contents(space):
    names = {str(p.relative_to(space)) for p in space.rglob("*") if p.is_file()}
    for expected in ["app.py", "requirements.txt", "README.md", ".gitattributes", "imagelab/__init__.py",
                     "imagelab/ui.py", "imagelab/inference.py", "models/pets.onnx", "models/pets.config.json",
                     "models/pets.report/metrics.json", "models/pets.report/confusion_matrix.png"]:
        assert expected in names, expected
    assert any(n.startswith("models/pets.report/examples/") for n in names)
    assert not [n for n in names if n.endswith((".pkl", ".pyc", ".pyi"))]  # the Space never unpickles
    meta = front_matter((space / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__ and meta["app_file"] == "app.py"
    assert meta["title"] == "Pet classifier" and meta["emoji"] and meta["license"]
    assert "*.onnx filter=lfs" in (space / ".gitattributes").read_text()
    reqs = [line for line in (space / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert f"gradio=={gradio.__version__}" in reqs and "onnxruntime==1.31.1" in reqs
    assert not [r for r in reqs if r.startswith(("torch", "fastai"))]


def test_space_runs_alone_from_an_empty_directory(space, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(space, alone)
    env = {"PYTHONPATH": None, "MODEL_PATH": None}
    res = run(["-c", "import imagelab; print(imagelab.__file__)"], cwd=alone, env={
        k: v for k, v in os.environ.items() if k not in env})
    assert res.stdout.strip() == str(alone / "imagelab" / "__init__.py")  # its own copy of the library
    with served([alone / "app.py"], cwd=alone, env=env) as url:
        out = Client(url, verbose=False).predict(handle_file(str(write_image(tmp_path / "x.jpg", (220, 60, 60)))),
                                                 api_name="/predict")
        assert out["label"] in ("cats", "dogs")
        maps = open(f"/proc/{url.proc.pid}/maps").read()
        assert "libtorch" not in maps  # the Space runs ONNX Runtime only: no torch, no fastai


def test_model_card_renders_every_field(tiny_model):
    metrics = json.loads((tiny_model.with_name("pets.report") / "metrics.json").read_text())
    card = model_card("pets", metrics)
    meta = front_matter(card)
    assert meta["library_name"] == "fastai" and meta["pipeline_tag"] == "image-classification"
    for c in metrics["vocab"]:
        row = next(line for line in card.splitlines() if line.startswith(f"| {c} |"))
        assert f"| {metrics['counts']['train'][c]} | {metrics['counts']['valid'][c]} |" in row
    for key in ("arch", "size", "epochs", "bs", "lr", "seed", "min_scale", "valid_pct"):
        assert f"| {key} | {metrics[key]} |" in card, key
    assert f"{metrics['accuracy']:.2%}" in card and str(metrics["train_seconds"]) in card
    assert metrics["data"] in card and "pets.report/confusion_matrix.png" in card
    assert "Intended use and limitations" in card and "load_learner" in card and "Predictor(" in card


def test_autoencoder_model_card_and_repo_folder(tiny_autoencoder, tmp_path):
    metrics = json.loads((tiny_autoencoder.with_name("ae.report") / "metrics.json").read_text())
    repo = build_model_repo("autoencoder", tiny_autoencoder, tmp_path / "repo")
    card = (repo / "README.md").read_text()
    assert front_matter(card)["pipeline_tag"] == "image-to-image"
    for key in ("code_size", "depth", "width", "loss", "size", "epochs", "bs", "lr", "seed"):
        assert f"| {key} | {metrics[key]} |" in card, key
    assert f"| autoencoder | {metrics['ae_mse']:.5f} | {metrics['ae_psnr']:.2f} |" in card
    assert f"| PCA, {metrics['pca_components']} components | {metrics['pca_mse']:.5f} |" in card
    assert f"{metrics['mse_ratio_ae_to_pca']:.3f}" in card and "autoencoder.report/reconstructions.png" in card
    assert (repo / "autoencoder.pkl").is_file() and (repo / "autoencoder.report" / "reconstructions.png").is_file()
    code = ("import sys; from imagelab.autoencoder import Autoencoder\n"
            "print(Autoencoder(sys.argv[1]).reconstruct(sys.argv[2])[1].size)")
    res = run(["-c", code, repo / "autoencoder.pkl", write_image(tmp_path / "x.png", (200, 90, 40))])
    assert res.returncode == 0 and res.stdout.strip() == "(16, 16)", res.stderr[-2000:]


def test_push_without_login_or_network_fails_first_with_one_line(tiny_model, tmp_path):
    out = tmp_path / "space"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}
    for token, message in [("", "no Hugging Face token"), ("hf_fake_token", "cannot reach the Hugging Face Hub")]:
        start = time.monotonic()
        res = run(["-m", "imagelab.deploy", "pets", "--model", tiny_model, "--out", out, "--push", "me/pets"],
                  env={**env, "HF_TOKEN": token})
        assert time.monotonic() - start < 60
        assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
        assert message in res.stderr and not out.exists()


def fill_hub_cache(hf_home, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """Put files in the Hub's own cache layout, as a download would have: blobs, a snapshot, refs/main."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    for src in files:
        blob = repo / "blobs" / f"blob-{src.name}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, blob)
        link = repo / "snapshots" / commit / src.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_hub_models_load_from_a_warm_cache_offline(tiny_model, tmp_path):
    commit = fill_hub_cache(tmp_path / "hf", "someone/pets",
                            [tiny_model.with_suffix(".onnx"), tiny_model.with_name("pets.config.json")])
    img = write_image(tmp_path / "x.jpg", (220, 60, 60))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    for spec in ["hf://someone/pets/pets.pkl", f"hf://someone/pets/pets.pkl@{commit}"]:
        res = run(["-m", "imagelab.predict", spec, img], env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.splitlines()[1].split(",")[1] in ("cats", "dogs")  # the .onnx ran: no .pkl is cached
    cold = {**env, "HF_HOME": str(tmp_path / "cold")}
    res = run(["-m", "imagelab.predict", "hf://someone/pets/pets.pkl", img], env=cold)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "not in the local Hub cache" in res.stderr


def test_autoencoder_space_runs_alone(tiny_autoencoder, tmp_path):
    out = tmp_path / "build" / "autoencoder-space"
    res = run(["-m", "imagelab.deploy", "autoencoder", "--model", tiny_autoencoder, "--out", out])
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "models" / "autoencoder.pkl").is_file() and (out / "apps").exists() is False
    meta = front_matter((out / "README.md").read_text())
    assert meta["sdk_version"] == gradio.__version__ and "/reconstruct" in (out / "README.md").read_text()
    alone = shutil.copytree(out, tmp_path / "alone")
    with served([alone / "app.py"], cwd=alone, env={"PYTHONPATH": None, "MODEL_PATH": None}) as url:
        rebuilt = Client(url, verbose=False).predict(handle_file(str(write_image(tmp_path / "x.png", (200, 90, 40)))),
                                                     api_name="/reconstruct")
        assert Image.open(rebuilt).size == (16, 16)  # the tiny model's size
