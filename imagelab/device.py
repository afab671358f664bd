"""Where a run trains and in which number format: `--device` and `--precision`.

Training may run on any torch device; everything that leaves a run (the learner, its weights-only
artifacts, checkpoints) is made so that a CPU-only machine can load it.
"""
import os

import torch
from fastai.callback.fp16 import AMPMode, MixedPrecision

from . import UserError
from .config import check_device_name, check_precision_name


def mps_available():
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name="auto"):
    """The torch device `--device` names; `auto` takes the best there is (a CUDA GPU, Apple's MPS, the CPU).

    Under a distributed launcher (torchrun, accelerate launch) each process takes the GPU of its
    LOCAL_RANK, and makes it the current one: fastai and NCCL use the current device.
    """
    check_device_name(name)
    asked = name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: PyTorch sees no CUDA GPU on this machine; use --device cpu "
                            f"(or auto)")
        count = torch.cuda.device_count()
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0)) % count
        if index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if device.type == "mps" and not mps_available():
        raise UserError("--device mps: PyTorch sees no Apple GPU (MPS) here; use --device cpu (or auto)")
    if device.type == "mps" and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # Accelerate would put the model on the CPU
        raise UserError(f"--device {asked}: Apple's GPU (MPS) trains in one process: run the script without the "
                        "launcher, or with --device cpu")
    return device


def cpu_has_bf16():
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere PyTorch emulates it, slowly."""
    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def cuda_has_bf16(device):
    """Whether this GPU computes bfloat16 natively (Ampere and later). PyTorch's `is_bf16_supported()` also says
    yes where it is only emulated (a T4, a P100), slowly."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def pick_precision(name, device):
    """'fp32', 'bf16' or 'fp16' for `--precision` on `device`.

    auto: bf16 autocast on GPUs that have it (same range as fp32, no loss scaling), fp16 with loss
    scaling on older GPUs, fp32 on CPUs and MPS. A CPU that computes bf16 natively trains faster in bf16 while
    nothing else computes beside it, and several times slower once something does (its many more short parallel
    steps each wait for a thread the other program holds up), where fp32 hardly notices: bf16 is opt-in there.
    benchmarks/README.md has what each choice was measured to gain and lose.
    """
    check_precision_name(name)
    kind = device.type
    if name == "auto":
        if kind == "cuda":
            return "bf16" if cuda_has_bf16(device) else "fp16"
        return "fp32"
    if name == "bf16" and kind == "cuda" and not cuda_has_bf16(device):
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not compute bfloat16 (that "
                        "takes an Ampere GPU or later); use fp16 or auto")
    if name == "bf16" and kind == "cpu" and not cpu_has_bf16():
        print("note: this CPU has no native bfloat16 (AVX512-BF16 or AMX): PyTorch emulates it, slower than fp32")
    if name == "fp16" and kind != "cuda":
        raise UserError(f"--precision fp16 needs a CUDA GPU (loss-scaled half precision); on {kind} use "
                        f"{'bf16 or ' if kind == 'cpu' and cpu_has_bf16() else ''}fp32")
    return name


def copy_to(t, device):
    """A CPU tensor on `device`, the copy queued without waiting: a plain copy to a GPU makes the CPU wait for
    everything queued before it there; one from pinned memory is queued behind it instead."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class AnyDeviceMixedPrecision(MixedPrecision):
    """fastai's `MixedPrecision` on any device type: fastai's own autocasts on CUDA only.

    Only training batches are autocast. The weights, the optimizer and every export stay fp32; bf16 needs no
    loss scaling, fp16 has it: one GradScaler for the whole run (every fit; a checkpoint keeps its state), which
    unscales the gradients, and on an overflow the step is skipped and the scale halves. Not named `Autocast`:
    fastai names a learner's attribute after each callback, and this one sets `self.autocast`.
    """

    def __init__(self, precision, device_type):
        super().__init__(AMPMode(precision))
        self.device_type, self.one_pixel = device_type, {}
        self.dtype = torch.bfloat16 if self.amp_mode == AMPMode.BF16 else torch.float16
        self.grad_scaler = torch.amp.GradScaler(device_type, enabled=self.dtype == torch.float16)

    def before_fit(self):
        self.autocast = torch.autocast(self.device_type, dtype=self.dtype)
        self.learn.scaler = self.grad_scaler
        if self.grad_scaler.is_enabled():
            self.learn._step = self.scaled_step  # fastai's step (`Learner._step`), through the scaler

    def after_fit(self):
        self.learn.__dict__.pop("_step", None)
        super().after_fit()

    def before_batch(self):
        # Validation runs in fp32: each epoch is judged as the report judges the exported (fp32) model, so the
        # epoch table's numbers are the report's and --keep best picks by them.
        # PyTorch's CPU bf16 backward (oneDNN) leaves part of the weight gradient of a strided convolution that
        # sees a one-pixel map uninitialised: garbage, often NaN (benchmarks/README.md). Such batches (the small
        # first sizes of progressive resizing) train in fp32.
        self.autocasting = self.training and not (self.device_type == "cpu" and self.amp_mode == AMPMode.BF16
                                                  and self.one_pixel_conv(self.xb[0]))
        if self.autocasting:
            self.autocast.__enter__()

    def after_loss(self):
        if self.autocasting:
            self.autocast.__exit__(None, None, None)

    def before_step(self):
        # fastai's asks the scaler whether the gradients overflowed before it steps: a read of the GPU, which makes
        # the CPU wait for each step. Here the scaler unscales them (the callbacks after this one, such as gradient
        # clipping, see them as they are) and notes whether they overflowed, on the device, and `scaled_step` hands
        # that to the fused optimizer (`models.FusedAdamW`), which then leaves everything as it was.
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)

    def scaled_step(self):
        self.scaler.step(self.opt)

    def one_pixel_conv(self, x):
        """The first strided convolution that sees a map one pixel high or wide at `x`'s size (None if none),
        found once per size by passing the model one blank image."""
        size = tuple(x.shape[2:])
        if size not in self.one_pixel:
            self.one_pixel[size] = found = one_pixel_strided_conv(self.model, x[:1])
            if found:  # on a line of its own, not after a progress bar's
                print(f"\nnote: batches of {size[0]} x {size[1]} px train in fp32, not bf16: there {found} (a strided "
                      "convolution) sees a one-pixel map, whose bf16 gradient PyTorch computes wrong on a CPU")
        return self.one_pixel[size]


def loss_scaler(learn):
    """The GradScaler of `learn`'s fp16 run, which lasts from fit to fit; None without loss scaling."""
    return next((cb.grad_scaler for cb in learn.cbs
                 if isinstance(cb, AnyDeviceMixedPrecision) and cb.grad_scaler.is_enabled()), None)


def one_pixel_strided_conv(model, x):
    """The name of `model`'s first strided convolution whose input is one pixel high or wide when `model` takes
    `x` (None if there is none). `model` is run once in eval mode (nothing learned or drawn) without gradients."""
    model = getattr(model, "module", model)  # not through DistributedDataParallel, which would synchronise
    seen, modes = [], {m: m.training for m in model.modules()}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.append(name) if min(args[0].shape[2:]) == 1
                                         else None)
             for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and max(m.stride) > 1]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros_like(x))
    finally:
        for m, training in modes.items():
            m.training = training
        for h in hooks:
            h.remove()
    return seen[0] if seen else None
