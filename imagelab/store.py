"""Training batches cut from images decoded once: the data path that keeps a GPU busy.

With `--presize`, every training image is a small JPEG copy; decoding those copies again every epoch,
one by one in Python, is what keeps an accelerator waiting. When they fit in memory, the copies are
decoded once into one uint8 tensor (on the GPU when it fits there, else in pinned memory), and each
batch is cut from it on the training device with the loaders' own crop item transform, computed per
batch: fastai's `RandomResizedCrop` (the classifiers') or its `Resize` crop after `FlipItem` (the
autoencoder's), the same boxes from the same random stream, resized with antialiased bilinear like
Pillow's. A GPU resizes a batch's crops together (`ImageStore.cut`), a CPU one by one. fastai's batch
transforms (`aug_transforms`, `Normalize`) follow as on the file path.
"""
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import TensorCategory, TensorImage
from fastai.data.transforms import Categorize, ToTensor
from fastai.vision.augment import FlipItem, RandomResizedCrop, Resize, ResizeMethod

from .device import copy_to
from .images import open_image, open_rgb, resize_box, val_margin

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


def resampling(lengths, total, first, count, span):
    """`resized`'s weights along one axis, for a batch: each crop's `lengths[b]` pixels resized to `total`, as
    PyTorch's antialiased bilinear interpolate weighs them, for output pixels `first` to `first + count`:
    a `len(lengths)` x `count` x `span` tensor, zero beyond each crop's length."""
    scale = lengths / total
    support = scale.clamp(min=1.0)  # the triangle filter widens with the downscaling factor
    out = torch.arange(first, first + count, device=lengths.device)
    centre = scale[:, None] * (out + 0.5)
    low = (centre - support[:, None] + 0.5).trunc().clamp(min=0)
    high = torch.minimum((centre + support[:, None] + 0.5).trunc(), lengths[:, None])
    j = torch.arange(span, device=lengths.device)
    w = (1 - ((j - centre[..., None] + 0.5) / support[:, None, None]).abs()).clamp(min=0)
    w = w * ((j >= low[..., None]) & (j < high[..., None]))
    return w / w.sum(-1, keepdim=True)


class HeaderMismatch(ValueError):
    """An image whose header states another size than it decodes to."""


def upright_size(f):
    """The (h, w) that `open_rgb` decodes `f` to, from its header: EXIF orientations 5 to 8 turn it a quarter."""
    with open_image(f) as im:
        w, h = im.size
        turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return (w, h) if turned else (h, w)


class ImageStore:
    """Decoded images, each 3 x h x w uint8, in one flat tensor with their offsets and sizes (`shapes`: their
    `upright_size`s, when known)."""

    def __init__(self, files, device, pin=False, workers=8, shapes=None):
        self.shapes = shapes or [upright_size(f) for f in files]
        sizes = [h * w * 3 for h, w in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        widest = max(w for _, w in self.shapes)
        # pinned: copies to the GPU overlap; a row's width of padding: `cut` reads whole rows of the widest crop
        flat = torch.zeros(sum(sizes) + widest, dtype=torch.uint8, pin_memory=pin)

        def decode(i):  # each image straight into its place: memory holds the store, not the store twice
            a = np.array(open_rgb(files[i]))  # a writable copy, which torch.from_numpy takes without a warning
            if a.shape[:2] != self.shapes[i]:
                raise HeaderMismatch(f"{files[i]} decodes to {a.shape[:2]}, not the {self.shapes[i]} its header says")
            flat[self.offsets[i]:self.offsets[i] + sizes[i]].view(3, *self.shapes[i]).copy_(
                torch.from_numpy(a).permute(2, 0, 1))

        with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
            list(pool.map(decode, range(len(files))))
        try:
            self.flat = flat.to(device)
        except torch.OutOfMemoryError:  # another process took the GPU's memory since it was measured
            self.flat = flat  # batches are cut in main memory (not pinned: that would copy the store once more)

    def __len__(self):
        return len(self.shapes)

    def image(self, i):
        h, w = self.shapes[i]
        return self.flat[self.offsets[i]:self.offsets[i] + 3 * h * w].view(3, h, w)

    def cut(self, boxes, total, offset, size):
        """`resized` for a whole batch in a few operations, however many images: `boxes` (image, left, top,
        width, height) resized to `total` (h, w), of which the `size` (h, w) at `offset` (top, left) is kept.

        Each crop's rows are read at the width of the widest crop into one batch (the columns past a crop's
        own width weigh nothing), and resized by two matrix products with `resampling`'s weights. On a GPU,
        where each operation is a kernel launched by the CPU, that replaces a few hundred per batch."""
        device = self.flat.device
        boxes_ = copy_to(torch.tensor([(self.offsets[i], *self.shapes[i], *box) for i, *box in boxes]), device)
        start, h, w, left, top, cw, ch = boxes_.unbind(1)
        span_h, span_w = int(max(b[4] for b in boxes)), int(max(b[3] for b in boxes))
        rows = top[:, None] + torch.minimum(torch.arange(span_h, device=device), ch[:, None] - 1)  # the last row again
        planes = start[:, None] + torch.arange(3, device=device)[None] * (h * w)[:, None]
        starts = planes[:, :, None] + (rows * w[:, None] + left[:, None])[:, None, :]
        x = self.flat.unfold(0, span_w, 1)[starts].float()  # B x 3 x span_h x span_w
        wy = resampling(ch.float(), total[0], offset[0], size[0], span_h)
        wx = resampling(cw.float(), total[1], offset[1], size[1], span_w)
        return wy[:, None] @ x @ wx[:, None].transpose(-1, -2)


def store_device(nbytes, device):
    """Where `nbytes` of decoded images fit: on `device` itself, else in main memory, else None (not in memory).

    Every store is built in main memory, also one bound for the GPU, and each process of a distributed run on
    this machine builds its own."""
    import psutil  # here, not above: an exported learner loads this module, and needs no psutil
    if nbytes >= MEMORY_SHARE * psutil.virtual_memory().available / int(os.environ.get("LOCAL_WORLD_SIZE", 1)):
        return None
    if device.type == "cuda" and nbytes < MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]:
        return device
    return torch.device("cpu")


class RandomResizedCrops:
    """fastai's `RandomResizedCrop` for a batch: a random crop for training; for validation the whole image,
    squashed to the size plus fastai's `val_xtra` margin, whose centre is kept."""

    def __init__(self, crop):
        self.min_scale, self.ratio, self.val_xtra = crop.min_scale, crop.ratio, crop.val_xtra

    def boxes(self, shapes, size, train):
        """Each (h, w) image's (left, top, width, height) crop, the (h, w) it is resized to, the (top, left) of the
        part of `size` (fastai's (width, height)) kept, and which crops are mirrored (None: none)."""
        sw, sh = size
        if train:
            return [crop_box(w, h, self.min_scale, self.ratio) for h, w in shapes], (sh, sw), (0, 0), None
        xtra = val_margin(size, self.val_xtra)
        return [(0, 0, w, h) for h, w in shapes], (sh + xtra, sw + xtra), (xtra // 2, xtra // 2), None


class ResizeCrops:
    """fastai's `Resize` (crop method) for a batch, after `FlipItem` when the loaders have one (its order puts the
    flip first, so its draw comes first): a random box in training, mirrored with probability `flip`; the
    centre box, unmirrored, for validation."""

    def __init__(self, flip=None):
        self.flip = flip

    def boxes(self, shapes, size, train):
        """As `RandomResizedCrops.boxes`."""
        boxes, flips = [], []
        for h, w in shapes:
            flip = train and self.flip is not None and (self.flip == 1.0 or random.random() < self.flip)
            left, top, cw, ch = resize_box(w, h, size, (random.random(), random.random()) if train else (0.5, 0.5))
            boxes.append((w - left - cw if flip else left, top, cw, ch))  # the flipped image's box, in the original
            flips.append(flip)
        return boxes, (size[1], size[0]), (0, 0), flips if any(flips) else None


def item_crops(tfms):
    """The batch version of the loaders' item transforms `tfms` (a `RandomResizedCrops` or `ResizeCrops`) and the
    size they crop to, or None when they do anything else (those loaders read files)."""
    crops = [t for t in tfms if not isinstance(t, ToTensor)]  # in the order they run
    kinds = [type(t) for t in crops]
    if kinds == [RandomResizedCrop]:
        return RandomResizedCrops(crops[0]), crops[0].size
    if kinds in ([Resize], [FlipItem, Resize]) and crops[-1].method == ResizeMethod.Crop:
        return ResizeCrops(crops[0].p if kinds[0] is FlipItem else None), crops[-1].size
    return None


def targets(ds):
    """The labels of a classifier's dataset `ds` as one tensor; None where the target is the input image itself
    (an autoencoder's). Raises ValueError for any other kind of target."""
    x, y = ds.tls[0].tfms.fs, ds.tls[1].tfms.fs
    if any(isinstance(t, Categorize) for t in y):
        return torch.stack([torch.as_tensor(label) for label in ds.tls[1]]).long()  # indexed on the CPU
    if len(x) == len(y) and x[0] is y[0] and [t.name for t in x] == [t.name for t in y]:
        return None  # the same file, decoded the same way
    raise ValueError("a target that is neither a label nor the input")


class StoreDL(DataLoader):
    """A fastai DataLoader whose batches are cut from an `ImageStore` on the device (no item pipeline).

    `crops` (`RandomResizedCrops`, `ResizeCrops`) says where each image's crop lies; `labels` are the targets,
    or None for the input itself (the same crop and flip, as fastai gives an autoencoder). `size` may change
    between epochs (progressive resizing).
    """

    def __init__(self, store, *, labels, crops, size, train, after_batch, device, **kwargs):
        super().__init__(list(range(len(store))), after_batch=after_batch, device=device, **kwargs)
        self.store, self.labels, self.crops, self.size, self.train = store, labels, crops, size, train
        # one batched cut where every operation is a kernel to launch; a CPU computes less resizing image by image
        self.batched = store.flat.device.type != "cpu"

    def cut(self, idxs):
        """The batch's images as floats of uint8 values, B x 3 x h x w."""
        boxes, total, (oy, ox), flips = self.crops.boxes([self.store.shapes[i] for i in idxs], self.size, self.train)
        sh, sw = self.size[1], self.size[0]
        if self.batched:
            x = self.store.cut([(i, *box) for i, box in zip(idxs, boxes)], total, (oy, ox), (sh, sw))
        else:
            x = torch.cat([resized(self.store.image(i)[:, top:top + ch, left:left + cw], total)
                           for i, (left, top, cw, ch) in zip(idxs, boxes)])[..., oy:oy + sh, ox:ox + sw]
        if flips is None:
            return x
        mirrored = copy_to(torch.tensor(flips), x.device)[:, None, None, None]
        return torch.where(mirrored, x.flip(-1), x)  # a mirrored crop, resized, is the resized crop mirrored

    def before_iter(self):
        super().before_iter()
        # fastai's batch transforms take the split from their pipeline, which fastai's own loaders set at every
        # pass (TfmdDL.before_iter): unset, the warps and flips would apply to validation and lighting nowhere.
        self.after_batch.split_idx = 0 if self.train else 1

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
        x = TensorImage(copy_to(pixels(self.cut(idxs)), self.device))
        if self.labels is None:
            return x, TensorImage(x)  # the target is the input; fastai's batch transforms make new tensors of each
        return x, TensorCategory(copy_to(self.labels[idxs], self.device))


def store_loaders(dls, copies):
    """DataLoaders like `dls` (on their device) that cut their batches from the decoded presized `copies` of their
    files; None when the images do not fit in memory, or when the loaders transform items in a way the store
    does not compute (they read files then)."""
    found = item_crops(dls.train.after_item.fs)
    if found is None or not copies:
        return None
    crops, size = found
    try:
        labels = [targets(dl.dataset) for dl in (dls.train, dls.valid)]
    except ValueError:
        return None
    device = torch.device(dls.device or "cpu")
    splits = [(dls.train, True, [copies.get(f, f) for f in dls.train.dataset.items]),
              (dls.valid, False, [copies.get(f, f) for f in dls.valid.dataset.items])]
    shapes = [[upright_size(f) for f in files] for _, _, files in splits]  # headers only
    where = store_device(sum(h * w * 3 for split in shapes for h, w in split), device)
    if where is None:
        return None
    loaders = []
    for (dl, train, files), y, split_shapes in zip(splits, labels, shapes):
        try:
            store = ImageStore(files, where, pin=where.type == "cpu" and device.type == "cuda", shapes=split_shapes)
        except HeaderMismatch:  # the file path decodes whatever a file holds
            return None
        loaders.append(StoreDL(store, labels=y, crops=crops, size=size, train=train, after_batch=dl.after_batch,
                               device=device, bs=dl.bs, shuffle=train, drop_last=train))
    return DataLoaders(*loaders, device=device)
