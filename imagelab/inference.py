"""Classifying images with an exported model: one predictor for every app and the batch CLI.

It runs the model with ONNX Runtime on the learner's exact validation preprocessing, done in NumPy and
PIL: several times faster than fastai's `learn.predict` on a CPU, with the same probabilities (checked
by tests and `benchmarks/inference.py`). It needs neither fastai nor torch when the weights-only
artifacts are beside the model, so an app starts quickly and never unpickles anything.
"""
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from . import UserError
from .paths import artifact_paths
from .hub import resolve_model
from .images import read_image
from .loading import load_trusted_learner


def model_view(im, config):
    """The part of an RGB PIL image the model sees, at the size it sees it."""
    im = im.resize(tuple(config["resize"]), Image.BILINEAR)
    (W, H), (w, h) = config["resize"], config["crop"]
    left, top = (W - w) // 2, (H - h) // 2
    return im.crop((left, top, left + w, top + h))


def preprocess(im, config):
    """RGB PIL image -> 1x3xHxW float32, exactly as the learner's validation pipeline does it."""
    return as_input(model_view(im, config), config)


def as_input(view, config):
    x = np.asarray(view, dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(config["mean"], np.float32)) / np.asarray(config["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def colormap(heat):
    """Values in [0, 1] -> RGB uint8, blue (low) through green to red (high), like matplotlib's jet."""
    rgb = [np.clip(1.5 - np.abs(4 * heat - k), 0, 1) for k in (3, 2, 1)]
    return (np.stack(rgb, -1) * 255).astype(np.uint8)


def overlay(view, heat, alpha=0.5, min_side=224):
    """The heatmap (h×w in [0, 1]) stretched over the model's view of the image (a PIL image), half transparent;
    a small view is enlarged to `min_side` so the picture can be read."""
    scale = max(1, min_side / min(view.size))
    view = view.resize((round(view.width * scale), round(view.height * scale)), Image.BILINEAR)
    heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize(view.size, Image.BILINEAR))
    blended = (1 - alpha) * np.asarray(view, np.float32) + alpha * colormap(np.clip(heat, 0, 1))
    return Image.fromarray(blended.astype(np.uint8))


def _model_from_weights(weights, config):
    """A torch model rebuilt from safetensors: the architecture from timm, no pickle involved."""
    from fastai.vision.learner import create_timm_model
    from safetensors.torch import load_file
    model, _ = create_timm_model(config["arch"], len(config["vocab"]), pretrained=False)
    model.load_state_dict(load_file(weights))
    return model


class Predictor:
    """Loads an exported classifier once; `predict` names what is in one image.

    `path` is the learner (`pets.pkl`) or one of its weights-only artifacts (`pets.onnx`,
    `pets.safetensors`), or `hf://USER/REPO/FILE[@REVISION]`. The artifacts are used whenever they are
    there; the `.pkl` is unpickled only when it is all there is, so pass only a `.pkl` you trust
    (or its learner, `learn`, when the caller has loaded it already). Apps open it through
    `loading.open_model`, which first checks that it is a classifier.

    `tta`: average the probabilities of the image and its mirror image (flip test-time augmentation,
    twice the model's time).
    """

    def __init__(self, path, learn=None, tta=False):
        import onnxruntime as ort
        self.path = path = resolve_model(path)
        paths = artifact_paths(path)
        if paths["config"].is_file() and (paths["onnx"].is_file() or paths["weights"].is_file()):
            self.config = json.loads(paths["config"].read_text())
            graph = paths["onnx"] if paths["onnx"].is_file() else self._onnx(_model_from_weights(paths["weights"], self.config))
        elif path.suffix == ".pkl" and path.is_file():
            from .export import learner_config
            learn = learn or load_trusted_learner(path)
            self.config = learner_config(learn)
            graph = self._onnx(learn.model)
        else:
            raise UserError(f"no model at {path}")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(graph) if isinstance(graph, Path) else graph, opts,
                                            providers=["CPUExecutionProvider"])
        self.vocab, self.tta = self.config["vocab"], tta
        self.has_heatmap = "heatmap" in [o.name for o in self.session.get_outputs()]  # models exported before it lack it
        w, h = self.config["crop"]
        self.session.run(None, {"image": np.zeros((1, 3, h, w), np.float32)})  # warm up now, not on a request

    def _onnx(self, model):
        from .export import to_onnx
        buf = io.BytesIO()
        to_onnx(model, self.config, buf, outputs=("logits", "heatmap"))
        return buf.getvalue()

    def probabilities(self, images):
        """Class probabilities, one row per image (paths or PIL images)."""
        return np.concatenate([self._probabilities(preprocess(read_image(im), self.config)) for im in images])

    def _probabilities(self, x):
        probs = softmax(self.session.run(["logits"], {"image": x})[0])
        if self.tta:
            probs = (probs + softmax(self.session.run(["logits"], {"image": np.ascontiguousarray(x[..., ::-1])})[0])) / 2
        return probs

    def top(self, probs, k):
        return {self.vocab[i]: float(probs[i]) for i in np.argsort(-probs)[:k]}

    def predict(self, image, k=3):
        """Top-`k` labels with probabilities for a path or PIL image, most likely first."""
        return self.top(self.probabilities([image])[0], k)

    def explain(self, image, k=3):
        """`predict`'s labels, the model's view of the image and the predicted class's Grad-CAM heatmap
        (h×w in [0, 1], imagelab.heatmaps) from one run of the graph."""
        if not self.has_heatmap:
            raise UserError(f"{self.path} was exported without a heatmap: retrain it, or export it again")
        view = model_view(read_image(image), self.config)
        x = as_input(view, self.config)
        logits, heat = self.session.run(["logits", "heatmap"], {"image": x})
        probs = self._probabilities(x) if self.tta else softmax(logits)
        return self.top(probs[0], k), view, heat[0]
