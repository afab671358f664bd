"""Resumable training: the state after a finished epoch, written atomically beside the model.

A run killed at any point (Ctrl-C, SIGTERM, SIGKILL, a power cut) leaves the checkpoint of its last
saved epoch; `--resume` loads it and goes on with the same weights, optimizer moments, schedule
position and random-number streams, so it ends where the uninterrupted run would have.
"""
import contextlib
import copy
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.torch_core import get_model, rank_distrib

from . import UserError
from .device import loss_scaler, mps_available
from .paths import nothing_to_resume
from .writes import staging_path, write_failure


def train_loader(learn):
    """The training DataLoader, also when fastai's distributed training wraps it in a `DistributedDL`."""
    return getattr(learn.dls.train, "dl", learn.dls.train)


def rng_states(learn):
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,  # GPU augmentation
            "mps": torch.mps.get_rng_state() if mps_available() else None,
            "loader": train_loader(learn).rng.getstate()}  # the loader's own shuffling stream


def set_rng_states(learn, states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    # a run resumed on other hardware (GPU <-> CPU) goes on with that hardware's own streams
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if states.get("mps") is not None and mps_available():
        torch.mps.set_rng_state(states["mps"])
    train_loader(learn).rng.setstate(states["loader"])


def smoothing_state(learn):
    """fastai's smoothed training loss (the epoch table's train_loss, the loss curve) where the epoch left it."""
    smooth = learn.recorder.smooth_loss
    return {"count": smooth.count, "val": smooth.val}


# Changed whenever what a checkpoint holds changes: one of another version is refused in one line, not half read
# (a checkpoint lives only until its run ends, so a refusal costs at most the epochs it held).
FORMAT = "imagelab-checkpoint/2"


def load_checkpoint(path, settings):
    """The saved state, or a `UserError` if there is none or it was made with other `settings`."""
    path = Path(path)
    if not path.is_file():
        raise nothing_to_resume(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a checkpoint is replaced atomically, so this is a foreign or damaged file
        raise UserError(f"cannot read the checkpoint {path} ({type(e).__name__}); delete it to start afresh") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"the checkpoint {path} was written by another version of imagelab: run without --resume to "
                        "start afresh")
    check_settings(path, state, settings)
    return state


def check_settings(path, state, settings):
    """A `UserError` unless the checkpoint `state` (read from `path`) was made with `settings`."""
    def shown(value):
        return "the default" if value is None else repr(value)

    def named(key):  # a setting as the user gives it: an option, or what the images are
        return key if key in ("images", "kind") else "--" + key.replace("_", "-")
    saved = state["settings"]
    changed = [f"{named(k)} {shown(saved.get(k))} (now {shown(v)})" for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise UserError(f"{path} was made with other settings: {'; '.join(changed)}; "
                        "rerun with the same options and images, or without --resume to start afresh")


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
    scaler = loss_scaler(learn)
    if scaler is not None and state["scaler"]:  # fp16's loss scale, else found again in a few skipped steps
        scaler.load_state_dict(state["scaler"])


def snapshot(obj):
    """`obj` as it is now, for a writer that works while training goes on: every tensor copied to the CPU,
    every dict, list and tuple copied (the loss history grows, the optimizer's moments change in place).

    A GPU's tensors are copied without waiting, in the order of the GPU's queue, so the copies hold the
    values before the next step; the writer waits for them (`Writer.write`'s `ready`).
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", non_blocking=obj.is_cuda, copy=True)  # pinned memory, for a GPU's copies
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps a state dict's own attributes (its `_metadata`: the layers' versions)
        out.update((k, snapshot(v)) for k, v in obj.items())
        return out
    if isinstance(obj, (list, tuple)):
        items = [snapshot(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


class Writer:
    """Writes checkpoints in a background thread, one at a time, so an epoch's end does not wait for the disk.

    The write is flushed to the disk before the file replaces the previous one, so even a power cut leaves
    one whole checkpoint. A failed write is raised by the next `write` or `wait`: the run stops at its next
    checkpoint rather than go on with nothing to resume from.
    """

    def __init__(self):
        self.thread, self.error = None, None

    def write(self, state, path, ready=None):
        """Write `state` (a `snapshot`) to `path`; `ready`: a CUDA event to wait for before reading it."""
        self.wait()
        self.thread = threading.Thread(target=self._write, args=(state, Path(path), ready), name="checkpoint")
        self.thread.start()

    def _write(self, state, path, ready):
        tmp = staging_path(path)
        try:
            if ready is not None:
                ready.synchronize()
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: a kill during the write leaves the previous checkpoint
        except BaseException as e:
            self.error = (e, path)
            with contextlib.suppress(OSError):  # half a checkpoint would only keep a full disk full
                tmp.unlink(missing_ok=True)

    def wait(self, check=True):
        """Wait for the write in progress; a `UserError` if it failed (and `check`)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None and check:
            (error, path), self.error = self.error, None
            raise UserError(f"cannot write the checkpoint {path}: {write_failure(error, path.parent)}") from error


class Checkpoint(Callback):
    """Save everything a resumed run needs after a finished epoch; restore the random streams and the smoothed
    loss when resuming.

    An epoch is saved when `every` seconds have passed since the last save (or the fit's start), and the
    last epoch of a fit always is. The epoch's end only copies the state; `writer` (one per run: a fit's
    last write may still be going when the next fit saves) puts it on the disk while training goes on.
    Even copying weights and optimizer moments after every epoch would be a share of epochs that take
    seconds on a GPU. `offset` is the number of epochs of earlier fits of the same run (fine_tune's frozen
    epoch), so `epoch` in the file counts the epochs of the whole run. `resumed`: the checkpoint's state that this
    fit goes on from (`start_epoch`), if any.
    """
    order = 65  # after the Recorder and LossHistory have logged the epoch

    def __init__(self, path, settings, extra, writer, offset=0, start_epoch=0, resumed=None, every=0.0):
        self.path, self.settings, self.extra, self.writer = Path(path), settings, extra, writer
        self.offset, self.start_epoch, self.resumed, self.every = offset, start_epoch, resumed, every

    def before_fit(self):
        self.saved = time.perf_counter()
        if self.resumed is not None and self.start_epoch:
            # Resuming mid-fit: the optimizer's moments as the saved epoch left them. `restore` loaded them before
            # the fit, for a fit that starts afresh; a fit's own set-up may clear them (fastai's unfreeze, at the
            # start of fine_tune's second fit), which the uninterrupted run did once, before its first epoch.
            self.learn.opt.load_state_dict(self.resumed["opt"])

    def before_epoch(self):
        # Skipped epochs (fastai's start_epoch) use no randomness, so the streams are set just before
        # the first epoch that trains, exactly as they were when the checkpoint was written.
        if self.epoch == self.start_epoch and self.resumed is not None:
            set_rng_states(self.learn, self.resumed["rng"])
            if self.start_epoch:  # not at a fit's start, where fastai's Recorder starts it afresh
                smooth, smoothed = self.learn.recorder.smooth_loss, self.resumed["smooth_loss"]
                smooth.count, smooth.val = smoothed["count"], smoothed["val"]
            self.resumed = None

    def after_epoch(self):
        if self.epoch < self.start_epoch or rank_distrib():
            return  # an epoch skipped to resume, or not the main process
        if self.epoch + 1 < self.n_epoch and time.perf_counter() - self.saved < self.every:
            return
        model = get_model(self.model)
        state = snapshot({"format": FORMAT, "epoch": self.offset + self.epoch + 1, "settings": self.settings,
                          "model": model.state_dict(), "opt": self.opt.state_dict(), "scaler": scaler_state(self.learn),
                          "rng": rng_states(self.learn), "smooth_loss": smoothing_state(self.learn), **self.extra()})
        device = next(model.parameters()).device
        ready = torch.cuda.current_stream(device).record_event() if device.type == "cuda" else None
        self.writer.write(state, self.path, ready)
        self.saved = time.perf_counter()


def scaler_state(learn):
    """fp16's GradScaler state ({} without one). It reads the scale from the device: at an epoch's end, after the
    validation has waited for the device anyway."""
    scaler = loss_scaler(learn)
    return scaler.state_dict() if scaler is not None else {}


def saved_epoch(path):
    """The epoch of the whole run that the checkpoint at `path` holds."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["epoch"]
