"""Resumable training: the state after a finished epoch, written atomically beside the model.

A run killed at any point (Ctrl-C, SIGTERM, SIGKILL, a power cut) leaves the checkpoint of its last
saved epoch; `--resume` loads it and goes on with the same weights, optimizer moments, schedule
position and random-number streams, so it ends where the uninterrupted run would have.
"""
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.torch_core import get_model, rank_distrib

from . import UserError


def train_loader(learn):
    """The training DataLoader, also when fastai's distributed training wraps it in a `DistributedDL`."""
    return getattr(learn.dls.train, "dl", learn.dls.train)


def rng_states(learn):
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,  # GPU augmentation
            "loader": train_loader(learn).rng.getstate()}  # the loader's own shuffling stream


def set_rng_states(learn, states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    # a run resumed on other hardware (GPU <-> CPU) goes on with that hardware's own streams
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    train_loader(learn).rng.setstate(states["loader"])


def load_checkpoint(path, settings):
    """The saved state, or a `UserError` if there is none or it was made with other settings."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"nothing to resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a checkpoint is replaced atomically, so this is a foreign or damaged file
        raise UserError(f"cannot read the checkpoint {path} ({type(e).__name__}); delete it to start afresh") from None
    changed = [f"{k} {state['settings'].get(k)!r} (now {v!r})" for k, v in settings.items()
               if state["settings"].get(k) != v]
    if changed:
        raise UserError(f"{path} was made with other settings: {'; '.join(changed)}; "
                        "rerun with the same options, or without --resume to start afresh")
    return state


def restore(learn, state):
    """Weights and optimizer state (the optimizer is created as the next fit would create it).

    The state was loaded onto the CPU: copying it into the model and the optimizer puts it on whatever
    device this run trains on (the model must be on it already: PyTorch's optimizer puts its moments where
    the parameters are), so a run started on a GPU resumes on a CPU and the other way round.
    """
    get_model(learn.model).load_state_dict(state["model"])
    if learn.opt is None:
        learn.create_opt()
    learn.opt.load_state_dict(state["opt"])


class Checkpoint(Callback):
    """Save everything a resumed run needs after a finished epoch; restore the random streams when resuming.

    An epoch is saved when `every` seconds have passed since the last save (or the fit's start), and the
    last epoch of a fit always is. Writing weights and optimizer moments takes a fraction of a second:
    after every epoch that would be a large share of epochs that take seconds on a GPU. `offset` is the
    number of epochs of earlier fits of the same run (fine_tune's frozen epoch), so `epoch` in the file
    counts the epochs of the whole run.
    """
    order = 65  # after the Recorder and LossHistory have logged the epoch

    def __init__(self, path, settings, extra, offset=0, start_epoch=0, resume_rng=None, every=0.0):
        self.path, self.settings, self.extra = Path(path), settings, extra
        self.offset, self.start_epoch, self.resume_rng, self.every = offset, start_epoch, resume_rng, every

    def before_fit(self):
        self.saved = time.perf_counter()

    def before_epoch(self):
        # Skipped epochs (fastai's start_epoch) use no randomness, so the streams are set just before
        # the first epoch that trains, exactly as they were when the checkpoint was written.
        if self.epoch == self.start_epoch and self.resume_rng is not None:
            set_rng_states(self.learn, self.resume_rng)
            self.resume_rng = None

    def after_epoch(self):
        if self.epoch < self.start_epoch or rank_distrib():
            return  # an epoch skipped to resume, or not the main process
        if self.epoch + 1 < self.n_epoch and time.perf_counter() - self.saved < self.every:
            return
        state = {"epoch": self.offset + self.epoch + 1, "settings": self.settings,
                 "model": get_model(self.model).state_dict(), "opt": self.opt.state_dict(),
                 "rng": rng_states(self.learn), **self.extra()}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # atomic: a kill during the write leaves the previous checkpoint
        self.saved = time.perf_counter()


def saved_epoch(path):
    """The epoch of the whole run that the checkpoint at `path` holds."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["epoch"]
