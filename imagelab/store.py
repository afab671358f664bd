"""Training batches cut from images decoded once: the data path that keeps a GPU busy.

With `--presize`, every training image is a small JPEG copy; decoding those copies again every epoch,
one by one in Python, is what keeps an accelerator waiting. When they fit in memory, the copies are
decoded once into one uint8 tensor (on the GPU when it fits there, else in pinned memory), and each
batch is cut from it on the training device: fastai's `RandomResizedCrop` for training (the same crop
boxes from the same random stream, resized with antialiased bilinear like Pillow's), its squash-and-centre
crop for validation. fastai's batch transforms (`aug_transforms`, `Normalize`) follow as on the file path.
"""
import math
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import Image
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import TensorCategory, TensorImage
from fastai.vision.augment import RandomResizedCrop

from .images import open_rgb

# Share of the free memory (the GPU's, else the machine's) that the decoded images may take.
MEMORY_SHARE = 0.4


def crop_box(w, h, min_scale, ratio, rng=random):
    """fastai's `RandomResizedCrop` crop (left, top, width, height) of a w x h image, drawing from `rng` as it does."""
    for _ in range(10):
        area = rng.uniform(min_scale, 1.0) * w * h
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        nw, nh = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if nw <= w and nh <= h:
            return rng.randint(0, w - nw), rng.randint(0, h - nh), nw, nh
    if w / h < ratio[0]:
        nw, nh = w, int(w / ratio[0])
    elif w / h > ratio[1]:
        nw, nh = int(h * ratio[1]), h
    else:
        nw, nh = w, h
    return (w - nw) // 2, (h - nh) // 2, nw, nh


def resized(image, size):
    """A 3 x h x w uint8 tensor resized to `size` (h, w), antialiased bilinear like Pillow's: 1 x 3 x h x w floats,
    which `pixels` rounds (once for a whole batch: on a GPU every operation is a kernel to launch)."""
    return F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)


def pixels(x):
    """Floats rounded to uint8 pixel values, as Pillow's resize gives them."""
    return x.round_().clamp_(0, 255).to(torch.uint8)


class ImageStore:
    """Decoded images, each 3 x h x w uint8, in one flat tensor with their offsets and sizes."""

    def __init__(self, files, device, pin=False, workers=8):
        with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
            arrays = list(pool.map(lambda f: np.asarray(open_rgb(f)), files))
        self.shapes = [a.shape[:2] for a in arrays]
        sizes = [h * w * 3 for h, w in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        flat = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=pin)  # pinned: copies to the GPU overlap
        for a, o, n in zip(arrays, self.offsets, sizes):
            flat[o:o + n] = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).reshape(-1)
        self.flat = flat.to(device)

    def __len__(self):
        return len(self.shapes)

    def image(self, i):
        h, w = self.shapes[i]
        return self.flat[self.offsets[i]:self.offsets[i] + 3 * h * w].view(3, h, w)


def store_device(files, device):
    """Where the decoded `files` fit: on `device` itself, else in main memory, else None (not in memory)."""
    nbytes = 0
    for f in files:
        with Image.open(f) as im:  # reads the header only
            nbytes += im.width * im.height * 3
    if device.type == "cuda" and nbytes < MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]:
        return device
    if nbytes < MEMORY_SHARE * psutil.virtual_memory().available:
        return torch.device("cpu")
    return None


class StoreDL(DataLoader):
    """A fastai DataLoader whose batches are cut from an `ImageStore` on the device (no item pipeline).

    Training batches are `RandomResizedCrop`s of `size`; validation batches squash each image to size
    plus fastai's `val_xtra` margin and take the centre, as fastai validates. `size` may change between
    epochs (progressive resizing).
    """

    def __init__(self, store, labels, crop, train, after_batch, device, **kwargs):
        super().__init__(list(range(len(store))), after_batch=after_batch, device=device, **kwargs)
        self.store, self.labels, self.train = store, labels, train
        self.size, self.min_scale, self.ratio, self.val_xtra = crop.size, crop.min_scale, crop.ratio, crop.val_xtra

    def crop(self, i):
        image = self.store.image(i)
        h, w = image.shape[1:]
        sw, sh = self.size  # fastai's (width, height)
        if self.train:
            left, top, cw, ch = crop_box(w, h, self.min_scale, self.ratio)
            return resized(image[:, top:top + ch, left:left + cw], (sh, sw))
        xtra = math.ceil(max(sw, sh) * self.val_xtra / 8) * 8
        squashed = resized(image, (sh + xtra, sw + xtra))
        top, left = xtra // 2, xtra // 2
        return squashed[..., top:top + sh, left:left + sw]

    def create_batches(self, samples):
        chunk = []
        for i in samples:
            chunk.append(i)
            if len(chunk) == self.bs:
                yield self.batch(chunk)
                chunk = []
        if chunk and not self.drop_last:
            yield self.batch(chunk)

    def batch(self, idxs):
        x = pixels(torch.cat([self.crop(i) for i in idxs])).to(self.device, non_blocking=True)
        y = self.labels[idxs].to(self.device, non_blocking=True)
        return TensorImage(x), TensorCategory(y)


def store_loaders(dls, copies):
    """DataLoaders like `dls` (a classifier's, on their device) that cut their batches from the decoded
    presized `copies` of their files, or None when the images do not fit in memory."""
    crop = next((t for t in dls.train.after_item.fs if isinstance(t, RandomResizedCrop)), None)
    if crop is None or not copies:
        return None
    device = torch.device(dls.device or "cpu")
    splits = [(dls.train, True, [copies.get(f, f) for f in dls.train.dataset.items]),
              (dls.valid, False, [copies.get(f, f) for f in dls.valid.dataset.items])]
    where = store_device([f for _, _, files in splits for f in files], device)
    if where is None:
        return None
    loaders = []
    for dl, train, files in splits:
        labels = torch.stack([torch.as_tensor(y) for y in dl.dataset.tls[1]]).long().to(where)
        store = ImageStore(files, where, pin=where.type == "cpu" and device.type == "cuda")
        loaders.append(StoreDL(store, labels, crop, train, dl.after_batch, device,
                               bs=dl.bs, shuffle=train, drop_last=train))
    return DataLoaders(*loaders, device=device)
