"""Classifiers: the Space runs ONNX Runtime on the weights-only export; the model repo has every export."""
from . import held_out, pct, settings, table

SPACE_FILES = ("onnx", "config")  # no pickle: a Space never unpickles, and needs neither torch nor fastai
STATIC_FILES = ("onnx", "config")  # a static Space: the browser runs the ONNX graph
STATIC_PAGE = ("classifier.html", "imagelab.js", "static_space.md")  # its part of web/page.html, script, README
GRAPH_OUTPUTS = ("logits",)  # what the apps and the page need from the graph (the heatmap is optional)
REPO_FILES = ("pkl", "weights", "config", "onnx")
OPTIONAL_FILES = ()


def static_fields(config):
    """The static Space's page and README fields from the model's config.json."""
    return {"first_label": config["vocab"][0], "resize": "x".join(map(str, config["resize"])),
            "crop": "x".join(map(str, config["crop"]))}


def summary(metrics):
    return f"{metrics['accuracy']:.1%} held-out accuracy"


def uncertainty(metrics):
    """' ± SE' of the accuracy (runs before it was recorded: nothing)."""
    se = metrics.get("accuracy_standard_error")
    return "" if se is None else f" ± {se:.1%}"


def chosen(metrics):
    """What the held-out numbers owe to choosing the exported epoch on the same images."""
    if metrics.get("kept") != "best" or metrics.get("kept_epoch") == metrics.get("epochs_trained"):
        return ""
    return (f" These images also chose the exported weights (epoch {metrics['kept_epoch']}'s, the lowest loss on "
            "them, under `--keep best`), which flatters these numbers a little; `--keep last` gives numbers "
            "nothing was chosen by.")


def fields(metrics):
    vocab, counts = metrics["vocab"], metrics["counts"]
    held = sum(counts["valid"].values())
    per_class = [(c, counts["train"].get(c, 0), counts["valid"].get(c, 0), pct(metrics["per_class"][c]["precision"]),
                  pct(metrics["per_class"][c]["recall"])) for c in vocab]
    return {
        "labels": "a sub-folder per class" if metrics["labels"] == "folder" else
                  f"labels from Oxford-style file names, task {metrics['task']}", "skipped": counts["skipped"],
        "held_out": held_out(metrics, held),
        "class_table": table(per_class, ["class", "train images", "held-out images", "precision", "recall"]),
        "settings": settings(metrics, ("arch", "pretrained", "size", "start_size", "min_scale", "epochs", "bs", "lr",
                                       "seed", "valid_pct")),
        "accuracy": f"{metrics['accuracy']:.2%}", "error_rate": f"{metrics['error_rate']:.2%}",
        "uncertainty": uncertainty(metrics), "chosen": chosen(metrics),
        "valid_loss": f"{metrics['valid_loss']:.4f}", "valid_images": held,
        "classes": len(vocab), "vocab": ", ".join(vocab), "arch": metrics["arch"],
    }
