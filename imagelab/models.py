"""Learner construction: any timm architecture, pretrained from the Hub or from scratch, and what every learner
of this project keeps (its optimizer, two callbacks). An exported learner refers to this module, which loads
without the training loop and its distributed stack (accelerate)."""
from functools import cache, partial

import timm
import torch
from fastai.callback.core import Callback
from fastai.learner import AvgLoss, AvgMetric, AvgSmoothLoss
from fastai.torch_core import find_bs, to_detach
from fastai.vision.all import (CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat, Normalize, OptimWrapper, accuracy,
                               error_rate, imagenet_stats, vision_learner)

from . import UserError
from .hub import hub_file


@cache  # asked for before the images are read (Classifier.check) and again by the learner: one Hub request
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


class FusedAdamW(OptimWrapper):
    """fastai's Adam computed by PyTorch's fused AdamW, which updates every parameter in one pass over memory
    (fastai's Adam runs several small kernels per parameter, which on a CPU costs more than the arithmetic:
    benchmarks/README.md). fastai's schedules still drive the learning rate and momentum.

    AdamW's own weight decay would hit every parameter; fastai decays only those its learner marks
    (`wd_bn_bias=False`: not batch norm's, not the biases). So the decay, decoupled as in both, is applied
    here to the marked parameters, and AdamW's is off for the step.

    With fp16's loss scaling, `GradScaler.step` sets `grad_scale` and `found_inf` (1 if the gradients
    overflowed), tensors on the device: the fused step unscales with the one and is skipped by the other,
    and so is the decay, without the CPU ever reading either.
    """
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None):
        scale, overflow = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        decays = [pg["weight_decay"] for pg in self.opt.param_groups]
        for pg, wd in zip(self.opt.param_groups, decays):
            decayed = [p for p in pg["params"] if p.grad is not None and self.state[p].get("do_wd", True)]
            if decayed and wd:
                rate = pg["lr"] * wd
                torch._foreach_mul_(decayed, 1 - rate if overflow is None else 1 - rate * (1 - overflow))
            pg["weight_decay"] = 0.0
        self.opt.grad_scale, self.opt.found_inf = scale, overflow
        try:
            return self.opt.step(closure)
        finally:
            self.opt.grad_scale = self.opt.found_inf = None
            for pg, wd in zip(self.opt.param_groups, decays):
                pg["weight_decay"] = wd


def adamw(params, **hypers):
    """fastai's Adam (decoupled weight decay, its eps and second-moment decay): `FusedAdamW`."""
    return FusedAdamW(params, opt=partial(torch.optim.AdamW, fused=True, betas=(0.9, 0.99), eps=1e-5), **hypers)


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
    learn = vision_learner(dls, arch, pretrained=pretrained, metrics=[DeviceAvgMetric(error_rate),
                           DeviceAvgMetric(accuracy)], loss_func=loss, wd=wd, opt_func=adamw, **extra)
    return learn


class PlainTensors(Callback):
    """The training batch enters the model as plain tensors.

    fastai's tensor types (TensorImage and the like) send every operation through a Python
    `__torch_function__`: through a whole network that is CPU time on every step, which a GPU spends
    waiting. The batch keeps its types in the loaders, whose transforms dispatch on them, and outside
    training, where fastai decodes the inputs it predicted on.
    """
    order = 100  # after every callback that changes the batch (MixUp, CutMix, channels-last)

    def before_batch(self):
        if self.training:
            self.learn.xb = tuple(x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x for x in self.xb)


class SmoothLoss(AvgSmoothLoss):
    """fastai's smoothed training loss, kept on the training device.

    fastai's copies the loss to the CPU after every batch: on a GPU that makes the CPU wait for each step
    to finish before it prepares the next batch, instead of working one step ahead of the GPU.
    """

    def accumulate(self, learn):
        self.count += 1
        loss = to_detach(learn.loss.mean(), cpu=False)  # gathered across processes, as fastai's
        self.val = torch.lerp(loss, self.val.to(loss), self.beta)


def add_on_device(metric, learn, value):
    """Add a batch's `value` to `metric`'s total where it was computed: fastai's AvgLoss and AvgMetric copy each to the
    CPU, which on a GPU makes the CPU wait for every held-out batch, once for the loss and once for each metric,
    instead of queueing the next. The epoch's value is read once, at its end."""
    bs = find_bs(learn.yb)
    metric.total += learn.to_detach(value, cpu=False) * bs  # gathered across processes, as fastai's
    metric.count += bs


class DeviceAvgLoss(AvgLoss):
    """fastai's held-out loss (the Recorder's `loss`), summed on the device (`add_on_device`)."""

    def accumulate(self, learn):
        add_on_device(self, learn, learn.loss.mean())


class DeviceAvgMetric(AvgMetric):
    """fastai's average of `func` over the held-out batches, summed on the device (`add_on_device`)."""

    def accumulate(self, learn):
        add_on_device(self, learn, self.func(learn.pred, *learn.yb))
