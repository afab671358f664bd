"""Training on several processes or GPUs with fastai's distributed support (Hugging Face Accelerate).

The same script runs alone or under a launcher, with no change:

    accelerate launch --multi_gpu --num_processes 4 training/train_pets.py ...   # 4 GPUs (or 4 CPU processes)
    torchrun --nproc_per_node 2 training/train_pets.py ...

fastai's `distrib_ctx` assumes CUDA in two places, which stop it on CPU processes (the gloo backend):
its default `sync_bn=True` converts BatchNorm to `SyncBatchNorm`, which only runs on CUDA; and its
`DistributedDL` broadcasts the shuffled order with `.cuda()`. `distributed` below passes `sync_bn` and
Accelerate's `cpu` flag from the device, and the patch sends the broadcast through the device the
process group's backend uses. Both are fixes that fastai itself could take.
"""
import os
import random
from contextlib import nullcontext

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.torch_core import num_distrib, rank_distrib

from .checkpoint import Checkpoint


def backend_device():
    """Where the process group's collectives take their tensors: the GPU for NCCL, the CPU for gloo."""
    return "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"


def _broadcast(self, t, rank):
    "fastai's `DistributedDL._broadcast`: `t` from `rank`, on the backend's device (fastai's original is CUDA only)."
    t = torch.tensor(t, dtype=torch.long, device=backend_device())
    torch.distributed.broadcast(t, rank)
    return t.cpu().tolist()


def agreed_max(value):
    """The largest of every process's `value` (a number); `value` itself when one process trains. Every process
    must ask, and waits for the others."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=backend_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


class OwnRandomness(Callback):
    """Each process of a distributed run draws its own augmentation (crops, flips, warps, lighting, mixes).

    Every process starts from the same `--seed`, so without this the N images of a step's N shares would get
    the same draws. The streams are seeded at each epoch from the seed, the process's rank and the epoch (of the
    whole run: `offset` counts earlier fits), so a resumed run draws what the uninterrupted one did: a checkpoint
    holds the main process's streams only. The loaders' order is the main process's (fastai's DistributedDL).
    """
    order = Checkpoint.order + 1  # after a resumed run's streams are restored, which this replaces

    def __init__(self, seed, offset=0):
        self.seed, self.offset = seed, offset

    def before_epoch(self):
        seed = int(np.random.SeedSequence([self.seed, rank_distrib(), self.offset + self.epoch]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # every device's stream


def distributed(learn):
    """fastai's `distrib_ctx`, usable on CPU processes too; a no-op when the script was not launched distributed.

    A launcher's single process trains as a plain run: fastai would wrap its loaders for a process group
    that Accelerate never starts for one process.
    """
    if num_distrib() <= 1:
        return nullcontext()
    # fastai's distributed module needs accelerate: imported for distributed runs only, so that the library (and an
    # exported learner, whose classes it holds) loads without it
    from fastai.distributed import DistributedDL  # gives Learner its distrib_ctx
    DistributedDL._broadcast = _broadcast
    cuda = learn.dls.device is not None and torch.device(learn.dls.device).type == "cuda"
    # mixed precision is --precision's: Accelerate's own (from `accelerate config`) would scale fp16 losses a second
    # time, and its autocast wrapper left on the model cannot be pickled by the export
    return learn.distrib_ctx(sync_bn=cuda, cpu=not cuda, mixed_precision="no")


def leave_distributed():
    """End distributed training: what follows (report, export) is the main process's alone.

    fastai decides from `WORLD_SIZE` whether to gather predictions across processes, so it is set to 1
    here; otherwise the main process's report would wait for processes that have finished.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # fastai's teardown_distrib
        torch.distributed.destroy_process_group()
    if num_distrib() > 1:
        os.environ["WORLD_SIZE"] = "1"


def world_size():
    """How many processes train together (1 when not launched distributed)."""
    return max(1, num_distrib())
