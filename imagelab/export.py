"""Putting a trained model on disk: all or nothing, with a weights-only copy that loads without pickle."""
import copy
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from . import UserError, noted_interrupts
from .images import open_rgb, val_margin
from .loading import CLASSIFIER, FORMAT
from .paths import EXAMPLE_SUFFIX, artifact_paths, check_replaceable, report_dir
from .writes import INSTALLING, PREVIOUS, staging_path, undo_install


@contextmanager
def staged_export(model_path):
    """Yield a temporary model path and report folder; move everything into place only if the block completes.

    The block writes into a hidden folder beside the destination (same filesystem, so every move is an
    atomic rename): a crash or Ctrl-C before the end leaves the previous model and report as they were.
    Whatever else the block writes beside the temporary model (its weights-only artifacts) moves too.
    """
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    stage = staging_path(model_path)
    shutil.rmtree(stage, ignore_errors=True)
    tmp_model, tmp_report = stage / model_path.name, stage / report_dir(model_path).name
    tmp_report.mkdir(parents=True)
    with noted_interrupts() as ctrl_c:
        try:
            yield tmp_model, tmp_report
            ctrl_c.check()  # one that Python dropped (raised inside a finalizer) was noted all the same
            ctrl_c.held = True
            try:
                install(stage, model_path, between_moves=ctrl_c.check)
            finally:
                ctrl_c.held = False
            # One noted after install's last look came once the new model stood, whole: the run has exported, and
            # ends as it would have a moment later (stopping it now would say nothing was exported)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def install(stage, model_path, between_moves=lambda: None):
    """Move everything in `stage` beside `model_path`, the learner last (whoever sees the new .pkl also sees the
    artifacts and the report made with it). A file replaces its previous version in one step, so its name always
    holds a whole file; if a move fails or is interrupted, every previous version is put back: all or nothing.
    A process killed meanwhile cannot put them back: its journal in `stage` lets the next run, or app, that finds
    it do so (imagelab.writes.undo_install). `between_moves` is called before each move and after the last: what it
    raises stops the install, undone."""
    folder = model_path.parent
    new = sorted(stage.iterdir(), key=lambda f: (f.name == model_path.name, f.name))
    for f in new:  # checked before the run trained, but the disk may have changed since
        check_replaceable(model_path, folder / f.name, f.is_dir())
    previous, journal = stage / PREVIOUS, stage / INSTALLING
    previous.mkdir()
    try:
        journal.write_text(json.dumps({"names": [f.name for f in new],
                                       "had": [f.name for f in new if (folder / f.name).exists()]}))
        for f in new:
            between_moves()
            dest = folder / f.name
            if dest.is_dir():  # a folder cannot replace another in one step: the old one steps aside first
                os.replace(dest, previous / f.name)
            elif dest.exists():
                keep_version(dest, previous / f.name)
            os.replace(f, dest)
        between_moves()
        journal.unlink()  # the end of the install: from here on the new model stands
    except BaseException as e:
        undo_install(stage)
        if isinstance(e, OSError):
            raise UserError(f"cannot export into {folder}: {e.strerror}; the previous model is as it was") from None
        raise


def keep_version(path, copy):
    """`copy` holds what `path` holds: a second name for the same file (no data copied), else a copy."""
    try:
        os.link(path, copy)
    except OSError:  # a filesystem without hard links
        shutil.copy2(path, copy)


def learner_config(learn):
    """Everything needed to run a classifier without fastai: classes and the learner's exact validation preprocessing.

    fastai's `RandomResizedCrop` validates by squashing the whole image to size + `val_xtra` and taking the
    centre `size` crop; then pixels go to [0, 1] and are normalised.
    """
    from fastai.vision.all import Normalize, RandomResizedCrop
    crop = next(t for t in learn.dls.after_item.fs if isinstance(t, RandomResizedCrop))
    norm = next(t for t in learn.dls.after_batch.fs if isinstance(t, Normalize))
    w, h = crop.size
    xtra = val_margin(crop.size, crop.val_xtra)
    arch = learn.model[0].model.pretrained_cfg["architecture"]  # fastai's TimmBody wraps the timm model
    return {"format": FORMAT[CLASSIFIER], "kind": CLASSIFIER, "arch": arch, "vocab": [str(v) for v in learn.dls.vocab],
            "resize": [w + xtra, h + xtra], "crop": [w, h],
            "mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()}


def input_shape(config):
    """(1, 3, H, W): the one image an exported graph takes."""
    w, h = config.get("crop") or (config["size"], config["size"])
    return 1, 3, h, w


def cpu_copy(model):
    """The model in float32 on the CPU, wherever it trained: exports must not depend on the training device."""
    return copy.deepcopy(model).float().cpu().eval()


class GlobalMaxPool(torch.nn.Module):
    """`AdaptiveMaxPool2d(1)` (fastai's head pools with it) as the plain maximum it is.

    Older ONNX exporters (torch 2.11 with its onnxscript) have no `adaptive_max_pool2d` and fail on it.
    """

    def forward(self, x):
        return x.amax(dim=(2, 3), keepdim=True)


def exportable(model):
    """`model` (changed in place) with every global adaptive max pool a `GlobalMaxPool`: the same function."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.AdaptiveMaxPool2d) and child.output_size in (1, (1, 1)) \
                    and not child.return_indices:
                setattr(module, name, GlobalMaxPool())
    return model


def to_onnx(model, config, f=None, outputs=("logits",), inputs=None):
    """The model as an ONNX graph for one image at a time (input `image`), into the path `f`, or returned as bytes;
    `inputs` ({name: an example}) for a graph that takes something else (an autoencoder's decoder: a code).

    A classifier's graph can also return the predicted class's Grad-CAM (outputs "logits", "heatmap").

    A fixed batch of one: some timm models (ConvNeXt) do not export with a dynamic batch, and the
    apps run one upload per request anyway.
    """
    if "heatmap" in outputs:
        from .heatmaps import WithHeatmap
        model = WithHeatmap(model)
    inputs = inputs or {"image": torch.zeros(input_shape(config))}
    proto = torch.onnx.export(exportable(cpu_copy(model)), tuple(inputs.values()), dynamo=True, verbose=False,
                              input_names=list(inputs), output_names=list(outputs)).model_proto
    # The exporter notes each node's Python stack and module names: the trainer's disk paths, in a published file
    for node in [*proto.graph.node, *(n for function in proto.functions for n in function.node)]:
        del node.metadata_props[:]
        node.doc_string = ""
    data = proto.SerializeToString()
    if f is None:
        return data
    Path(f).write_bytes(data)


def export_weights_only(model, config, model_path):
    """Write the safetensors weights and the JSON config beside `model_path` (its ONNX graph is the task's to write)."""
    from safetensors.torch import save
    paths = artifact_paths(model_path)
    # written as bytes, like every other file: safetensors' save_file makes its file readable by its owner alone
    paths["weights"].write_bytes(save({k: v.contiguous() for k, v in cpu_copy(model).state_dict().items()}))
    paths["config"].write_text(json.dumps(config, indent=2) + "\n")


EXAMPLE_SIDE = 512  # pixels: plenty for an example's thumbnail and for the model, small in a Space's repo


def save_examples(files, get_y, dest, per_class=2):
    """Copy a few held-out images per class as small JPEGs: the app's examples, valid in any Space."""
    dest.mkdir(parents=True, exist_ok=True)
    taken = {}
    for f in files:
        label = str(get_y(f))
        if taken.get(label, 0) >= per_class:
            continue
        im = open_rgb(f)
        im.thumbnail((EXAMPLE_SIDE, EXAMPLE_SIDE))
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
        im.save(dest / f"{safe}_{taken.get(label, 0)}{EXAMPLE_SUFFIX}", quality=90)
        taken[label] = taken.get(label, 0) + 1
