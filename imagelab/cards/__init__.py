"""What each kind of model (metrics.json "kind") publishes: one module and one model-card template per kind.

`imagelab/cards/<kind>.py` says which model files its Space runs and its model repo carries, and fills its
template `imagelab/cards/<kind>.md` (string.Template: `$name` fields, so the Markdown's braces and code need
no escaping). A fragment `<kind>.<file>.md` is a
card section shown only when the model repo carries that optional file (`$<file>_section`).
"""
from ..paths import FOLDER_SPLIT

# The pip packages each way of loading a model needs: its ONNX graph, or its pickled learner (whose classes live in
# modules that load without the training loop: not accelerate). tests/test_deploy.py runs the cards' code where only
# these, and what they require, can be imported.
PACKAGES = {"onnx": ("onnxruntime", "numpy", "pillow", "huggingface_hub"),
            "pkl": ("torch", "torchvision", "fastai", "timm", "huggingface_hub")}


def table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def settings(metrics, keys):
    """The training settings a run recorded, as a Markdown table (keys it did not record are left out, and
    `valid_pct` where folders held the split)."""
    keys = [k for k in keys if k in metrics and (k != "valid_pct" or split_at_random(metrics))]
    return table([(k, metrics[k]) for k in keys], ["setting", "value"])


def split_at_random(metrics):
    """Whether the run held out images at random (`--valid-pct`, `--seed`), not by `train/` and `valid/` folders."""
    return metrics.get("split") != FOLDER_SPLIT  # absent from runs before folder splits


def held_out(metrics, n):
    """Which `n` images the card's numbers were measured on: the run's split (metrics.json "split")."""
    if split_at_random(metrics):
        return f"{n} images held out ({metrics['valid_pct']:.0%} of the pictures, drawn at random with seed " \
               f"{metrics['seed']})"
    return f"the {n} images of its `valid/` folder held out"


def trained(metrics):
    """How the run went, in a sentence: the epochs it trained (the cap, when a time budget or early stopping ended
    it sooner), whose weights were kept, the time, the speed and the versions."""
    done = metrics.get("epochs_trained", metrics["epochs"])
    # fine-tuning's frozen epoch is one of the run's, not of --epochs (runs before epochs_planned: pretrained)
    cap = metrics.get("epochs_planned", metrics["epochs"] + bool(metrics.get("pretrained")))
    text = f"Trained {done} epoch{'s' * (done != 1)}"
    if metrics.get("time_budget"):
        text += f" in a time budget of {metrics['time_budget']:g} s (at most {cap})"
    elif done != cap:
        text += f" of {cap}"
    if metrics.get("stopped_early"):
        text += ", stopped early (no lower validation loss)"
    if metrics.get("diverged_at_epoch"):
        text += f", stopped when training diverged at epoch {metrics['diverged_at_epoch']} (a loss not a number)"
    if metrics.get("kept_epoch") == 0:
        text += "; the weights are the model's before training (no epoch had a lower validation loss)"
    elif metrics.get("kept_epoch"):
        why = "the lowest validation loss" if metrics.get("kept") == "best" else "the last"
        text += f"; the weights are epoch {metrics['kept_epoch']}'s ({why})"
    versions = ", ".join(f"{k} {v}" for k, v in metrics.get("versions", {}).items())
    # a resumed run that only exported (its last run stopped by a full disk, say) trained no images: no speed
    speed = f" ({metrics['images_per_second']} images/s)" if metrics.get("images_per_second") else ""
    return text + f". {metrics['train_seconds']} s{speed} with {versions}."


def pct(x):
    return "n/a" if x is None else f"{x:.1%}"
