"""Autoencoders: the Space runs ONNX Runtime on the two graphs (an image's reconstruction, PCA's and code; a code's
image), and so does a static Space's page in the browser; the model repo adds the weights-only export when there
is one."""
from ..inference import AUTOENCODER_OUTPUTS
from . import held_out, settings, table

SPACE_FILES = ("onnx", "config", "decoder")  # no pickle: a Space never unpickles, and needs neither torch nor fastai
STATIC_FILES = ("onnx", "config", "decoder")
STATIC_PAGE = ("autoencoder.html", "autoencoder.js", "static_space_autoencoder.md")
GRAPH_OUTPUTS = AUTOENCODER_OUTPUTS  # what the apps and the page read from the image's graph
REPO_FILES = ("pkl",)
# exported by newer training runs: the card's ONNX section needs them (the decoder: a static Space's walk between codes)
OPTIONAL_FILES = ("weights", "config", "onnx", "decoder")


def static_fields(config):
    """The static Space's page and README fields from the model's config.json."""
    return {"size": config["size"], "code_size": config["code_size"]}


def summary(metrics):
    return f"{metrics['ae_psnr']:.1f} dB held-out PSNR"


def chosen(metrics):
    """What the ratio owes to choosing the exported epoch on the images it is scored on: the last epoch's beside it."""
    kept, last, curve = metrics.get("kept_epoch"), metrics.get("epochs_trained"), dict(metrics["mse_ratio_per_epoch"])
    if metrics.get("kept") != "best" or kept == last or last not in curve:
        return ""
    which = "the model's before training, PCA's" if kept == 0 else f"epoch {kept}'s"
    return (f" The exported weights ({which}, under `--keep best`) were chosen by their loss on these held-out "
            f"images, which favours them; the last epoch's ratio was {curve[last]:.3f} (the curve below).")


def fields(metrics):
    k, counts = metrics["pca_components"], metrics["counts"]
    fewer = "" if k == metrics["code_size"] else \
        f" (fewer than the code's {metrics['code_size']} numbers: {counts['train']} training images give no more)"
    scores = table([("autoencoder", f"{metrics['ae_mse']:.5f}", f"{metrics['ae_psnr']:.2f}"),
                    (f"PCA, {k} components", f"{metrics['pca_mse']:.5f}", f"{metrics['pca_psnr']:.2f}")],
                   ["held-out images", "MSE", "PSNR (dB)"])
    return {
        "train_images": counts["train"], "valid_images": counts["valid"], "skipped": counts["skipped"],
        "held_out": held_out(metrics, counts["valid"]),
        "code_size": metrics["code_size"], "size": metrics["size"], "scores": scores,
        "settings": settings(metrics, ("code_size", "depth", "width", "blocks", "loss", "sparsity", "size", "epochs",
                                       "bs", "lr", "seed", "valid_pct", "parameters")),
        "mse_ratio": f"{metrics['mse_ratio_ae_to_pca']:.3f}", "chosen": chosen(metrics),
        "pca": f"{k} components" + fewer,
    }
