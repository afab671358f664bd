"""Learner construction: any timm architecture, pretrained from the Hub or from scratch."""
from functools import partial

import timm
import torch
from fastai.vision.all import (CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat, Normalize, OptimWrapper, accuracy,
                               error_rate, imagenet_stats, vision_learner)

from . import UserError
from .hub import hub_file


def pretrained_weights(arch):
    """Path of the timm checkpoint for `arch`, via the Hub cache, or a clear error offline."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        raise UserError(f"timm has no pretrained weights on the Hub for {arch!r}; pass --no-pretrained")
    hint = "; pass --no-pretrained to train from scratch"
    try:
        return hub_file(cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors", what="pretrained weights")
    except UserError as e:
        raise UserError(f"{e}{hint}") from None


def adamw(params, **hypers):
    """fastai's Adam (decoupled weight decay, its eps and second-moment decay) computed by PyTorch's AdamW.

    PyTorch's fused AdamW updates every parameter in one pass over memory; fastai's Adam runs several
    small kernels per parameter, which on a CPU costs more than the arithmetic (benchmarks/README.md).
    fastai's one-cycle schedule still drives the learning rate and momentum.
    """
    return OptimWrapper(params, opt=partial(torch.optim.AdamW, fused=True, betas=(0.9, 0.99), eps=1e-5), **hypers)


def check_arch(arch):
    if not timm.is_model(arch):
        raise UserError(f"unknown timm architecture {arch!r} (see timm.list_models())")


def classifier_learner(dls, arch, pretrained=True, wd=None, label_smoothing=0.0):
    check_arch(arch)
    extra = {"pretrained_cfg_overlay": {"file": pretrained_weights(arch)}} if pretrained else {}
    if not pretrained:
        # fastai only adds a Normalize for pretrained models; a scratch model trains better on normalised input too
        dls.add_tfms([Normalize.from_stats(*imagenet_stats)], "after_batch")
    loss = LabelSmoothingCrossEntropyFlat(eps=label_smoothing) if label_smoothing else CrossEntropyLossFlat()
    learn = vision_learner(dls, arch, pretrained=pretrained, metrics=[error_rate, accuracy], loss_func=loss, wd=wd,
                           opt_func=adamw, **extra)
    return learn
