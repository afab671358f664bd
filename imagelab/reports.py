"""What a training run shows: loss curve, confusion matrix, top losses with their heatmaps and metrics.json."""
import random
import time
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")  # files only: training runs on servers and in CI without a display
import matplotlib.pyplot as plt
import numpy as np
import torch
from fastai.interpret import ClassificationInterpretation

from . import standard_error

SHOWN = 9  # held-out images in the report's top-losses and heatmap grids (all of them, if fewer)


def save_fig(fig, path):
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_loss_curve(history, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    if history.train:
        ax.plot(*zip(*history.train), label="train (smoothed)")
    if history.valid:
        ax.plot(*zip(*history.valid), "o-", label="valid")
    ax.set(xlabel="step", ylabel="loss", title="Training loss")
    ax.legend()
    save_fig(fig, path)


def plot_lr_find(found, path):
    """lr_find's smoothed loss against the learning rate, the rate it chose marked (`found`: resolve_lr's)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(found["lrs"], found["losses"])
    ax.axvline(found["lr"], color="red", linestyle="--", label=f"chosen: {found['lr']:.2e} (fastai's valley)")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="loss (smoothed)", title="lr_find")
    ax.legend()
    save_fig(fig, path)


def confusion(targets, predicted, n):
    cm = np.zeros((n, n), dtype=int)
    np.add.at(cm, (targets, predicted), 1)
    return cm


def plot_confusion(cm, vocab, path):
    n = len(vocab)
    side = max(4, 0.35 * n + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="Predicted", ylabel="Actual", title="Confusion matrix")
    ax.set_xticklabels(vocab, rotation=90)
    ax.set_yticklabels(vocab)
    for i, j in np.ndindex(cm.shape):
        ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=8 if n > 10 else 11,
                color="white" if cm[i, j] > cm.max() / 2 else "black")
    save_fig(fig, path)


def per_class(cm, vocab):
    out = {}
    for i, name in enumerate(vocab):
        tp, predicted, actual = cm[i, i], cm[:, i].sum(), cm[i].sum()
        out[name] = {"precision": float(tp / predicted) if predicted else None,
                     "recall": float(tp / actual) if actual else None, "support": int(actual)}
    return out


def plot_heatmaps(learn, dl, probs, targets, losses, path, k):
    """The `k` top-loss images beside the predicted class's Grad-CAM (imagelab.heatmaps), as the app shows it."""
    from .export import cpu_copy, learner_config
    from .heatmaps import WithHeatmap
    from .images import open_rgb
    from .inference import as_input, model_view, overlay
    config, model, vocab = learner_config(learn), WithHeatmap(cpu_copy(learn.model)), learn.dls.vocab
    top = losses.argsort(descending=True)[:k].tolist()
    fig, axes = plt.subplots(len(top), 2, figsize=(5, 2.6 * len(top)), squeeze=False)
    for row, i in zip(axes, top):
        view = model_view(open_rgb(dl.items[i]), config)
        with torch.no_grad():
            heat = model(torch.from_numpy(as_input(view, config)))[1][0].numpy()
        predicted = int(probs[i].argmax())
        row[0].imshow(view)
        row[0].set_title(f"actual: {vocab[int(targets[i])]}", fontsize=9)
        row[1].imshow(overlay(view, heat))
        row[1].set_title(f"predicted: {vocab[predicted]} ({float(probs[i, predicted]):.2f}), loss {float(losses[i]):.2f}",
                         fontsize=9)
        for ax in row:
            ax.axis("off")
    fig.suptitle("Top losses: where the model looked for its answer (Grad-CAM)")
    fig.tight_layout()
    save_fig(fig, path)


@contextmanager
def drawn_from(seed, device):
    """Python's and PyTorch's random streams (the CPU's, and `device`'s on a GPU) seeded for the block, as they were
    after it: fastai's augmentation draws from them."""
    state, gpu = random.getstate(), [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpu):
        random.seed(seed)
        torch.default_generator.manual_seed(seed)
        if gpu:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


@torch.no_grad()
def mirror_averaged(learn, dl, probs):
    """`probs` averaged with the mirror images': the TTA that `Predictor(tta=True)` (`predict --tta`) serves."""
    learn.model.eval()
    mirrored = torch.cat([learn.loss_func.activation(learn.model(x.flip(-1))).float().cpu() for x, _ in dl])
    return (probs + mirrored) / 2


def classifier_report(learn, history, report_dir):
    """Write the plots into `report_dir` and return the held-out metrics."""
    dl = learn.dls.valid.new(shuffle=False, drop_last=False)
    probs, targets, losses = learn.get_preds(dl=dl, with_loss=True)
    vocab = list(learn.dls.vocab)
    cm = confusion(targets.numpy(), probs.argmax(1).numpy(), len(vocab))
    plot_confusion(cm, vocab, report_dir / "confusion_matrix.png")
    plot_loss_curve(history, report_dir / "loss_curve.png")
    shown = min(SHOWN, len(losses))
    ClassificationInterpretation(learn, dl, losses).plot_top_losses(shown, figsize=(9, 9))
    save_fig(plt.gcf(), report_dir / "top_losses.png")
    plot_heatmaps(learn, dl, probs, targets, losses, report_dir / "heatmaps.png", shown)
    accuracy = float(np.trace(cm) / cm.sum())
    start = time.perf_counter()
    # the same augmentation every time: a report of the same model says the same
    with learn.no_bar(), drawn_from(0, dl.device or torch.device("cpu")):
        tta_probs, _ = learn.tta(dl=dl)  # fastai's: 4 passes with the training augmentation, blended with the plain one
    return {"accuracy": accuracy, "accuracy_standard_error": standard_error(accuracy, len(targets)),
            "error_rate": 1 - accuracy, "valid_loss": float(losses.mean()),
            "mirror_tta_accuracy": float((mirror_averaged(learn, dl, probs).argmax(1) == targets).float().mean()),
            "tta_accuracy": float((tta_probs.argmax(1) == targets).float().mean()),
            "tta_seconds": round(time.perf_counter() - start, 2),
            "per_class": per_class(cm, vocab), "confusion_matrix": cm.tolist(), "vocab": vocab}

