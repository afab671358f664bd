"""Running an exported model with ONNX Runtime, for every app and the batch CLI: a classifier's `Predictor`,
an autoencoder's `Reconstructor`.

Each runs the model's ONNX graph on the learner's exact validation preprocessing, done in NumPy and PIL:
faster than fastai's `learn.predict` or the torch model on a CPU, with the same results (checked by tests;
timed by `benchmarks/inference.py` and `benchmarks/autoencoder_serving.py`). Neither needs fastai nor torch
when the weights-only artifacts are beside the model, so an app starts quickly and never unpickles anything.
"""
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from . import UserError, first_line
from .images import MAX_PIXELS, read_image, resize_box
from .loading import AUTOENCODER, CLASSIFIER, load_trusted_learner, local_path, no_model, read_config
from .paths import artifact_paths

# What the apps read from each exported graph: a classifier's (its heatmap: models exported before it lack it),
# an autoencoder's graph of an image, and its graph of a code (`.decoder.onnx`).
CLASSIFIER_OUTPUTS = ("logits", "heatmap")
AUTOENCODER_OUTPUTS = ("reconstruction", "pca", "code")
DECODER_OUTPUTS = ("image",)
# The heatmap over the model's view: half transparent, on a view enlarged to at least this short side to be read.
OVERLAY_ALPHA, OVERLAY_MIN_SIDE = 0.5, 224


def onnx_session(graph):
    """A quiet ONNX Runtime session on the CPU for a graph file (a Path) or the graph's bytes."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(graph) if isinstance(graph, Path) else graph, opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # the graph beside a .pkl or .safetensors given is read too: name the file at fault
        if not isinstance(graph, Path):
            raise
        raise UserError(f"cannot load the ONNX graph {graph} ({first_line(e)}): a damaged file, or one this "
                        "onnxruntime cannot run? Train or export the model again") from None


def output_names(session):
    return [o.name for o in session.get_outputs()]


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
    mean, std = (np.asarray(config[k], np.float32)[:, None, None] for k in ("mean", "std"))
    return (unit_pixels(view) - mean) / std


def unit_pixels(view):
    """An RGB PIL image as 1x3xHxW float32 in [0, 1], as fastai's `ToTensor` and `IntToFloatTensor` make it."""
    x = np.asarray(view, dtype=np.float32) / np.float32(255)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def colormap(heat):
    """Values in [0, 1] -> RGB uint8, blue (low) through green to red (high), like matplotlib's jet."""
    rgb = [np.clip(1.5 - np.abs(4 * heat - k), 0, 1) for k in (3, 2, 1)]
    return (np.stack(rgb, -1) * 255).astype(np.uint8)


def overlay(view, heat):
    """The heatmap (h×w in [0, 1]) stretched over the model's view of the image (a PIL image), half transparent;
    a small view is enlarged to OVERLAY_MIN_SIDE so the picture can be read."""
    scale = max(1, OVERLAY_MIN_SIDE / min(view.size))
    view = view.resize((round(view.width * scale), round(view.height * scale)), Image.BILINEAR)
    heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize(view.size, Image.BILINEAR))
    blended = (1 - OVERLAY_ALPHA) * np.asarray(view, np.float32) + OVERLAY_ALPHA * colormap(np.clip(heat, 0, 1))
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
    twice the model's time). `max_pixels`: the largest image read, for an app's uploads; None for the owner's own
    files (the batch CLI, the cleaner).
    """

    def __init__(self, path, learn=None, tta=False, max_pixels=MAX_PIXELS):
        self.path = path = local_path(path, CLASSIFIER)
        paths, self.config = artifact_paths(path), read_config(path)
        if self.config and paths["onnx"].is_file():
            graph = paths["onnx"]
        elif self.config and paths["weights"].is_file():
            graph = self._onnx(_model_from_weights(paths["weights"], self.config))
        elif path.suffix == ".pkl" and path.is_file():
            from .export import learner_config
            learn = learn or load_trusted_learner(path)
            self.config = learner_config(learn)
            graph = self._onnx(learn.model)
        else:
            raise no_model(path)
        self.session = onnx_session(graph)
        self.vocab, self.tta, self.max_pixels = self.config["vocab"], tta, max_pixels
        self.has_heatmap = "heatmap" in output_names(self.session)
        w, h = self.config["crop"]
        blank = np.zeros((1, 3, h, w), np.float32)
        outputs = dict(zip(output_names(self.session), self.session.run(None, {"image": blank})))  # warm up now
        # A graph and a config of two different exports would serve another model's labels (or fail on the
        # highest): the number of scores, run rather than read from the graph, where it may be left symbolic
        if outputs["logits"].shape[-1] != len(self.vocab):
            raise UserError(f"{graph if isinstance(graph, Path) else path} gives {outputs['logits'].shape[-1]} class "
                            f"scores, but {paths['config']} names {len(self.vocab)} classes: files of two different "
                            "exports? Export the model again")

    def _onnx(self, model):
        from .export import to_onnx
        return to_onnx(model, self.config, outputs=CLASSIFIER_OUTPUTS)

    def probabilities(self, images):
        """Class probabilities, one row per image (paths or PIL images)."""
        return np.concatenate([self._probabilities(preprocess(read_image(im, self.max_pixels), self.config))
                               for im in images])

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
        view = model_view(read_image(image, self.max_pixels), self.config)
        x = as_input(view, self.config)
        logits, heat = self.session.run(["logits", "heatmap"], {"image": x})
        probs = self._probabilities(x) if self.tta else softmax(logits)
        # Graphs exported before heatmaps.py clamped the peak give NaN where the map has no evidence at all.
        return self.top(probs[0], k), view, np.nan_to_num(heat[0])


def square_view(im, size):
    """What an autoencoder sees of an RGB PIL image: fastai's `Resize` at validation, the centre square
    (`resize_box`, fastai's arithmetic) resized bilinearly to size x size."""
    left, top, side, _ = resize_box(im.width, im.height, (size, size))
    return im.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)


def square_input(image, size):
    """A path or PIL image as an autoencoder of `size` takes it: 1x3xSxS float32 in [0, 1], S = `size`."""
    return unit_pixels(square_view(read_image(image), size))


def to_image(x):
    """A 3xHxW array in [0, 1] as an 8-bit RGB PIL image."""
    return Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0))


def psnr(mse):
    """Peak signal-to-noise ratio in dB for pixels on a [0, 1] scale."""
    return 10 * math.log10(1 / mse) if mse != 0 else float("inf")  # NaN stays NaN


class Reconstruction(NamedTuple):
    """An image as the autoencoder sees it, its reconstruction and PCA's (PIL images at the model's size), and the
    PSNRs in dB of both."""
    original: Image.Image
    reconstruction: Image.Image
    psnr: float
    pca: Image.Image
    pca_psnr: float


class Reconstructor:
    """Loads an exported autoencoder once: an image's reconstruction beside PCA's, and the images between two codes.

    `path` is the model's graph of an image (`ae.onnx`, with its graph of a code `ae.decoder.onnx` and
    `ae.config.json` beside it), its weights (`ae.safetensors`) or its learner (`ae.pkl`), or
    `hf://USER/REPO/FILE[@REVISION]`. The two graphs are used whenever they are beside it; otherwise (a model
    exported by an older version) they are made in memory from the weights or, only when that is all there
    is, from the unpickled learner (`learn`, when the caller has loaded it): both need torch.
    """

    def __init__(self, path, learn=None):
        self.path = path = local_path(path, AUTOENCODER)
        paths, config = artifact_paths(path), read_config(path)
        graphs = paths["onnx"], paths["decoder"]
        sessions = None
        if learn is None and config is not None and all(g.is_file() for g in graphs):
            sessions = [onnx_session(g) for g in graphs]
            if not set(AUTOENCODER_OUTPUTS) <= set(output_names(sessions[0])):
                sessions = None  # exported before the graph returned PCA's reconstruction and the code
        if sessions is None:
            from .autoencoder import autoencoder_config, export_graphs, load_autoencoder
            model = load_autoencoder(path, learn)
            config, sessions = autoencoder_config(model), [onnx_session(g) for g in export_graphs(model)]
        self.image_graph, self.code_graph = sessions
        self.size, self.code_size = config["size"], config["code_size"]
        self.run(np.zeros((1, 3, self.size, self.size), np.float32))  # warm up now, not on a request
        self.code_graph.run(None, {"code": np.zeros((1, self.code_size), np.float32)})

    def run(self, x):
        """The graph of an image on `x` (`square_input`'s): {"reconstruction", "pca", "code"}, each a batch of one."""
        return dict(zip(AUTOENCODER_OUTPUTS, self.image_graph.run(AUTOENCODER_OUTPUTS, {"image": x})))

    def reconstruct(self, image):
        """A `Reconstruction` of a path or PIL image, from one run of the graph: the autoencoder's, and PCA's from the
        model's own linear path (PCA of its training images)."""
        x = square_input(image, self.size)
        out = self.run(x)
        y, pca = out["reconstruction"], out["pca"]
        return Reconstruction(to_image(x[0]), to_image(y[0]), psnr(float(((y - x) ** 2).mean())),
                              to_image(pca[0]), psnr(float(((pca - x) ** 2).mean())))

    def interpolate(self, a, b, steps=8):
        """One image: the decodings of `steps` codes evenly spaced from `a`'s code to `b`'s, left to right."""
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"steps must be a whole number, at least 1: not {steps!r}")
        codes = []
        for which, im in (("first", a), ("second", b)):
            try:
                codes.append(self.run(square_input(im, self.size))["code"])
            except UserError as e:  # which of the two
                raise UserError(f"the {which} image: {e}") from None
        code_a, code_b = codes
        frames = []
        for t in np.linspace(0, 1, steps, dtype=np.float32):
            code = (1 - t) * code_a + t * code_b
            frames.append(self.code_graph.run(DECODER_OUTPUTS, {"code": code})[0][0])
        return to_image(np.concatenate(frames, axis=2))
