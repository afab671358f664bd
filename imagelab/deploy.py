"""Publishing a trained model: a self-contained Hugging Face Space folder, and a Hub model repo with its card.

    python -m imagelab.deploy pets --model models/pets.pkl                      # -> build/pets-space/
    python -m imagelab.deploy pets --model models/pets.pkl --push USER/SPACE
    python -m imagelab.deploy pets --model models/pets.pkl --push-model USER/REPO
"""
import argparse
import json
import shutil
from pathlib import Path

import gradio

from . import UserError, run_cli
from .paths import artifact_paths, report_dir
from .hub import require_hub_login

REPO = Path(__file__).resolve().parents[1]
# What each app's Space shows on the Hub, the model files it runs (for classifiers the weights-only ones:
# no pickle) and its main API endpoint.
SPACES = {
    "pets": {"title": "Pet classifier", "emoji": "🐱", "files": ("onnx", "config"), "api": "/predict",
             "about": "Upload a photo of a cat or a dog: a fastai + timm classifier names it."},
    "bears": {"title": "Bear classifier", "emoji": "🐻", "files": ("onnx", "config"), "api": "/predict",
              "about": "Upload a photo of a bear: grizzly, black or teddy? A fastai + timm classifier says."},
    "autoencoder": {"title": "Image autoencoder", "emoji": "🖼️", "files": ("pkl",), "api": "/reconstruct",
                    "about": "Upload a photo: a convolutional autoencoder squeezes it into a short code and "
                             "rebuilds it."},
}
CLASSIFIERS = ("pets", "bears")
LICENSE = "apache-2.0"


def load_metrics(model):
    path = report_dir(model) / "metrics.json"
    if not path.is_file():
        raise UserError(f"no report at {path}: train the model with training/ first")
    return json.loads(path.read_text())


def space_readme(name, metrics):
    spec = SPACES[name]
    front = "\n".join([
        "---", f"title: {spec['title']}", f"emoji: {spec['emoji']}", "colorFrom: indigo", "colorTo: blue",
        "sdk: gradio", f"sdk_version: {gradio.__version__}", 'python_version: "3.11"', "app_file: app.py",
        f"license: {LICENSE}", "pinned: false", "---"])
    score = (f"{metrics['accuracy']:.1%} held-out accuracy" if "accuracy" in metrics
             else f"{metrics['ae_psnr']:.1f} dB held-out PSNR" if "ae_psnr" in metrics else "")
    return (f"{front}\n\n# {spec['title']}\n\n{spec['about']}\n\n"
            f"Model: `{metrics.get('arch', '?')}` {score}; the report is in `models/{name}.report/`.\n\n"
            "Call it from Python:\n\n```python\nfrom gradio_client import Client, handle_file\n"
            f"print(Client(\"USER/SPACE\").predict(handle_file(\"photo.jpg\"), api_name=\"{spec['api']}\"))\n```\n")


def copy_model(name, model, dest, kinds):
    """The model files a Space runs, renamed after the app, plus its report and example images."""
    src = {"pkl": Path(model), **artifact_paths(model)}
    dst = {"pkl": dest / f"{name}.pkl", **artifact_paths(dest / f"{name}.pkl")}
    for kind in kinds:
        if not src[kind].is_file():
            raise UserError(f"missing {src[kind]}: re-export the model with this version of training/")
        shutil.copy2(src[kind], dst[kind])
    shutil.copytree(report_dir(model), dest / f"{name}.report")


def build_space(name, model, out):
    """Write a folder that is a complete Space: app, library, requirements, model, examples, README, LFS rules.

    Built beside `out` and renamed into place, so an interrupted build never leaves half a Space.
    """
    model, out = Path(model), Path(out)
    metrics = load_metrics(model)
    stage = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        shutil.copytree(REPO / "apps" / name, stage, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "imagelab", stage / "imagelab",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyi"))
        (stage / "models").mkdir()
        copy_model(name, model, stage / "models", SPACES[name]["files"])
        shutil.copy2(REPO / ".gitattributes", stage / ".gitattributes")
        (stage / "README.md").write_text(space_readme(name, metrics))
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def _table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def model_card(name, metrics):
    """A Hub model card from the run's metrics.json: data, settings, held-out metrics, use, loading."""
    return (classifier_card if name in CLASSIFIERS else autoencoder_card)(name, metrics)


def _settings(metrics, keys):
    return _table([(k, metrics[k]) for k in keys if k in metrics], ["setting", "value"])


def classifier_card(name, metrics):
    vocab, counts = metrics["vocab"], metrics["counts"]
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    per_class = [(c, counts["train"].get(c, 0), counts["valid"].get(c, 0), pct(metrics["per_class"][c]["precision"]),
                  pct(metrics["per_class"][c]["recall"])) for c in vocab]
    versions = ", ".join(f"{k} {v}" for k, v in metrics.get("versions", {}).items())
    return f"""---
library_name: fastai
license: {LICENSE}
pipeline_tag: image-classification
tags: [fastai, timm, onnx, image-classification]
metrics: [accuracy]
---

# {SPACES[name]['title']}

{SPACES[name]['about']}

## Data

Trained on `{metrics['data']}` (labels from {metrics['labels']} names; task: {metrics['task']}), split
{1 - metrics['valid_pct']:.0%} / {metrics['valid_pct']:.0%} at random with seed {metrics['seed']}.
{counts['skipped']} unreadable files were skipped.

{_table(per_class, ["class", "train images", "held-out images", "precision", "recall"])}

## Model and training

{_settings(metrics, ("arch", "pretrained", "size", "start_size", "min_scale", "epochs", "bs", "lr", "seed",
                     "valid_pct"))}

Trained in {metrics['train_seconds']} s ({metrics['images_per_second']} images/s) with {versions}.

## Held-out metrics

Accuracy **{metrics['accuracy']:.2%}** (error rate {metrics['error_rate']:.2%}, loss {metrics['valid_loss']:.4f})
on {sum(counts['valid'].values())} images.

![Confusion matrix]({name}.report/confusion_matrix.png)

![Top losses]({name}.report/top_losses.png)

## Intended use and limitations

For demos and teaching: naming the {len(vocab)} classes above ({', '.join(vocab)}) in photos like
the training images. It knows nothing else: any other image still gets one of these labels, with a
probability that is not a calibrated confidence. Accuracy is measured on a random held-out split of
the same data; photos from elsewhere (other cameras, crops, lighting) may score lower.

## How to load

Weights only (no pickle runs): `{name}.safetensors` + `{name}.config.json` (+ `{name}.onnx`), with this
project's predictor:

```python
from imagelab.inference import Predictor
predictor = Predictor("hf://USER/REPO/{name}.pkl")   # fetches {name}.onnx + {name}.config.json
print(predictor.predict("photo.jpg"))
```

The full fastai learner (a pickle: load only repos you trust):

```python
from fastai.learner import load_learner
from huggingface_hub import hf_hub_download
learn = load_learner(hf_hub_download("USER/REPO", "{name}.pkl"))
```
"""


def autoencoder_card(name, metrics):
    versions = ", ".join(f"{k} {v}" for k, v in metrics.get("versions", {}).items())
    k, counts = metrics["pca_components"], metrics["counts"]
    scores = _table([("autoencoder", f"{metrics['ae_mse']:.5f}", f"{metrics['ae_psnr']:.2f}"),
                     (f"PCA, {k} components", f"{metrics['pca_mse']:.5f}", f"{metrics['pca_psnr']:.2f}")],
                    ["held-out images", "MSE", "PSNR (dB)"])
    return f"""---
library_name: fastai
license: {LICENSE}
pipeline_tag: image-to-image
tags: [fastai, autoencoder, image-to-image]
metrics: [mse, psnr]
---

# {SPACES[name]['title']}

{SPACES[name]['about']}

## Data

Trained on `{metrics['data']}` ({counts['train']} images; labels ignored), {counts['valid']} held out at random
with seed {metrics['seed']}. {counts['skipped']} unreadable files were skipped.

## Model and training

A convolutional autoencoder: stride-2 convolution blocks down to a code of {metrics['code_size']} numbers,
then upsampling and convolution blocks back to {metrics['size']} x {metrics['size']} RGB.

{_settings(metrics, ("code_size", "depth", "width", "blocks", "loss", "sparsity", "size", "epochs", "bs", "lr", "seed",
                     "valid_pct", "parameters"))}

Trained in {metrics['train_seconds']} s ({metrics['images_per_second']} images/s) with {versions}.

## Held-out metrics

Reconstruction error on the held-out images (pixels in [0, 1]), against PCA with as many components
as the code, fitted on the training images and scored on the same held-out images:

{scores}

MSE ratio autoencoder / PCA: **{metrics['mse_ratio_ae_to_pca']:.3f}** (below 1: the autoencoder is better).

![Reconstructions]({name}.report/reconstructions.png)

![Loss curve]({name}.report/loss_curve.png)

## Intended use and limitations

For demos and teaching: compressing photos like the training images into {metrics['code_size']} numbers
and rebuilding them at {metrics['size']} pixels, and blending two images through their codes. The
reconstructions are blurry by design (a short code, a pixel loss); it is not an image codec, and
images unlike the training data rebuild worse.

## How to load

The fastai learner is a pickle: load only repos you trust.

```python
from huggingface_hub import hf_hub_download
from imagelab.autoencoder import Autoencoder      # this project's library: the model class lives there
ae = Autoencoder(hf_hub_download("USER/REPO", "{name}.pkl"))
original, rebuilt, psnr = ae.reconstruct("photo.jpg")
```
"""


def build_model_repo(name, model, out):
    """A folder for a Hub model repo: the learner, its weights-only artifacts, the report and the card."""
    model, out = Path(model), Path(out)
    metrics = load_metrics(model)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    copy_model(name, model, out, ("pkl", "weights", "config", "onnx") if name in CLASSIFIERS else ("pkl",))
    shutil.copy2(REPO / ".gitattributes", out / ".gitattributes")
    (out / "README.md").write_text(model_card(name, metrics))
    return out


def push(folder, repo_id, repo_type):
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, space_sdk="gradio" if repo_type == "space" else None,
                    exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type=repo_type,
                      commit_message="Upload from imagelab.deploy")
    print(f"pushed {folder} to https://huggingface.co/{'spaces/' if repo_type == 'space' else ''}{repo_id}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m imagelab.deploy", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("app", choices=sorted(SPACES), help="which app")
    p.add_argument("--model", help="trained model (default: models/<app>.pkl)")
    p.add_argument("--out", help="Space folder to write (default: build/<app>-space)")
    p.add_argument("--push", metavar="USER/SPACE", help="upload the Space folder to this Space (created if needed)")
    p.add_argument("--push-model", metavar="USER/REPO",
                   help="also write build/<app>-model with a model card and upload it to this model repo")
    args = p.parse_args(argv)
    if args.push or args.push_model:
        require_hub_login()  # before building anything: offline or logged out is one line, not a half upload
    model = Path(args.model or REPO / "models" / f"{args.app}.pkl")
    if not model.is_file():
        raise UserError(f"no model at {model}: train it first (training/train_{args.app}.py)")
    space = build_space(args.app, model, args.out or Path("build") / f"{args.app}-space")
    print(f"wrote {space}: run it alone with `cd {space} && python app.py`")
    if args.push:
        push(space, args.push, "space")
    if args.push_model:
        repo = build_model_repo(args.app, model, Path("build") / f"{args.app}-model")
        print(f"wrote {repo}")
        push(repo, args.push_model, "model")


if __name__ == "__main__":
    run_cli(main)
