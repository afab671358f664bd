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
from contextlib import nullcontext

import torch
from fastai.distributed import DistributedDL, teardown_distrib
from fastai.torch_core import num_distrib
from fastcore.basics import patch


@patch
def _broadcast(self: DistributedDL, t, rank):
    "Broadcast `t` from `rank`, on CUDA for NCCL and on the CPU for gloo (fastai's original is CUDA only)."
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor(t, dtype=torch.long, device=device)
    torch.distributed.broadcast(t, rank)
    return t.cpu().tolist()


def distributed(learn):
    """fastai's `distrib_ctx`, usable on CPU processes too; a no-op when the script was not launched distributed.

    A launcher's single process trains as a plain run: fastai would wrap its loaders for a process group
    that Accelerate never starts for one process.
    """
    if num_distrib() <= 1:
        return nullcontext()
    cuda = learn.dls.device is not None and torch.device(learn.dls.device).type == "cuda"
    return learn.distrib_ctx(sync_bn=cuda, cpu=not cuda)


def leave_distributed():
    """End distributed training: what follows (report, export) is the main process's alone.

    fastai decides from `WORLD_SIZE` whether to gather predictions across processes, so it is set to 1
    here; otherwise the main process's report would wait for processes that have finished.
    """
    teardown_distrib()
    if num_distrib() > 1:
        os.environ["WORLD_SIZE"] = "1"


def world_size():
    """How many processes train together (1 when not launched distributed)."""
    return max(1, num_distrib())
