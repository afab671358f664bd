"""fastai's batch augmentation, `aug_transforms`, computing the same values with less work for the CPU.

On a GPU the CPU's part of a batch is what limits training, and fastai's augmentation spends it twice over:

- Three of its functions make Python read a value that the device computes, so the CPU stops until the
  GPU has done all the work queued before it, instead of preparing the next batch meanwhile:
  `_grid_sample` reads each batch's zoom to decide on a pre-shrink that only applies when the input is
  over twice the output's size (never for batches cut at the output's size); `apply_perspective` reads
  whether a coordinate would divide by zero; `solve` is `torch.linalg.solve`, which reads whether a
  matrix was singular (the warp's 8 x 8 systems are far from it).
- Its warp makes the CPU wait for the GPU in another way: it copies four corner points to the device
  from an ordinary tensor, and such a copy waits until all the work queued before it is done.
- It draws each batch's flips, rotations, zooms, warps and lighting from the batch itself, a
  `TensorImage`, so the few hundred small operations that build the matrices go through fastai's
  Python `__torch_function__` one by one. Drawn from a plain view of the same batch, they are the same
  draws on the same device, in the same order, at the cost of plain PyTorch operations.
- Its warp builds each batch's 8 x 8 perspective systems corner by corner, entry by entry, each entry an
  operation of its own, where a few stacked operations build the same systems.

`faster_augmentation()` gives the replacements to fastai for the length of a training run
(imagelab.train.train), in the run's own thread; fastai itself could take them. Outside a run fastai is as it
ships: loading an exported learner changes nothing in it. tests/test_device.py checks that a whole
`aug_transforms` pipeline gives what fastai's own gives.

`--mix`'s `MixUp` and `CutMix` are fastai's callbacks drawing the same pairs and weights, copied to the
device without waiting: fastai's copy each batch's weights and shuffle from ordinary memory, and its CutMix
cuts a box whose corners it computes on the device and then reads to slice.
"""
import threading
from contextlib import contextmanager
from functools import wraps

import torch
import torch.nn.functional as F
from fastai.callback import mixup
from fastai.vision import augment

from .device import copy_to


def _grid_sample(x, coords, mode="bilinear", padding_mode="reflection", align_corners=None):
    """fastai's `_grid_sample`, reading the zoom only when the input is over twice the output's size."""
    if mode == "bilinear":  # fastai's smoother downscaling: shrink first when zooming out of a much larger input
        d = min(x.shape[-2] / coords.shape[-2], x.shape[-1] / coords.shape[-1]) / 2
        if d > 1 and d > 1 / (coords.max() - coords.min()).item() * 2:
            x = F.interpolate(x, scale_factor=1 / d, mode="area", recompute_scale_factor=True)
    return F.grid_sample(x, coords, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def apply_perspective(coords, coeffs):
    """fastai's `apply_perspective`: the batch unwarped if any coordinate would divide by zero, chosen on the device."""
    sz = coords.shape
    coords = coords.view(sz[0], -1, 2)
    coeffs = torch.cat([coeffs, torch.ones_like(coeffs[:, :1])], dim=1).view(coeffs.shape[0], 3, 3)
    coords1 = coords @ coeffs[..., :2].transpose(1, 2) + coeffs[..., 2].unsqueeze(1)
    warped = coords1[..., :2] / coords1[..., 2].unsqueeze(-1)
    return torch.where((coords1[..., 2] == 0.).any(), coords, warped).view(*sz)


def solve(A, B):
    """fastai's `solve` without the singular-matrix check, which copies LAPACK's status to the CPU."""
    return torch.linalg.solve_ex(A, B).result


def find_coeffs(p1, p2):
    """fastai's `find_coeffs` (the warp's perspective from the corners `p1` to `p2`): the same 8 x 8 systems,
    stacked whole instead of entry by entry."""
    u, v, x, y = p1[..., 0], p1[..., 1], p2[..., 0], p2[..., 1]  # (batch, 4 corners)
    one, zero = torch.ones_like(u), torch.zeros_like(u)
    rows = torch.stack([torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1),
                        torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)], 2)  # (batch, 4, 2, 8)
    return solve(rows.reshape(p1.shape[0], 8, 8), p1.reshape(p1.shape[0], 8, 1))


def affine_grid(theta, size, align_corners=None):
    """fastai's `affine_grid` as a plain tensor: the warp's operations on it then skip fastai's type machinery."""
    return F.affine_grid(theta, size, align_corners=align_corners)


def plain(b):
    """What fastai draws from, `b`'s first element: as a plain tensor (a view) when it is an image batch."""
    while isinstance(b, tuple):
        b = b[0]
    return b.as_subclass(torch.Tensor) if isinstance(b, augment.TensorImage) else b  # points keep their img_size


def _draw_mask(x, def_draw, draw=None, p=0.5, neutral=0., batch=False):
    """fastai's `_draw_mask`, as plain a tensor as what it is drawn from."""
    mask = ORIGINALS[augment, "_draw_mask"](x, def_draw, draw, p, neutral, batch)
    return mask if isinstance(x, augment.TensorBase) else mask.as_subclass(torch.Tensor)


def affine_before_call(self, b, split_idx):
    ORIGINALS[augment.AffineCoordTfm, "before_call"](self, plain(b), split_idx)


def lighting_before_call(self, b, split_idx):
    ORIGINALS[augment.SpaceTfm, "before_call"](self, plain(b), split_idx)


def warp_before_call(self, x):
    """fastai's `_WarpCoord.before_call` (the warp's random corners), its fixed corners copied without waiting."""
    x_t = augment._draw_mask(x, self._def_draw, self.draw_x, p=self.p, batch=self.batch)
    y_t = augment._draw_mask(x, self._def_draw, self.draw_y, p=self.p, batch=self.batch)
    orig_pts = copy_to(torch.tensor([[-1, -1], [-1, 1], [1, -1], [1, 1]], dtype=x.dtype), x.device)
    self.orig_pts = orig_pts.unsqueeze(0).expand(x.size(0), 4, 2)
    targ_pts = torch.stack([torch.stack([-1 - y_t, -1 - x_t]), torch.stack([-1 + y_t, 1 + x_t]),
                            torch.stack([1 + y_t, -1 + x_t]), torch.stack([1 - y_t, 1 - x_t])])
    self.targ_pts = targ_pts.permute(2, 0, 1)


class MixUp(mixup.MixUp):
    """fastai's `MixUp`: each image blended with another of the batch, the labels' losses in the same shares."""

    def before_batch(self):
        lam = self.distrib.sample((self.y.size(0),))
        self.lam = copy_to(torch.stack([lam, 1 - lam], 1).max(1)[0], self.x.device)
        shuffle = copy_to(torch.randperm(self.y.size(0)), self.x.device)
        self.yb1 = tuple(y[shuffle] for y in self.yb)
        weight = self.lam.view(-1, *[1] * (self.x.dim() - 1))
        self.learn.xb = tuple(torch.lerp(x[shuffle], x, weight) for x in self.xb)
        if not self.stack_y:
            self.learn.yb = tuple(torch.lerp(y1, y, self.lam.view(-1, *[1] * (y.dim() - 1)))
                                  for y1, y in zip(self.yb1, self.yb))


class CutMix(mixup.CutMix):
    """fastai's `CutMix`: a box of each image replaced by the same box of another, the labels' losses shared
    as the areas are. The box is drawn on the CPU (as fastai draws it) and cut with Python numbers."""

    def before_batch(self):
        bs, _, H, W = self.x.size()
        lam = self.distrib.sample((1,))
        shuffle = copy_to(torch.randperm(bs), self.x.device)
        xb1, self.yb1 = self.x[shuffle], (self.y[shuffle],)
        x1, y1, x2, y2 = self.rand_bbox(W, H, lam)
        self.learn.xb[0][..., y1:y2, x1:x2] = xb1[..., y1:y2, x1:x2]
        self.lam = 1 - (x2 - x1) * (y2 - y1) / (W * H)
        if not self.stack_y:
            self.learn.yb = tuple(torch.lerp(y1_, y, self.lam) for y1_, y in zip(self.yb1, self.yb))

    def rand_bbox(self, W, H, lam):
        cut_w, cut_h = (int(torch.round(side * torch.sqrt(1.0 - lam))) for side in (W, H))
        cx, cy = int(torch.randint(0, W, (1,))), int(torch.randint(0, H, (1,)))
        return (min(max(cx - cut_w // 2, 0), W), min(max(cy - cut_h // 2, 0), H),
                min(max(cx + cut_w // 2, 0), W), min(max(cy + cut_h // 2, 0), H))


REPLACEMENTS = {(augment, "_grid_sample"): _grid_sample, (augment, "apply_perspective"): apply_perspective,
                (augment, "solve"): solve, (augment, "find_coeffs"): find_coeffs,
                (augment, "affine_grid"): affine_grid, (augment, "_draw_mask"): _draw_mask,
                (augment.AffineCoordTfm, "before_call"): affine_before_call,
                (augment.SpaceTfm, "before_call"): lighting_before_call,
                (augment._WarpCoord, "before_call"): warp_before_call}
ORIGINALS = {(owner, name): getattr(owner, name) for owner, name in REPLACEMENTS}


def _either(key, ours):
    theirs = ORIGINALS[key]

    @wraps(theirs)
    def either(*args, **kwargs):
        return (ours if getattr(_thread, "ours", False) else theirs)(*args, **kwargs)
    return either


# Installed while any run trains; each thread then gets the augmentation that its own run asked for, so a run
# beside another in the same process (train_speed's course recipe beside ours) keeps fastai's as it ships.
EITHER = {key: _either(key, ours) for key, ours in REPLACEMENTS.items()}
_thread = threading.local()
_lock = threading.Lock()
_runs = 0


def install(functions):
    for (owner, name), f in functions.items():
        setattr(owner, name, f)


@contextmanager
def _augmentation(ours):
    global _runs
    with _lock:
        if _runs == 0:
            install(EITHER)
        _runs += 1
    before, _thread.ours = getattr(_thread, "ours", False), ours
    try:
        yield
    finally:
        _thread.ours = before
        with _lock:
            _runs -= 1
            if _runs == 0:
                install(ORIGINALS)


def faster_augmentation():
    """fastai's augmentation computed by the functions above in this thread (also a decorator)."""
    return _augmentation(True)


def fastais_own():
    """fastai's augmentation as fastai ships it in this thread, for the tests and benchmarks that compare."""
    return _augmentation(False)
