"""fastai's batch augmentation, `aug_transforms`, without its three waits for the GPU in every batch.

Three of fastai's functions make Python read a value that the device computes, so the CPU stops until the
GPU has done all the work queued before it, instead of preparing the next batch meanwhile:
`_grid_sample` reads each batch's zoom to decide on a pre-shrink that only applies when the input is
over twice the output's size (never for batches cut at the output's size); `apply_perspective` reads
whether a coordinate would divide by zero; `solve` is `torch.linalg.solve`, which reads whether a matrix
was singular (the warp's 8 x 8 systems are far from it). The replacements compute the same values
without those reads. Importing this module installs them in fastai; fastai itself could take them.
"""
import torch
import torch.nn.functional as F
from fastai.vision import augment


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


def aug_transforms(**kwargs):
    """fastai's `aug_transforms`, whose affine and warp steps now run the functions above."""
    return augment.aug_transforms(**kwargs)


ORIGINALS = {name: getattr(augment, name) for name in ("_grid_sample", "apply_perspective", "solve")}  # the tests compare
for name in ORIGINALS:
    setattr(augment, name, globals()[name])
