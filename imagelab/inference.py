"""Loading exported models and running them on one uploaded image at a time."""
from pathlib import Path

import torch
from fastai.learner import load_learner
from PIL import Image

from . import UserError
from .autoencoder import preprocessed, psnr, to_pil
from .data import RGBImage, open_rgb

# Refuse images whose header claims more pixels than this before decoding them: a 40000x40000 PNG
# of a few KB would otherwise take gigabytes of memory.
MAX_PIXELS = 40_000_000


def read_image(src):
    """An uploaded file as RGB, or a `UserError` that says in one line why it is not usable."""
    try:
        with Image.open(src) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UserError(f"image too large: {im.width}x{im.height} pixels (limit {MAX_PIXELS:,})")
            return open_rgb(im)
    except UserError:
        raise
    except Exception as e:  # PIL signals unreadable files with many exception types
        raise UserError(f"not a readable image ({type(e).__name__})") from None


class Classifier:
    """An exported fastai learner (`.pkl`), loaded once, classifying one image at a time."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no model at {path}")
        self.learn = load_learner(path, cpu=True)
        self.vocab = [str(v) for v in self.learn.dls.vocab]

    def predict(self, image, k=3):
        """Top-`k` labels with probabilities for a path or PIL image, most likely first."""
        with self.learn.no_bar():
            _, _, probs = self.learn.predict(RGBImage.create(read_image(image)))
        top = probs.argsort(descending=True)[:k]
        return {self.vocab[i]: float(probs[i]) for i in top}


class Autoencoder:
    """An exported autoencoder learner (`.pkl`): reconstructions, and the images between two codes."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no model at {path}")
        self.learn = load_learner(path, cpu=True)
        self.model = self.learn.model.eval()
        self.size = self.model.size

    def prepare(self, image):
        """A path or PIL image as the model sees it: the centre square at the model's size, in [0, 1]."""
        return preprocessed(self.learn.dls, [RGBImage.create(read_image(image))])

    @torch.no_grad()
    def reconstruct(self, image):
        """(original, reconstruction, PSNR in dB), both images at the model's size."""
        x = self.prepare(image)
        y = self.model(x)
        return to_pil(x[0]), to_pil(y[0]), psnr(float(((y - x) ** 2).mean()))

    @torch.no_grad()
    def interpolate(self, a, b, steps=8):
        """One image: the decodings of `steps` codes evenly spaced from `a`'s code to `b`'s, left to right."""
        code_a, code_b = self.model.encode(torch.cat([self.prepare(a), self.prepare(b)]))
        t = torch.linspace(0, 1, steps)[:, None]
        frames = self.model.decode((1 - t) * code_a + t * code_b)
        return to_pil(torch.cat(list(frames), dim=2))
