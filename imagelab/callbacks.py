"""The training loop's own fastai callbacks: the clock, the progress bar, progressive resizing, the losses, the best
epoch.

fastai runs a learner's callbacks, event by event, in the order of their `order` (each class's attribute, with
why it is that number); these depend on it:
- fastai's TrainEvalCallback sets `pct_train` (the fit's progress) from the epochs alone at each epoch's start;
  `TimeBudget` comes right after it and makes it the clock's, when the clock is ahead; `ProgressiveResize` comes
  next and picks the epoch's input size from it; fastai's ParamScheduler, later, reads it at every batch.
- `LossHistory` logs the epoch's losses after fastai's Recorder has smoothed them, then `KeepBest` reads them,
  then imagelab.checkpoint.Checkpoint saves what both hold, then imagelab.distributed.OwnRandomness replaces the
  random streams a resumed run restored.
- imagelab.models.PlainTensors comes after everything that changes the batch (MixUp, CutMix,
  channels-last, mixed precision).
"""
import math
import sys
import time
from contextlib import nullcontext

import torch
from fastai.callback.core import Callback, CancelFitException, TrainEvalCallback
from fastai.callback.progress import ProgressCallback
from fastai.torch_core import get_model, rank_distrib

from .distributed import agreed_max, world_size


class TimeBudget(Callback):
    """Fit for `seconds` of wall time or the fit's epochs, whichever ends first: the one-cycle schedule follows the
    nearer end, and training stops when time is up.

    Processes of a distributed run go by the slowest one's clock, which they agree on at each epoch's start and
    every few batches: they must step at the same rates, and stop before the same batch.
    """
    order = TrainEvalCallback.order + 1  # after fastai's step counter sets pct_train, before the schedulers read it
    agreements = 20  # an epoch's most, with several processes: each makes the processes wait for one another

    def __init__(self, seconds, spent=0.0):
        self.seconds, self.spent = seconds, spent

    def before_fit(self):
        self.start = time.perf_counter() - self.spent
        self.shared, self.trained = world_size() > 1, False

    def time_spent(self):
        return agreed_max((time.perf_counter() - self.start) / self.seconds if self.seconds > 0 else math.inf)

    def before_epoch(self):
        # Not after an epoch: the epoch whose validation ran past the budget is complete, and is recorded first.
        self.spent_now = self.time_spent()
        if self.spent_now >= 1:
            if not self.trained and not rank_distrib():
                print(f"note: --time-budget was spent before this fit of {self.n_epoch} epochs trained")
            raise CancelFitException

    def before_train(self):
        # fastai's step counter has just set pct_train from the epochs alone, and the epoch's input size is chosen
        # from it next (ProgressiveResize): the clock must count there too
        self.learn.pct_train = min(1.0, max(self.spent_now, self.epoch / self.n_epoch))

    def before_batch(self):
        if not self.training:
            return
        if not self.shared or self.iter % max(1, self.n_iter // self.agreements) == 0:
            self.spent_now = self.time_spent()
        if self.spent_now >= 1:
            raise CancelFitException  # the report then evaluates the model as it is
        self.trained = True
        # on a fast machine the epochs end first: the schedule must still reach its end
        epochs_done = (self.epoch + self.iter / self.n_iter) / self.n_epoch
        self.learn.pct_train = min(1.0, max(self.spent_now, epochs_done))


class NoBar:
    """A progress bar that draws nothing."""
    comment = ""

    def update(self, value):
        pass

    def on_iter_end(self):
        pass


class Progress(ProgressCallback):
    """fastai's progress bars, with the smoothed loss beside them read at most once a second and at the end
    of each bar (fastai reads it after every batch, which makes the CPU wait for a GPU).

    The epoch table's rows are numbered as the run's last line and metrics.json number epochs: from 1, over
    every fit of the run (fastai numbers each fit's epochs from 0), so "the weights of epoch 7" is row 7.
    Printed to a file or a pipe (`| tee train.log`, a notebook's background run), only the table: fastprogress
    would redraw its bars there too, a line per update.
    """
    every = 1.0  # seconds
    offset = 0  # epochs of the run's earlier fits (fine_tune's frozen one); `fit` sets it

    def _write_stats(self, log):
        if log and isinstance(log[0], int):  # an epoch's row, not the header
            if len(log) < len(self.learn.recorder.metric_names):
                return  # an epoch skipped to resume: its number and its time, no losses to show
            log = [self.offset + log[0] + 1, *log[1:]]
        if getattr(self, "mbar", None):
            return super()._write_stats(log)
        cells = [f"{v:.6f}" if isinstance(v, float) else str(v) for v in log]
        if not (log and isinstance(log[0], int)):
            self.widths = [max(8, len(c)) for c in cells]  # as fastprogress lays out its table
        print("  ".join(c.ljust(w) for c, w in zip(cells, self.widths)).rstrip(), flush=True)

    def before_fit(self):
        self.drawn = sys.stdout.isatty()
        with nullcontext() if self.drawn else self.learn.no_mbar():  # the table, without fastprogress's
            super().before_fit()
        self.shown = -self.every

    def _launch_pbar(self):
        if self.drawn:
            super()._launch_pbar()
        else:
            self.pbar = NoBar()

    def after_batch(self):
        self.pbar.update(self.iter + 1)
        now = time.perf_counter()
        if hasattr(self, "smooth_loss") and (now - self.shown >= self.every or self.iter + 1 == self.n_iter):
            self.pbar.comment = f"{self.smooth_loss.item():.4f}"
            self.shown = now


def progressive_size(done, n_epoch, start, size):
    """`ProgressiveResize`'s input size once the share `done` of a fit of `n_epoch` epochs is done."""
    if done >= 0.5 or n_epoch < 2:  # a one-epoch fit (fine_tune's frozen one) trains at full size
        return size
    grown = start + (size - start) * done / 0.5
    return min(size, max(start, round(grown / 8) * 8))  # multiples of 8 suit the convolutions


class ProgressiveResize(Callback):
    """fastai's progressive resizing, epoch by epoch: small inputs first, the full `size` for the second half
    of every fit of two epochs or more.

    On a CPU the model's forward and backward passes are nearly all of a step and grow with the pixels.
    The second half of every fit, validation, the report and the export all use the full size, so the
    model is tuned to and judged at the size it serves.
    """
    order = TimeBudget.order + 1  # reads the clock-driven pct_train of a time-budgeted fit

    def __init__(self, resize, size, start):
        self.transform, self.size, self.start = resize, size, start

    def size_now(self):
        done = max(self.epoch / self.n_epoch, self.pct_train)  # pct_train: the clock under --time-budget
        return progressive_size(done, self.n_epoch, self.start, self.size)

    def resize(self, size):
        self.transform.size = (size, size)

    def before_train(self):
        self.resize(self.size_now())

    def before_validate(self):
        self.resize(self.size)

    def after_fit(self):
        self.resize(self.size)


class ActOnCtrlC(Callback):
    """Stop the fit after the batch in which a Ctrl-C came that Python dropped: one raised inside a finalizer is
    printed and lost, and training would go on (`imagelab.noted_interrupts` notes each one in `interrupts`)."""

    def __init__(self, interrupts):
        self.interrupts = interrupts

    def after_batch(self):
        self.interrupts.check()


class LossHistory(Callback):
    """Losses across every fit of a run (fastai's Recorder restarts at each fit, e.g. both halves of fine_tune), and
    each epoch's held-out metrics ({name: value}, in `valid_metrics`)."""
    order = 60  # after the Recorder has smoothed the loss

    def __init__(self):
        self.train, self.valid, self.valid_metrics, self.step, self.pending = [], [], [], 0, []

    def before_epoch(self):
        self.trained = False

    def after_batch(self):
        if self.training:
            self.step += 1
            self.trained = True
            # read once an epoch: reading a GPU's value after each batch would make the CPU wait for the GPU
            self.pending.append((self.step, self.recorder.smooth_loss.value))

    def read_pending(self):
        if self.pending:
            steps, values = zip(*self.pending)
            # extended, not reassigned: assigning a callback attribute that the learner also has (its model's
            # `train`) makes fastai warn
            self.train.extend(zip(steps, torch.stack(values).float().tolist()))
            self.pending = []

    def after_epoch(self):
        self.read_pending()
        if self.trained:  # epochs skipped by a resumed run log nothing
            _, loss, *metrics = self.recorder.values[-1]
            self.add_validation(loss, self.recorder.metric_names[3:], metrics)

    def add_validation(self, loss, names, values):
        """An epoch's held-out loss, and its metrics (`values`, by `names`)."""
        self.valid.append((self.step, float(loss)))
        self.valid_metrics.append({name: None if v is None else float(v) for name, v in zip(names, values)})

    def after_fit(self):
        self.read_pending()  # an epoch cut short (the time budget) ends the fit without its after_epoch


def best_weights(learn, epoch, loss):
    """What `Run.best` holds: the epoch, its validation loss, and a copy of the weights where they are (a GPU copies
    in place, without waiting)."""
    return {"epoch": epoch, "loss": loss,
            "model": {k: v.detach().clone() for k, v in get_model(learn.model).state_dict().items()}}


class KeepBest(Callback):
    """Remember the weights of the epoch with the lowest validation loss in the `Run`, so the checkpoint
    saves them and `--resume` goes on with them; stop after `patience` epochs without a lower one, and at once
    when the validation loss is not a number: training diverged, and nothing trains back from such weights (the
    checkpoint, after this, keeps the epoch before)."""
    order = LossHistory.order + 1  # after the epoch's validation loss is logged, before the checkpoint saves it

    def __init__(self, run, patience=None):
        self.run, self.patience = run, patience

    def before_epoch(self):
        self.validated = len(self.run.history.valid)
        if self.run.diverged:
            raise CancelFitException  # a later fit of the schedule
        if self.patience and self.run.epochs_since_best() >= self.patience:
            if not self.run.stopped_early:
                print(f"early stopping: no lower validation loss in {self.patience} "
                      f"epoch{'s' * (self.patience != 1)}")
            self.run.stopped_early = True
            raise CancelFitException  # also ends a later fit of the schedule before it trains

    def after_epoch(self):
        valid = self.run.history.valid
        if len(valid) == self.validated:
            return  # an epoch skipped to resume
        if not math.isfinite(valid[-1][1]):
            self.run.diverged = len(valid)
            print(f"\nnote: validation loss {valid[-1][1]} after epoch {len(valid)}: training diverged and stops here")
            raise CancelFitException
        if self.run.best is None or valid[-1][1] < self.run.best["loss"]:
            self.run.best = best_weights(self.learn, len(valid), valid[-1][1])
