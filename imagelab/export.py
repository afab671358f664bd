"""Putting a trained model on disk so that an interrupted run never leaves a half-written one."""
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .data import open_rgb


def report_dir(model_path):
    """The folder beside a model with its plots, metrics and example images: `pets.pkl` -> `pets.report/`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".report")


def examples_dir(model_path):
    return report_dir(model_path) / "examples"


@contextmanager
def staged_export(model_path):
    """Yield a temporary model path and report folder; move both into place only if the block completes.

    The temporaries sit beside the destination (same filesystem), so each move is an atomic rename:
    a crash or Ctrl-C before the end leaves the previous model and report exactly as they were.
    """
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_model = model_path.with_name(f".{model_path.name}.{os.getpid()}.tmp")
    tmp_report = model_path.with_name(f".{report_dir(model_path).name}.{os.getpid()}.tmp")
    old_report = model_path.with_name(f".{report_dir(model_path).name}.{os.getpid()}.old")
    shutil.rmtree(tmp_report, ignore_errors=True)
    tmp_report.mkdir()
    try:
        yield tmp_model, tmp_report
        os.replace(tmp_model, model_path)
        if report_dir(model_path).exists():
            os.replace(report_dir(model_path), old_report)
        os.replace(tmp_report, report_dir(model_path))
    finally:
        tmp_model.unlink(missing_ok=True)
        shutil.rmtree(tmp_report, ignore_errors=True)
        shutil.rmtree(old_report, ignore_errors=True)


def save_examples(files, get_y, dest, per_class=2, max_side=512):
    """Copy a few held-out images per class as small JPEGs: the app's examples, valid in any Space."""
    dest.mkdir(parents=True, exist_ok=True)
    taken = {}
    for f in files:
        label = str(get_y(f))
        if taken.get(label, 0) >= per_class:
            continue
        im = open_rgb(f)
        im.thumbnail((max_side, max_side))
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
        im.save(dest / f"{safe}_{taken.get(label, 0)}.jpg", quality=90)
        taken[label] = taken.get(label, 0) + 1
    return sorted(dest.glob("*.jpg"))
