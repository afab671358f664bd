"""Publishing: the Space folder runs alone, the model card says everything, Hub models load from the cache; deploy
replaces no folder of the user's, and pushes to a stand-in Hub on 127.0.0.1."""
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path

import gradio
import numpy as np
import pytest
import yaml
from gradio_client import handle_file
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from checkouts import fill_hub_cache
from conftest import (Client, PY, ROOT, answers_as_the_model, fails_with_one_line, interruptible, run, served,
                      write_image)
from hub_server import Hub
from imagelab.deploy import INTERRUPTED, MARKER, build_model_repo, model_card
from imagelab.paths import artifact_paths

OFFLINE = {"HF_TOKEN": "", "HF_HUB_OFFLINE": "1"}  # no test may reach the Hub or use someone's token


@pytest.fixture(scope="module")
def deployed(tiny_model, tmp_path_factory):
    """`deploy pets` with a Space id and a model repo id, no token: (Space folder, model repo folder, stdout)."""
    build = tmp_path_factory.mktemp("build")
    res = run(["-m", "imagelab.deploy", "pets", "--model", tiny_model, "--space", "alice/pets-demo",
               "--space-out", build / "pets-space", "--model-repo", "alice/pets-classifier",
               "--model-out", build / "pets-model"], env={**os.environ, **OFFLINE, "HF_HOME": str(build / "hf")})
    assert res.returncode == 0, res.stderr[-2000:]
    return build / "pets-space", build / "pets-model", res.stdout


@pytest.fixture(scope="module")
def space(deployed):
    return deployed[0]


@pytest.fixture(scope="module")
def pets_repo(deployed):
    return deployed[1]


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
    assert only_lfs_rules(space / ".gitattributes")
    reqs = [line for line in (space / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert f"gradio=={gradio.__version__}" in reqs and "onnxruntime==1.31.1" in reqs
    assert not [r for r in reqs if r.startswith(("torch", "fastai"))]


def test_space_runs_alone_from_an_empty_directory(space, tiny_model, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(space, alone)
    env = {"PYTHONPATH": None, "MODEL_PATH": None}
    res = run(["-c", "import imagelab; print(imagelab.__file__)"], cwd=alone, env={
        k: v for k, v in os.environ.items() if k not in env})
    assert res.stdout.strip() == str(alone / "imagelab" / "__init__.py")  # its own copy of the library
    with served([alone / "app.py"], cwd=alone, env=env) as url:
        image = write_image(tmp_path / "x.jpg", (220, 60, 60))
        answers_as_the_model(Client(url, verbose=False).predict(handle_file(str(image)), api_name="/predict"),
                             tiny_model, image)  # the model it was built from
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
    held = sum(metrics["counts"]["valid"].values())
    se = (metrics["accuracy"] * (1 - metrics["accuracy"]) / held) ** 0.5
    assert metrics["accuracy_standard_error"] == pytest.approx(se)
    assert f"**{metrics['accuracy']:.2%}** ± {se:.1%} (one standard error;" in card
    # the held-out images that chose the exported epoch flatter it: the card says so whenever the choice mattered
    assert "These images also chose" not in model_card("pets", {**metrics, "kept": "best", "kept_epoch": 3,
                                                                 "epochs_trained": 3})
    assert "These images also chose the exported weights (epoch 2's" in model_card(
        "pets", {**metrics, "kept": "best", "kept_epoch": 2, "epochs_trained": 3})
    assert "These images also chose" not in model_card("pets", {**metrics, "kept": "last", "kept_epoch": 3,
                                                                 "epochs_trained": 3})
    assert "pets.report/confusion_matrix.png" in card
    assert "Intended use and limitations" in card and "load_learner(" in card and "InferenceSession(" in card
    assert f"Trained on a folder named `{Path(metrics['data']).name}`" in card
    assert metrics["data"] not in card and str(Path(metrics["data"]).parent) not in card  # no local paths
    assert "USER/REPO" in card  # no id given: a placeholder the reader sees as one
    # what ran, not only what was asked: a time budget or early stopping ends a run before --epochs
    budgeted = {**metrics, "epochs": 40, "epochs_planned": 40, "epochs_trained": 9, "time_budget": 60.0,
                "kept_epoch": 7, "kept": "best"}
    assert ("Trained 9 epochs in a time budget of 60 s (at most 40); the weights are epoch 7's (the lowest validation "
            "loss).") in model_card("pets", budgeted)
    # fine-tuning's frozen epoch is one of the run's epochs, not one more than planned
    fine_tuned = {**metrics, "epochs": 3, "epochs_planned": 4, "epochs_trained": 4, "time_budget": None}
    assert "Trained 4 epochs;" in model_card("pets", fine_tuned)
    assert "the weights are the model's before training" in model_card("pets", {**fine_tuned, "kept_epoch": 0})
    older = {k: v for k, v in fine_tuned.items() if k != "epochs_planned"}  # a metrics.json from before the key
    assert "Trained 4 epochs;" in model_card("pets", {**older, "pretrained": True})
    exported_only = model_card("pets", {**metrics, "images_trained": 0, "images_per_second": None})
    assert f"{metrics['train_seconds']} s with " in exported_only and "None images" not in exported_only
    # the held-out images are the ones the run held out: drawn at random, or a valid/ folder
    assert (f"{held} images held out ({metrics['valid_pct']:.0%} of the pictures, drawn at random with seed "
            f"{metrics['seed']})") in card
    by_folders = model_card("pets", {**metrics, "split": "train/ and valid/ folders"})
    assert f"the {held} images of its `valid/` folder held out" in by_folders and "at random" not in by_folders
    assert "| valid_pct |" in card and "| valid_pct |" not in by_folders  # a setting that split nothing


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
    ran = {**metrics, "kept": "best", "epochs_trained": 3, "mse_ratio_per_epoch": [[1, 0.9], [2, 0.95], [3, 0.97]]}
    for kept, says in ((1, "epoch 1's"), (0, "the model's before training, PCA's")):
        picked = model_card("autoencoder", {**ran, "kept_epoch": kept})
        assert f"weights ({says}, under `--keep best`) were chosen by their loss on these held-out images" in picked
        assert "the last epoch's ratio was 0.970" in picked
    for unpicked in ({**ran, "kept_epoch": 3}, {**ran, "kept": "last", "kept_epoch": 3}):  # the last: chosen by nothing
        assert "were chosen by" not in model_card("autoencoder", unpicked)
    k = metrics["pca_components"]
    assert f"PCA with {k} components, fitted" in model_card("autoencoder", {**metrics, "code_size": k})
    assert (f"PCA with {k} components (fewer than the code's {k + 1} numbers: {metrics['counts']['train']} training "
            "images give no more)") in model_card("autoencoder", {**metrics, "code_size": k + 1})
    assert (repo / "autoencoder.pkl").is_file() and (repo / "autoencoder.report" / "reconstructions.png").is_file()
    code = ("import sys; from imagelab.loading import open_model\n"
            "print(open_model(sys.argv[1], 'autoencoder').reconstruct(sys.argv[2]).reconstruction.size)")
    res = run(["-c", code, repo / "autoencoder.pkl", write_image(tmp_path / "x.png", (200, 90, 40))])
    assert res.returncode == 0 and res.stdout.strip() == "(16, 16)", res.stderr[-2000:]


def test_push_without_login_or_network_fails_first_with_one_line(tiny_model, tmp_path):
    out = tmp_path / "space"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}
    for token, message in [("", "no Hugging Face token"), ("hf_fake_token", "cannot reach the Hugging Face Hub")]:
        start = time.monotonic()
        res = run(["-m", "imagelab.deploy", "pets", "--model", tiny_model, "--space-out", out, "--space", "me/pets",
                   "--model-repo", "me/pets-model", "--model-out", tmp_path / "repo", "--push"],
                  env={**env, "HF_TOKEN": token})
        assert time.monotonic() - start < 60
        fails_with_one_line(res, message)
        assert not out.exists() and not (tmp_path / "repo").exists()


def test_the_hub_is_reached_through_the_users_proxy():
    """Behind a proxy the Hub's client goes through it (HTTPS_PROXY): the quick check before a download or a push
    must knock there, not at a Hub the machine cannot reach directly."""
    code = "from imagelab.hub import hub_reachable; print(hub_reachable())"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["HF_ENDPOINT"] = "https://hub.invalid"  # no such host: unreachable but through the proxy
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        address = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        seen = {name: run(["-c", code], env={**env, **extra}).stdout.strip() for name, extra in [
            ("direct", {}), ("proxy", {"HTTPS_PROXY": address}), ("bypassed", {"HTTPS_PROXY": address,
                                                                               "NO_PROXY": "hub.invalid"})]}
    assert seen == {"direct": "False", "proxy": "True", "bypassed": "False"}


@pytest.mark.parametrize("args, message", [
    (["--push"], "name at least one"),
    (["--space", "pets-demo"], "not a Hub id like USER/NAME"),
    (["--model-repo", "a/b/c"], "not a Hub id like USER/NAME"),
])
def test_bad_hub_flags_fail_first_with_one_line(tiny_model, tmp_path, args, message):
    out = tmp_path / "space"
    res = run(["-m", "imagelab.deploy", "pets", "--model", tiny_model, "--space-out", out, *args],
              env={**os.environ, **OFFLINE})
    fails_with_one_line(res, message)
    assert not out.exists()


def test_help_names_every_flag():
    res = run(["-m", "imagelab.deploy", "--help"])
    assert res.returncode == 0
    for flag in ("--model", "--space", "--space-out", "--model-repo", "--model-out", "--push"):
        assert flag in res.stdout, flag
    assert "Nothing is uploaded without --push" in res.stdout


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


class RunsCode:
    """What a stranger's pickle can hold: unpickling it makes `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_learner_is_never_unpickled_from_the_hub(tiny_model, tmp_path):
    """A repo with no weights-only export beside its .pkl (anyone's, or one whose config did not download): the
    pickle is not loaded, since loading it would run whatever code it holds."""
    import torch
    evil, marker = tmp_path / "evil" / "pets.pkl", tmp_path / "pickle-code-ran"
    evil.parent.mkdir()
    torch.save(RunsCode(marker), evil)
    img = write_image(tmp_path / "x.jpg", (220, 60, 60))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    fill_hub_cache(tmp_path / "hf", "stranger/pets", [evil])
    fill_hub_cache(tmp_path / "hf", "someone/pets", [tiny_model, tiny_model.with_name("pets.config.json")])
    for repo, says in (("stranger", "model config stranger/pets/pets.config.json"),
                       ("someone", "model someone/pets/pets.safetensors")):  # its config, but no weights-only export
        res = run(["-m", "imagelab.predict", f"hf://{repo}/pets/pets.pkl", img], env=env)
        fails_with_one_line(res, says, "a learner (.pkl) is not loaded from the Hub")
    assert not marker.exists()
    torch.load(evil, weights_only=False)
    assert marker.exists()  # what the stranger's pickle would have done


def test_autoencoder_space_runs_alone(tiny_autoencoder, tmp_path):
    out = tmp_path / "build" / "autoencoder-space"
    res = run(["-m", "imagelab.deploy", "autoencoder", "--model", tiny_autoencoder, "--space-out", out])
    assert res.returncode == 0, res.stderr[-2000:]
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"models/autoencoder.onnx", "models/autoencoder.decoder.onnx", "models/autoencoder.config.json"} <= names
    assert not [n for n in names if n.endswith((".pkl", ".safetensors"))] and (out / "apps").exists() is False
    reqs = [line for line in (out / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert "onnxruntime==1.31.1" in reqs and not [r for r in reqs if r.startswith(("torch", "fastai", "timm"))]
    readme = (out / "README.md").read_text()
    assert front_matter(readme)["sdk_version"] == gradio.__version__
    alone = shutil.copytree(out, tmp_path / "alone")
    caller = tmp_path / "caller"  # the README's client code, run where its photos are
    for name, rgb in (("photo.jpg", (200, 90, 40)), ("a.jpg", (200, 90, 40)), ("b.jpg", (40, 90, 200))):
        write_image(caller / name, rgb)
    with served([alone / "app.py"], cwd=alone, env={"PYTHONPATH": None, "MODEL_PATH": None}) as url:
        [code] = python_blocks(readme)
        res = run(["-c", code.replace('"USER/SPACE"', repr(str(url)))], cwd=caller)
        assert res.returncode == 0, res.stderr[-2000:]
        rebuilt, walk = res.stdout.strip().splitlines()[-2:]  # after the client's "Loaded as API" line
        assert Image.open(rebuilt).size == (16, 16) and Image.open(walk).size == (128, 16)  # the tiny model's 16 px
        assert "libtorch" not in open(f"/proc/{url.proc.pid}/maps").read()  # ONNX Runtime only: no torch, no fastai


def test_a_space_refuses_a_graph_without_what_its_app_reads(tiny_autoencoder, tmp_path):
    model = tmp_path / "models" / "ae.pkl"
    shutil.copytree(tiny_autoencoder.parent, model.parent)
    shutil.copy(tiny_autoencoder.with_name("ae.decoder.onnx"), model.with_suffix(".onnx"))  # its output: "image"
    res = run(["-m", "imagelab.deploy", "autoencoder", "--model", model, "--space-out", tmp_path / "space"])
    fails_with_one_line(res, "no output 'reconstruction'", "retrain it", "as a Space")
    assert not (tmp_path / "space").exists()


def only_lfs_rules(path):
    lines = path.read_text().splitlines()
    return bool(lines) and all(line.split()[1:] == ["filter=lfs", "diff=lfs", "merge=lfs", "-text"] for line in lines)


def python_blocks(markdown):
    """The code of every ```python block of a README, in order."""
    return [block.split("```", 1)[0] for block in markdown.split("```python\n")[1:]]


# The venv has this project installed editable (a finder on sys.meta_path, put there by a .pth file): a
# reader of the card has no imagelab at all. The child drops that finder and every sys.path entry holding an
# imagelab/ folder (a checkout of this project), and proves `import imagelab` fails before the card's code runs.
WITHOUT_IMAGELAB = """
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if p and "__editable__" not in p and not os.path.isdir(os.path.join(p, "imagelab"))]
try:
    import imagelab
    raise SystemExit("imagelab is importable: " + imagelab.__file__)
except ModuleNotFoundError:
    print("no imagelab here")
"""


# After WITHOUT_IMAGELAB, for a card's `pip install` line: the only packages the code can import are those the line
# installs, from a site-packages folder made of them (`installed_view`) instead of this venv's.
ONLY_INSTALLED = """
import site
sys.path[:] = [p for p in sys.path if p not in site.getsitepackages()] + [{view!r}]
"""


def card_process(code, hf_home, cwd, prelude=WITHOUT_IMAGELAB, installs=None):
    """A card's code run in a fresh interpreter in `cwd` (outside this repository), the Hub answered from `hf_home`;
    with `installs` (the packages of the card's `pip install` line), as in a venv of those packages alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")}
    if installs:
        prelude += ONLY_INSTALLED.format(view=str(installed_view(installs, Path(hf_home).parent / "site-packages")))
    return run(["-c", prelude + code], cwd=cwd, env={**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})


def run_card_code(code, hf_home, cwd, prelude=WITHOUT_IMAGELAB, installs=None):
    """A card's code run as `card_process` runs it, which must succeed: its lines of output."""
    res = card_process(code, hf_home, cwd, prelude, installs)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "no imagelab here" or not prelude, res.stdout
    return lines


def pip_line_before(card, code):
    """The packages of the last `pip install ...` a card says before `code` (a block of its code)."""
    return re.findall(r"pip install ([^`]+)`", card[:card.index(code)])[-1]


def installed_by(packages):
    """The distributions `pip install PACKAGES` installs: those named and, transitively, what they require (not what
    only an extra of theirs that nobody asked for requires, nor what this platform does not need)."""
    todo, seen = [Requirement(p) for p in packages.split()], set()
    while todo:
        req = todo.pop()
        name, extras = canonicalize_name(req.name), {""} | set(req.extras)
        if {(name, e) for e in extras} <= seen:
            continue
        seen |= {(name, e) for e in extras}
        for line in metadata.requires(req.name) or ():
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    return {name for name, _ in seen}


def installed_view(packages, folder):
    """`folder` (made once per pip line) as a site-packages holding what `pip install PACKAGES` installs: links to
    this venv's files of those distributions (`installed_by`). A module of any other is not found there, as in a
    fresh venv: a package the card's line forgets fails the card's code, and an optional one is left out."""
    folder = folder.with_name(f"{folder.name}-{hashlib.sha1(packages.encode()).hexdigest()[:12]}")
    if folder.is_dir():
        return folder
    stage = folder.with_name(folder.name + ".tmp")
    stage.mkdir(parents=True)
    allowed = installed_by(packages)
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) in allowed:
            for top in {Path(f).parts[0] for f in dist.files or ()} - {"..", "__pycache__"}:
                if not (stage / top).is_symlink() and Path(dist.locate_file(top)).exists():
                    (stage / top).symlink_to(dist.locate_file(top))
    stage.rename(folder)
    return folder


@pytest.fixture(scope="module")
def pets_hub(pets_repo, tmp_path_factory):
    """(HF_HOME, a directory outside the repo with photo.jpg): the model repo as if downloaded from the Hub."""
    tmp = tmp_path_factory.mktemp("reader")
    fill_hub_cache(tmp / "hf", "alice/pets-classifier", pets_repo)
    write_image(tmp / "here" / "photo.jpg", (220, 60, 60), size=(70, 50))
    return tmp / "hf", tmp / "here"


def test_model_repo_without_a_token_carries_the_real_ids(pets_repo, space, deployed):
    names = {p.relative_to(pets_repo).as_posix() for p in pets_repo.rglob("*") if p.is_file()}
    for expected in ["pets.pkl", "pets.onnx", "pets.safetensors", "pets.config.json", "README.md",
                     "imagelab/__init__.py", "imagelab/data.py", "imagelab/models.py", "imagelab/images.py",
                     "pets.report/metrics.json", "pets.report/confusion_matrix.png"]:
        assert expected in names, expected
    assert not [n for n in names if n.endswith(".pyc")]
    assert only_lfs_rules(pets_repo / ".gitattributes")
    card = (pets_repo / "README.md").read_text()
    assert "USER/" not in card and card.count("alice/pets-classifier") >= 3
    readme = (space / "README.md").read_text()
    assert 'Client("alice/pets-demo")' in readme and "USER/" not in readme
    assert "https://huggingface.co/alice/pets-classifier" in readme
    assert f"wrote {pets_repo} (model repo alice/pets-classifier)" in deployed[2]


def test_readmes_leave_no_template_field_unfilled(pets_repo, space):
    for readme in (pets_repo / "README.md", space / "README.md"):
        assert "$" not in readme.read_text(), readme


def test_classifier_card_onnx_code_runs_without_imagelab(pets_repo, pets_hub, tiny_model):
    from imagelab.inference import Predictor
    hf_home, here = pets_hub
    card = (pets_repo / "README.md").read_text()
    onnx_code = next(b for b in python_blocks(card) if "onnxruntime" in b)
    assert "torch" not in onnx_code and "fastai" not in onnx_code
    lines = run_card_code(onnx_code, hf_home, here, installs=pip_line_before(card, onnx_code))
    expected = Predictor(tiny_model).predict(here / "photo.jpg")
    assert lines[1:] == [f"{label} {p:.4f}" for label, p in expected.items()]  # the app's exact preprocessing
    clear = here.with_name("transparent")  # a PNG whose left half is see-through: on white, as the app has it
    clear.mkdir(exist_ok=True)
    rgba = np.full((50, 70, 4), (30, 160, 40, 255), np.uint8)
    rgba[:, :35, 3] = np.linspace(0, 200, 35, dtype=np.uint8)
    Image.fromarray(rgba).save(clear / "photo.jpg", format="PNG")
    lines = run_card_code(onnx_code, hf_home, clear, installs=pip_line_before(card, onnx_code))
    expected = Predictor(tiny_model).predict(clear / "photo.jpg")
    assert lines[1:] == [f"{label} {p:.4f}" for label, p in expected.items()]
    assert f"pip install onnxruntime=={pinned('onnxruntime')} numpy==" in card


def test_classifier_card_pickle_code_runs_with_the_repos_own_imagelab(pets_repo, pets_hub, tiny_model):
    from imagelab.inference import Predictor
    hf_home, here = pets_hub
    card = (pets_repo / "README.md").read_text()
    pkl_code = next(b for b in python_blocks(card) if "load_learner" in b)
    assert "snapshot_download" in pkl_code and "sys.path.insert(0" in pkl_code
    label, p = run_card_code(pkl_code, hf_home, here, installs=pip_line_before(card, pkl_code))[-1].split()
    expected = Predictor(tiny_model).predict(here / "photo.jpg")
    assert label == next(iter(expected))
    assert abs(float(p) - expected[label]) < 1e-3
    for package in ("fastai", "timm", "torch"):
        assert f"{package}=={pinned(package)}" in card, package


def pinned(package):
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    line = next(line for line in lines if line.startswith(package + "=="))
    return line.split("==")[1]


def test_without_the_blocker_imagelab_is_importable(pets_hub):
    """The check above is not vacuous: this venv does import imagelab when nothing removes it."""
    hf_home, here = pets_hub
    lines = run_card_code("import imagelab; print(imagelab.__name__)", hf_home, here, prelude="")
    assert lines == ["imagelab"]


def test_a_package_the_pip_line_does_not_install_is_not_there(pets_hub):
    """The checks above are not vacuous: with a card's pip line, what it does not install cannot be imported."""
    hf_home, here = pets_hub
    res = card_process("import numpy\nprint('numpy')\nimport accelerate", hf_home, here, installs="numpy==2.4.6")
    assert res.stdout.splitlines()[1:] == ["numpy"] and "No module named 'accelerate'" in res.stderr, res.stderr


def test_autoencoder_card_pickle_code_runs_without_imagelab(tiny_autoencoder, tmp_path):
    model = tmp_path / "models" / "ae.pkl"
    shutil.copytree(tiny_autoencoder.parent, model.parent)
    for path in artifact_paths(model).values():  # a .pkl-only export, as older training runs wrote
        path.unlink(missing_ok=True)
    repo = build_model_repo("autoencoder", model, tmp_path / "repo", repo_id="bob/ae")
    card = (repo / "README.md").read_text()
    assert not (repo / "autoencoder.onnx").exists() and "onnxruntime" not in card  # no ONNX export: no ONNX code
    fill_hub_cache(tmp_path / "hf", "bob/ae", repo)
    write_image(tmp_path / "here" / "photo.jpg", (200, 90, 40), size=(40, 30))
    [code] = python_blocks(card)
    lines = run_card_code(code, tmp_path / "hf", tmp_path / "here", installs=pip_line_before(card, code))
    assert lines[1].startswith("(16, 16) PSNR ") and (tmp_path / "here" / "rebuilt.png").is_file()


def test_autoencoder_card_onnx_code_runs_without_imagelab(tiny_autoencoder, tmp_path):
    """The card's ONNX Runtime code, on the repo's own export, gives the app's PSNR (its own preprocessing, in fastai's
    arithmetic), and its decoder code the app's walk between two photos, to the pixel."""
    from imagelab.loading import open_model
    repo = build_model_repo("autoencoder", tiny_autoencoder, tmp_path / "repo", repo_id="bob/ae")
    card = (repo / "README.md").read_text()
    names = {p.name for p in repo.iterdir()}
    assert {"autoencoder.onnx", "autoencoder.decoder.onnx", "autoencoder.config.json"} <= names
    fill_hub_cache(tmp_path / "hf", "bob/ae", repo)
    photo = write_image(tmp_path / "here" / "photo.jpg", (200, 90, 40), size=(40, 30))
    other = write_image(tmp_path / "here" / "other.jpg", (40, 90, 200), size=(24, 48), seed=1)
    onnx_code, walk_code, pkl_code = python_blocks(card)
    code_lines = (onnx_code + walk_code).splitlines()
    imports = [line.split()[1] for line in code_lines if line.startswith(("import ", "from "))]
    assert imports and not [m for m in imports if m.split(".")[0] in ("torch", "fastai", "imagelab")], imports
    lines = run_card_code(onnx_code + walk_code, tmp_path / "hf", tmp_path / "here",
                          installs=pip_line_before(card, onnx_code))
    ae = open_model(tiny_autoencoder, "autoencoder")
    assert lines[1].startswith("(16, 16) PSNR ") and lines[2] == "walk (128, 16)"
    assert float(lines[1].split()[-2]) == pytest.approx(ae.reconstruct(photo).psnr, abs=0.005)  # printed to 0.01 dB
    walk = np.asarray(Image.open(tmp_path / "here" / "walk.png"), int)
    assert np.array_equal(walk, np.asarray(ae.interpolate(photo, other, 8), int))


def test_a_model_of_another_kind_than_the_apps_fails_with_one_line(tiny_autoencoder, tiny_model, tmp_path):
    for app, model, kind in (("pets", tiny_autoencoder, "'autoencoder'"), ("autoencoder", tiny_model, "'classifier'")):
        res = run(["-m", "imagelab.deploy", app, "--model", model, "--space-out", tmp_path / app])
        fails_with_one_line(res, f"the {app} app serves", f"is of kind {kind}")
        assert not (tmp_path / app).exists()


def test_an_unknown_kind_fails_with_one_line(tiny_model, tmp_path):
    model = tmp_path / "models" / "pets.pkl"
    shutil.copytree(tiny_model.parent, model.parent)
    metrics = model.with_name("pets.report") / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "kind": "segmenter"}))
    res = run(["-m", "imagelab.deploy", "pets", "--model", model, "--space-out", tmp_path / "space"])
    fails_with_one_line(res, "no known model kind ('segmenter')")


def test_deploy_says_a_command_that_runs_the_space(deployed, tmp_path):
    space, _, stdout = deployed
    command = next(line.strip() for line in stdout.splitlines() if line.strip().startswith("cd ") and PY in line)
    assert command == f"cd {space} && {PY} app.py"
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no venv active, no PYTHONPATH
    res = subprocess.run(["bash", "-c", command + " --help"], cwd=tmp_path, env=clean, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "usage" in res.stdout, res.stderr[-2000:]
    venv = f"../{space.name}.venv"  # beside the folder: in it, a push would upload it
    assert f"python3 -m venv {venv} && {venv}/bin/pip install -r requirements.txt && {venv}/bin/python app.py" in stdout


def test_readme_publish_section_runs_the_space_with_a_python_that_has_its_requirements():
    readme = (ROOT / "README.md").read_text()
    publish = readme.split("## Publish: Hugging Face Spaces and model repos")[1].split("\n## ")[0]
    assert "&& python app.py" not in publish
    assert "cd build/pets-space && ../../.venv/bin/python app.py" in publish
    assert "is itself the Space" not in publish and "`deploy` makes the Space from it" in publish  # a template


# What deploy writes and what it leaves alone: a user's project (its own files, a trained model) beside this repository.

def tree(folder):
    """{path relative to `folder`: bytes} of every file under it."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def project(tiny_model, tmp_path):
    """A user's folder: the tiny model in models/, notes, a build/ folder of theirs, and work/ to run deploy in."""
    proj = tmp_path / "project"
    shutil.copytree(tiny_model.parent, proj / "models")
    (proj / "notes.txt").write_text("mine")
    (proj / "build" / "mine").mkdir(parents=True)
    (proj / "build" / "mine" / "keep.txt").write_text("mine too")
    (proj / "work").mkdir()
    (proj / "work" / "notes.txt").write_text("work notes")
    return proj


def deploy(cwd, *args, model="models/pets.pkl", env=None):
    """`deploy pets` run in `cwd`, offline, without a token unless `env` gives one."""
    return run(["-m", "imagelab.deploy", "pets", "--model", model, *args], cwd=cwd,
               env={**os.environ, **OFFLINE, "HF_HOME": str(Path(cwd) / ".hf"), **(env or {})})


def test_a_build_replaces_only_an_earlier_build_or_an_empty_folder(project):
    space, repo = project / "build" / "space", project / "build" / "repo"
    res = deploy(project, "--out", space, "--model-out", repo)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (space / MARKER).is_file() and (repo / MARKER).is_file()
    (space / "models" / "pets.report" / "examples" / "cats_0.jpg").unlink()  # deploy's own builds: replaced whole
    res = deploy(project, "--out", space, "--model-out", repo)
    assert res.returncode == 0 and (space / MARKER).is_file(), res.stderr[-2000:]
    assert (space / "models" / "pets.report" / "examples" / "cats_0.jpg").is_file()
    # but not with anything of the user's added: a git checkout of the Space, notes, a .venv made in it
    (space / ".git").mkdir()
    (space / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    fails_with_one_line(deploy(project, "--out", space), "will not build the Space in",
                        "it holds files that deploy did not write (.git and 1 more)")
    assert (space / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    shutil.rmtree(space / ".git")
    assert sorted(p.name for p in (project / "build").iterdir()) == ["mine", "repo", "space"]  # no staging left
    (project / "build" / "empty").mkdir()
    res = deploy(project, "--out", "build/empty")
    assert res.returncode == 0 and (project / "build" / "empty" / "app.py").is_file(), res.stderr[-2000:]
    before = tree(project)
    fails_with_one_line(deploy(project, "--out", "build/mine"), "will not build the Space in build/mine",
                        "holds files that deploy did not write")
    fails_with_one_line(deploy(project, "--model-out", "build/mine"), "will not build the model repo in build/mine")
    assert tree(project) == before and not (project / "build" / "pets-space").exists()


def test_trying_the_space_before_the_push_does_not_block_the_next_build(project):
    """The README's workflow: build, run the Space's app in its folder, build again with the Hub ids."""
    space = project / "build" / "space"
    res = deploy(project, "--out", space)
    assert res.returncode == 0, res.stderr[-2000:]
    # PYTHONDONTWRITEBYTECODE unset: a user's Python writes bytecode beside the library it imports
    with served([space / "app.py"], cwd=space, env={"PYTHONPATH": None, "MODEL_PATH": None,
                                                    "PYTHONDONTWRITEBYTECODE": None}) as url:
        out = Client(url, verbose=False).predict(handle_file(str(write_image(project / "x.jpg", (220, 60, 60)))),
                                                 api_name="/predict")
        assert out["label"] in ("cats", "dogs")
    ran = set(tree(space)) - {MARKER, *json.loads((space / MARKER).read_text())["files"]}
    assert "imagelab/ui.pyi" in ran and any("__pycache__/" in n for n in ran), ran  # what the app wrote
    res = deploy(project, "--out", space, "--space", "alice/pets", "--model-repo", "alice/pets-model")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "alice/pets" in (space / "README.md").read_text()
    assert not [n for n in tree(space) if n.endswith((".pyc", ".pyi"))]  # a fresh build: nothing of the last run
    # what the user adds beside them is still theirs
    (space / "imagelab" / "notes.pyi").write_text("mine")  # a stub of no module: written by no app
    fails_with_one_line(deploy(project, "--out", space), "will not build the Space in",
                        "it holds files that deploy did not write (imagelab/notes.pyi)")
    assert (space / "imagelab" / "notes.pyi").read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    (["--out", "../models"], "it is or holds the model"),
    (["--out", ".."], "it is or holds the current folder"),
    (["--out", "."], "it is or holds the current folder"),
    (["--out", "notes.txt"], "it is a file"),
    (["--out", "notes.txt/space"], "notes.txt is a file"),
    (["--out", "../models/pets.report/space"], "pets.report is copied into it"),
    (["--out", "x", "--model-out", "x"], "need two folders, neither inside the other"),
    (["--out", "x/space", "--model-out", "x"], "need two folders, neither inside the other"),
    (["--out", "../build/new", "--model-out", "../build/mine"], "will not build the model repo in ../build/mine"),
    (["--out", "/proc/space"], "will not build the Space in /proc/space: /proc cannot be written"),  # not a folder's
])
def test_a_folder_of_the_users_is_refused_before_anything_is_built(project, args, message):
    before = tree(project)
    fails_with_one_line(deploy(project / "work", *args, model="../models/pets.pkl"), message)
    assert tree(project) == before and sorted(p.name for p in (project / "build").iterdir()) == ["mine"]


@pytest.fixture
def checkout(tmp_path):
    """A copy of this project without trained models: (its folder, the environment that runs its imagelab)."""
    root = tmp_path / "checkout"
    for name in ("imagelab", "apps"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("requirements.txt", ".gitattributes"):
        shutil.copy(ROOT / name, root / name)
    return root, {**os.environ, **OFFLINE, "PYTHONPATH": str(root), "HF_HOME": str(tmp_path / "hf")}


def test_this_project_and_what_deploy_copies_are_refused(checkout, tiny_model):
    root, env = checkout
    before = tree(root)
    for out, message in ((root, "it is or holds this project"), (root / "imagelab" / "space", "is copied into it"),
                         (root / "apps" / "pets" / "space", "is copied into it")):
        res = run(["-m", "imagelab.deploy", "pets", "--model", tiny_model, "--out", out], cwd=root.parent, env=env)
        fails_with_one_line(res, message)
    assert tree(root) == before


def test_a_missing_model_suggests_training_only_for_the_default_path(checkout):
    root, env = checkout
    res = run(["-m", "imagelab.deploy", "pets"], cwd=root, env=env)
    fails_with_one_line(res, f"no model at {root / 'models' / 'pets.pkl'}: train one first with "
                             "`python training/train_pets.py")
    res = run(["-m", "imagelab.deploy", "pets", "--model", "models/nope.pkl"], cwd=root, env=env)
    assert fails_with_one_line(res) == "error: no model at models/nope.pkl"  # a path of yours: mistyped, maybe


def test_a_model_repo_from_an_export_carries_the_learner(project):
    res = deploy(project, "--out", "build/space", "--model-out", "build/repo", model="models/pets.onnx")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (project / "build" / "repo" / "pets.pkl").read_bytes() == (project / "models" / "pets.pkl").read_bytes()
    (project / "models" / "pets.pkl").unlink()
    res = deploy(project, "--out", "build/space2", "--model-out", "build/repo2", model="models/pets.safetensors")
    fails_with_one_line(res, "no learner models/pets.pkl beside models/pets.safetensors")
    assert not (project / "build" / "space2").exists() and not (project / "build" / "repo2").exists()
    res = deploy(project, "--out", "build/space2", model="models/pets.onnx")  # a Space runs the graph: no learner
    assert res.returncode == 0, res.stderr[-2000:]


def test_published_files_name_the_data_folder_not_its_path_nor_its_files(deployed, tiny_model):
    space, repo, _ = deployed
    data = json.loads((tiny_model.with_name("pets.report") / "metrics.json").read_text())["data"]
    assert Path(data).is_absolute()  # the trainer's disk
    split = json.loads((tiny_model.with_name("pets.report") / "split.json").read_text())
    trained = [f for names in split.values() for f in names]
    assert len(trained) > 10
    for copy in (space / "models" / "pets.report" / "metrics.json", repo / "pets.report" / "metrics.json"):
        published = json.loads(copy.read_text())
        assert published["data"] == Path(data).name and "skipped_files" not in published, copy
    for folder in (space, repo):
        for name, content in tree(folder).items():
            if not name.endswith((".pkl", ".onnx", ".safetensors")):  # the model files' own metadata: not here
                assert str(Path(data).parent).encode() not in content, name
                assert not [f for f in trained if f.encode() in content], name  # nor the names of their files
        assert not [n for n in tree(folder) if n.endswith("split.json")]
    assert json.loads((tiny_model.with_name("pets.report") / "metrics.json").read_text())["data"] == data


def test_output_read_by_head_ends_quietly(project):
    # unbuffered: each line is written when said, so the second one meets a reader gone
    env = {**os.environ, **OFFLINE, "HF_HOME": str(project / ".hf"), "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(["bash", "-c", f"set -o pipefail; {PY} -m imagelab.deploy pets --model models/pets.pkl "
                          "--out build/space --model-out build/repo | head -1"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.stdout.startswith("wrote build/space;") and len(res.stdout.splitlines()) == 1
    assert (project / "build" / "space" / MARKER).is_file() and (project / "build" / "repo" / MARKER).is_file()


# Pushing, to a stand-in for the Hub on 127.0.0.1.

@pytest.fixture
def hub():
    hub = Hub()
    hub.tokens.update({"hf_alice": ("alice", "write"), "hf_alice_read": ("alice", "read"), "hf_bob": ("bob", "write")})
    yield hub
    hub.close()


@pytest.mark.parametrize("token, message", [
    ("hf_expired", "the Hugging Face Hub refused the token (wrong or expired?)"),
    ("hf_alice_read", "the Hugging Face token is read-only"),
    ("hf_bob", "the Hugging Face token is bob's, who cannot write to alice/pets"),
])
def test_a_token_that_cannot_upload_stops_deploy_before_it_builds(project, hub, token, message):
    res = deploy(project, "--out", "build/space", "--model-repo", "alice/pets-model", "--push", "alice/pets",
                 env=hub.env(token))
    fails_with_one_line(res, message, "nothing was built or uploaded")
    assert "paid hardware" not in res.stdout and not (project / "build" / "space").exists()
    assert hub.requests == [r for r in hub.requests if r[0] == "GET"] and not hub.repos  # it asked, and wrote nothing


def test_a_push_makes_the_hub_repo_match_the_folder(project, hub):
    # what an earlier push of another Space left there: an example since removed, a static page
    hub.repos[("space", "alice/pets")] = {"index.html": b"<html>", "models/pets.report/examples/old.jpg": b"jpg",
                                          ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n"}
    res = deploy(project, "--out", "build/space", "--model-repo", "alice/pets-model", "--push", "alice/pets",
                 env=hub.env("hf_alice"))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith("note: Hugging Face runs a Gradio Space only on paid hardware")  # once logged in
    assert lines[0].endswith("a static Space is free for everyone and runs the model in the browser: "
                             "python -m imagelab.deploy pets --static --push alice/pets")
    built = {n: b for n, b in tree(project / "build" / "space").items() if n != MARKER}
    assert hub.repos[("space", "alice/pets")] == built and hub.sdks["alice/pets"] == "gradio"
    assert hub.repos[("model", "alice/pets-model")] == {n: b for n, b in tree(project / "build" / "pets-model").items()
                                                       if n != MARKER}
    assert f"pushed build/space to {hub.url}/spaces/alice/pets" in lines


def test_a_hub_refusal_during_the_push_says_what_was_uploaded(project, hub):
    hub.refuse[("create", "alice/pets-model")] = 403
    res = deploy(project, "--out", "build/space", "--model-repo", "alice/pets-model", "--push", "alice/pets",
                 env=hub.env("hf_alice"))
    fails_with_one_line(res, f"cannot create {hub.url}/alice/pets-model: 403 Forbidden: refused by the test",
                        f"uploaded: build/space to {hub.url}/spaces/alice/pets",
                        "not uploaded: build/pets-model")
    assert ("model", "alice/pets-model") not in hub.repos and ("space", "alice/pets") in hub.repos
    hub.refuse[("commit", "alice/pets")] = 403  # not a 5xx, which the Hub's client retries for minutes
    res = deploy(project, "--out", "build/space", "--push", "alice/pets", env=hub.env("hf_alice"))
    fails_with_one_line(res, f"the upload of build/space to {hub.url}/spaces/alice/pets stopped", "push again",
                        "403 Forbidden", "uploaded: nothing")


def test_ctrl_c_during_a_push_says_what_deploy_leaves(project, hub):
    hub.hold = True
    env = {**os.environ, **OFFLINE, "HF_HOME": str(project / ".hf"), **hub.env("hf_alice")}
    proc = subprocess.Popen([PY, "-m", "imagelab.deploy", "pets", "--model", "models/pets.pkl", "--out", "build/space",
                             "--push", "alice/pets"], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    try:
        assert hub.holding.wait(240), "the push never reached its commit"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip() == INTERRUPTED, err
    assert "nothing was exported" not in err and (project / "build" / "space" / MARKER).is_file()
