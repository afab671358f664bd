"""The one training loop behind every model: files → presized copies → loaders → learner → fits → export.

A `Task` (imagelab.classifier, imagelab.autoencoder) supplies what differs between kinds of model;
this loop does the rest for all of them: checking the files, presizing, progressive resizing,
`--time-budget`, checkpoints and `--resume`, distributed launch, and the all-or-nothing export of the
learner, its weights-only artifacts and its report.
"""
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from contextlib import redirect_stdout
from datetime import datetime, timezone
from pathlib import Path

from fastai.callback.channelslast import ChannelsLast
from fastai.callback.progress import ProgressCallback
from fastai.torch_core import get_model, rank_distrib
from fastai.vision.all import RandomResizedCrop, Resize, set_seed

from . import UserError, noted_interrupts
from .augment import faster_augmentation
from .callbacks import ActOnCtrlC, KeepBest, LossHistory, Progress, ProgressiveResize, TimeBudget, best_weights
from .checkpoint import Checkpoint, Writer, check_settings, load_checkpoint, restore, saved_epoch
from .data import Presized, find_images, presize
from .device import AnyDeviceMixedPrecision, loss_scaler, pick_device, pick_precision
from .distributed import OwnRandomness, distributed, leave_distributed, world_size
from .export import staged_export
from .metadata import versions, write_json
from .models import DeviceAvgLoss, PlainTensors, SmoothLoss
from .paths import checkpoint_path, examples_dir, is_flagged, metrics_path, split_path
from .writes import WRITE_ERRORS, one_run_writes, remove_abandoned_staging, torch_write_failed, write_failure
from .reports import plot_lr_find
from .store import StoreDL, store_loaders


class Task:
    """What a kind of model supplies to the loop. Subclasses set `kind` and implement the methods that raise.

    `start_competes`: whether the model before training competes under `--keep best`, as epoch 0 (the
    autoencoder's starts as PCA: a run that only made it worse exports PCA)."""
    kind = None
    start_competes = False

    def check(self, cfg):
        """One line for a setting this kind of model cannot take (before any work)."""

    def default_data(self):
        """The dataset folder when the config names none (downloaded if need be)."""
        raise NotImplementedError

    def dataloaders(self, cfg, root, files, get_x, workers):
        raise NotImplementedError

    def learner(self, dls, cfg):
        raise NotImplementedError

    def default_lr(self, cfg):
        raise NotImplementedError

    def fits(self, cfg, lr):
        """The fits of a run as [(epochs, fit(learn, **kwargs))]: by default one one-cycle fit."""
        return [(cfg.epochs, lambda learn, **kw: learn.fit_one_cycle(cfg.epochs, lr, **kw))]

    def callbacks(self, cfg):
        """Extra fastai callbacks for every fit (a loss penalty, say)."""
        return []

    def report(self, learn, history, folder):
        """Write the plots into `folder`; return the held-out metrics."""
        raise NotImplementedError

    def describe(self, cfg, root, dls):
        """What metrics.json says about the data: labels, split, images per split."""
        raise NotImplementedError

    def save_examples(self, dls, folder):
        raise NotImplementedError

    def export(self, learn, model_path):
        """Write the weights-only artifacts beside `model_path`: the weights and config
        (imagelab.export.export_weights_only) and the ONNX graphs the apps serve."""
        raise NotImplementedError

    def summary(self, metrics, cfg):
        """The last line a run prints (with `kept_weights`)."""
        raise NotImplementedError


def kept_weights(metrics):
    """Which weights a run exported, as its last line says it."""
    return (f"the weights of epoch {metrics['kept_epoch']} of {metrics['epochs_trained']}"
            f"{' (lowest validation loss)' if metrics['kept'] == 'best' else ''}"
            f"{', stopped early' if metrics['stopped_early'] else ''}"
            f"{', training diverged after it' if metrics['diverged_at_epoch'] else ''}")


def progressive_resize(dls, cfg, start):
    resize = dls.train if isinstance(dls.train, StoreDL) else \
        next(t for t in dls.train.after_item.fs if isinstance(t, (RandomResizedCrop, Resize)))
    return ProgressiveResize(resize, cfg.size, start)


def resolve_lr(learn, lr, default):
    """The run's learning rate: `lr` (a number, or "find": fastai's lr_find), else `default`; and what lr_find saw,
    for the report's plot ({"lrs", "losses", "lr"}), or None."""
    if lr is None:
        return default, None
    if lr != "find":
        return float(lr), None
    print("finding a learning rate (fastai's lr_find, 100 steps at growing rates)...")
    bars = learn.cbs.filter(lambda cb: isinstance(cb, ProgressCallback))  # fastai's no_bar puts back its own bar
    scaler = loss_scaler(learn)  # fp16's: lr_find's highest rates overflow it on purpose, not the run's
    scale = scaler.state_dict() if scaler is not None else None
    path = learn.path
    with learn.removed_cbs(bars), learn.no_logging(), tempfile.TemporaryDirectory() as tmp:
        learn.path = Path(tmp)  # lr_find keeps the weights in <path>/models meanwhile, not in the working folder
        try:
            found = float(learn.lr_find(show_plot=False).valley)
        finally:
            learn.path = path
    if scaler is not None:
        scaler.load_state_dict(scale)
    print(f"lr_find chose {found:.2e}")
    rec = learn.recorder  # as fastai's own plot: the last steps, where the loss shoots up, left out
    return found, {"lrs": [float(x) for x in rec.lrs[:-5]], "losses": [float(x) for x in rec.losses[:-5]], "lr": found}


class Run:
    """Where a run stands: the learning rate, the losses so far, the epochs finished over all fits, the time
    spent. A checkpoint saves it and `--resume` starts from it: the only resume bookkeeping."""

    def __init__(self, lr, lr_find=None, state=None):
        self.lr, self.lr_find, self.history, self.started = lr, lr_find, LossHistory(), time.perf_counter()
        self.done, self.seconds_before, self.resumed = 0, 0.0, None
        self.best, self.stopped_early = None, False  # best: the epoch of the lowest validation loss, its loss, weights
        self.diverged = None  # the epoch (from 1) whose validation loss was not a number
        self.fit_started = 0.0  # the run's seconds when the fit under way began
        if state:
            self.history.train, self.history.valid, self.history.step, self.history.valid_metrics = state["history"]
            self.done, self.seconds_before, self.resumed = state["epoch"], state["seconds"], state
            self.best, self.fit_started = state["best"], state["fit_started"]
        self.first_step = self.history.step

    def seconds(self):
        """Training time of the whole run, earlier processes included."""
        return self.seconds_before + time.perf_counter() - self.started

    def saved(self):
        """What a checkpoint holds besides weights, optimizer and random streams."""
        history = (self.history.train, self.history.valid, self.history.step, self.history.valid_metrics)
        return {"lr": self.lr, "history": history,
                "seconds": self.seconds(), "best": self.best, "fit_started": self.fit_started, "lr_find": self.lr_find}

    def epochs_since_best(self):
        return len(self.history.valid) - self.best["epoch"] if self.best else 0

    def keep_start(self, learn, cbs):
        """The model as it is, before training, as the best so far: epoch 0 (its loss with the task's
        callbacks `cbs`, as the epochs' own)."""
        self.best = best_weights(learn, 0, float(learn.validate(cbs=cbs)[0]))

    def keep(self, learn, which, cbs):
        """Put the kept weights into `learn` (`which`: "best" or "last"); returns what metrics.json says of them.
        `cbs`: the task's callbacks, which a last epoch cut short is validated with, as the others were."""
        valid = self.history.valid
        cut_short = not valid or self.history.step > valid[-1][0]  # the time budget ended an epoch part way
        last = len(valid) + cut_short
        if cut_short:  # the unfinished epoch's weights were never validated: the table has no row for them
            loss, *values = learn.validate(cbs=cbs)
            print(f"epoch {last}, cut short by the time budget: valid_loss {loss:.6f}")
            # the report's per-epoch losses and metrics go on to the epoch exported
            self.history.add_validation(loss, [m.name for m in learn.metrics], values)
            if not math.isfinite(loss):
                self.diverged = last
        kept = {"kept": which, "kept_epoch": last, "epochs_trained": last, "stopped_early": self.stopped_early,
                "diverged_at_epoch": self.diverged}
        if self.diverged:  # the last weights are not numbers: the best epoch's, whatever --keep says
            if self.best is None:
                raise UserError(f"training diverged: the validation loss was not a number after epoch "
                                f"{self.diverged}, and no epoch before had a finite one; nothing was exported: "
                                f"lower --lr (this run's: {self.lr:g})")
            which = kept["kept"] = "best"
        if which == "last" or self.best is None:
            return kept
        if cut_short and not self.diverged and loss < self.best["loss"]:
            return kept
        get_model(learn.model).load_state_dict(self.best["model"])
        return {**kept, "kept_epoch": self.best["epoch"]}

    def take_resumed(self):
        """The checkpoint's state to go on from (random streams, smoothed loss): once, before the first epoch this
        process trains; None after that, or in a run that did not resume."""
        resumed, self.resumed = self.resumed, None
        return resumed


def fit(task, cfg, learn, run, *, schedule, ckpt, writer, settings, extra_cbs):
    """Every fit of the `schedule` (`task.fits`) that is not finished yet, with checkpoints (to `ckpt` by `writer`,
    for a run with these `settings`), the time budget and resizing."""
    epochs = sum(n for n, _ in schedule)
    resize = progressive_resize(learn.dls, cfg, cfg.first_size())
    offset = 0
    # a Ctrl-C that Python drops (raised inside a finalizer) stops the fit after its batch all the same
    with distributed(learn), noted_interrupts() as ctrl_c:
        if task.start_competes and run.done == 0 and run.best is None:
            run.keep_start(learn, task.callbacks(cfg))  # in here: a validation gathers the processes' shares
        for n, fit_one in schedule:
            if run.done < offset + n:
                first = run.done - offset
                if first == 0:
                    run.fit_started = run.seconds()
                budget = [fit_budget(cfg.time_budget, run, n, epochs - offset)] if cfg.time_budget else []
                checkpoint = Checkpoint(ckpt, settings, run.saved, writer, offset=offset, start_epoch=first,
                                        resumed=run.take_resumed(), every=cfg.checkpoint_every)
                if isinstance(getattr(learn, "progress", None), Progress):
                    learn.progress.offset = offset
                own = [OwnRandomness(cfg.seed, offset)] if world_size() > 1 else []
                fit_one(learn, start_epoch=first, cbs=[run.history, KeepBest(run, cfg.patience), checkpoint, resize,
                                                       *budget, *own, *task.callbacks(cfg), ActOnCtrlC(ctrl_c),
                                                       *extra_cbs])
                run.done = offset + n
            offset += n


def fit_budget(seconds, run, n, left):
    """The `TimeBudget` of a fit of `n` epochs with `left` epochs of the run to go: its epochs' share of what was left
    of the run's `seconds` when it began (fine_tune's frozen epoch its share, the last fit all the rest), its own
    one-cycle schedule following its own clock."""
    return TimeBudget((seconds - run.fit_started) * n / left, run.seconds() - run.fit_started)


def loader_workers(cfg, device):
    """Data-loading processes for the file path: --workers, else what suits the device."""
    if cfg.workers is not None:
        return cfg.workers
    if device.type != "cpu":
        return min(8, os.cpu_count() or 1)  # the CPU's only job is to keep the accelerator fed
    # On a CPU the model's step is most of the time and presized copies decode in a millisecond: worker
    # processes would only take cores from the model. Full-size photos are another matter (fastai's default).
    return 0 if cfg.presize else min(16, os.cpu_count() or 1)


def batches_in_memory(dls, presized, cfg):
    """The store loaders (imagelab.store) when the presized images fit in memory, else None (the file path)."""
    if not cfg.presize or cfg.workers is not None:  # --workers asks for the file path's loader processes
        return None
    batches = store_loaders(dls, presized.copies)
    if batches is not None:
        held = batches.train.store.flat.device  # the GPU's memory, or main memory when the GPU has no room
        print(f"decoded {len(batches.train_ds) + len(batches.valid_ds)} images into memory ({held}): "
              f"batches are cut there")
    return batches


def prepare(task, cfg, root, device, precision):
    """The data in `root` and the learner on `device`: (files, skipped, presized, dls, learn)."""
    files, skipped = find_images(root, flagged=cfg.flagged)
    for f, why in skipped:
        print(f"skipped {f}: {why}")
    presized = Presized(presize(files, cfg.size, cfg.cache) if cfg.presize else None)
    dls = task.dataloaders(cfg, root, files, presized, loader_workers(cfg, device))
    left_out = len(files) - len(dls.train_ds) - len(dls.valid_ds)  # each for a reason a note above gave
    flagged = f" ({sum(is_flagged(f, root) for f in dls.train_ds.items)} flagged in the apps)" if cfg.flagged else ""
    print(f"{len(files)} images ({len(skipped)} skipped): {len(dls.train_ds)} to train{flagged}, "
          f"{len(dls.valid_ds)} held out" + (f", {left_out} left out" if left_out else ""))
    learn = task.learner(dls, cfg)
    dls.to(device)  # after the learner: fastai puts the Normalize it adds on its default device, not --device
    learn.model.to(device)  # now, not at the first fit: a resumed run's optimizer state goes where the weights are
    learn.add_cb(PlainTensors())
    learn.recorder.smooth_loss = SmoothLoss(learn.recorder.smooth_loss.beta)
    learn.recorder.loss = DeviceAvgLoss()
    if hasattr(learn, "progress"):  # absent where the caller turned fastai's bars off
        learn.remove_cb(learn.progress)
        learn.add_cb(Progress())
    if device.type in ("cpu", "cuda"):  # oneDNN (CPU) and cuDNN (GPU) convolutions run faster on channels-last tensors
        learn.add_cb(ChannelsLast())
    if precision != "fp32":
        learn.add_cb(AnyDeviceMixedPrecision(precision, device.type))
    if len(dls.train_ds) < cfg.bs:  # fastai drops incomplete training batches: nothing would be trained
        raise UserError(f"only {len(dls.train_ds)} training images, fewer than --bs {cfg.bs}: lower --bs")
    return files, skipped, presized, dls, learn


def split_files(dls, root):
    """Which files train and which are held out, relative to the data folder (as split.json has them)."""
    return {name: [Path(f).relative_to(root).as_posix() for f in ds.items]
            for name, ds in (("train", dls.train_ds), ("valid", dls.valid_ds))}


def describe_split(split):
    """The split of the dataset's own images in a few words that change with any of them: one added or removed
    reshuffles the seeded split, and a run resumed on another would hold out images it has trained on. Images
    flagged in the apps meanwhile only add to the training set (with --flagged)."""
    own = {name: [f for f in files if not is_flagged(f)] for name, files in split.items()}
    digest = hashlib.sha1(json.dumps(own).encode()).hexdigest()[:12]
    return f"{len(own['train'])} train, {len(own['valid'])} held out ({digest})"


@faster_augmentation()
def train(task, cfg, cbs=()):
    """Train `task`'s model as `cfg` says, export `cfg.out` and its report; returns the metrics.

    `cbs` are extra fastai callbacks for every fit (loggers, the benchmark's turn-taking). Under a
    distributed launcher every process trains on its share of each batch; only the main process
    writes the checkpoint, the report and the model (the others return None).
    """
    cfg.check()
    # Every process reads the same images and would say the same notes: the main one says them, once.
    with one_run_writes(cfg.out) if rank_distrib() == 0 else redirect_stdout(io.StringIO()):
        return _train(task, cfg, cbs)


def _train(task, cfg, cbs):
    main_process = rank_distrib() == 0
    ckpt = checkpoint_path(cfg.out)
    if main_process:  # first, whatever happens next: a model cut short as it moved in is put back
        remove_abandoned_staging(ckpt)
        remove_abandoned_staging(cfg.out)
    task.check(cfg)
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    options = {k: v for k, v in {"kind": task.kind, **cfg.settings()}.items() if k != "data"}
    root = Path(cfg.data) if cfg.data else task.default_data()
    # the folder, however it is spelled (a relative --data from another working folder)
    data = str(root.resolve())
    state = load_checkpoint(ckpt, {**options, "data": data}) if cfg.resume else None  # before reading images
    set_seed(cfg.seed, reproducible=True)
    files, skipped, presized, dls, learn = prepare(task, cfg, root, device, precision)
    if main_process:  # after the data and model were found: a mistyped one is an error, not a note about replacing
        say_what_the_run_replaces(cfg, ckpt)
    learn.dls = batches_in_memory(dls, presized, cfg) or dls  # training and validation during the fits
    settings = {**options, "data": data, "images": describe_split(split_files(dls, root))}
    if state:
        check_settings(ckpt, state, {"images": settings["images"]})
    lr, found = (state["lr"], state["lr_find"]) if state else resolve_lr(learn, cfg.lr, task.default_lr(cfg))
    run = Run(lr, found, state)
    schedule = task.fits(cfg, run.lr)
    planned = sum(n for n, _ in schedule)  # fine_tune's frozen epoch too
    if state:
        restore(learn, state)
        print(f"resuming after epoch {state['epoch']} of {planned} from {ckpt}")
    writer = Writer()
    try:
        fit(task, cfg, learn, run, schedule=schedule, ckpt=ckpt, writer=writer, settings=settings, extra_cbs=cbs)
    except KeyboardInterrupt:
        writer.wait()  # the checkpoint being written, if any, is the one to resume from
        if main_process:
            say_how_to_resume(ckpt, cfg.checkpoint_every)
        raise
    seconds_here = time.perf_counter() - run.started
    processes = world_size()
    images = (run.history.step - run.first_step) * cfg.bs * processes  # every training batch is full
    leave_distributed()
    if run.history.step == 0:  # only a time budget ends a run before its first batch
        raise UserError(f"--time-budget {cfg.time_budget:g} ended before the first batch: nothing was trained or "
                        "exported; give it more seconds")
    if not main_process:
        return None
    kept = run.keep(learn, cfg.keep, task.callbacks(cfg))  # judged on the loaders it trained with
    learn.dls = dls  # the report and the exported learner read files, as the app will:
    presized.copies.clear()  # the original files, not their presized copies
    facts = {**kept, "epochs_planned": planned, "kind": task.kind, **cfg.record(), "data": str(root), "lr": run.lr,
             "lr_find": run.lr_find,
             "start_size": cfg.first_size(),
             "device": str(device), "precision": precision,
             "processes": processes, "resumed_after_epoch": state["epoch"] if state else None,
             "valid_loss_per_epoch": [round(v, 5) for _, v in run.history.valid],  # a NaN: null (write_json)
             "train_seconds": round(run.seconds(), 2), "images_trained": images,
             "images_per_second": round(images / seconds_here, 2) if images else None,
             "skipped_files": [Path(f).relative_to(root).as_posix() for f, _ in skipped]}  # as split.json
    # the export overlaps the last checkpoint's write (`writer`'s background thread), waited for only after it
    metrics = export_run(task, cfg, learn, history=run.history, root=root, facts=facts, writer=writer, ckpt=ckpt)
    writer.wait(check=False)  # the run is complete: a failed last write loses nothing
    ckpt.unlink(missing_ok=True)  # the run is complete: nothing left to resume
    print(task.summary(metrics, cfg))
    return metrics


def say_what_the_run_replaces(cfg, ckpt):
    """Notes on the interrupted run this one leaves, and on the model it replaces as it ends."""
    if not cfg.resume and ckpt.exists():
        print(f"note: {ckpt} holds an interrupted run; this run starts afresh (--resume continues it)")
    if Path(cfg.out).exists():  # the apps serve it: said while Ctrl-C still keeps it
        print(f"note: this run replaces {cfg.out}{made_on(cfg.out)} as it ends (--out elsewhere keeps it)")


def export_run(task, cfg, learn, *, history, root, facts, writer, ckpt):
    """`export`; a Ctrl-C or a full disk meanwhile says in one line that the checkpoint still holds the run."""
    try:
        return export(task, cfg, learn, history=history, root=root, facts=facts)
    except KeyboardInterrupt:
        writer.wait(check=False)
        say_how_to_resume(ckpt, cfg.checkpoint_every)
        raise
    except (OSError, RuntimeError) as e:
        if not (getattr(e, "errno", None) in WRITE_ERRORS or torch_write_failed(e)):
            raise  # a held-out file moved or damaged meanwhile, say: its own message says more than "cannot write"
        writer.wait(check=False)
        again = f"; {ckpt} holds the run: rerun with --resume to export it" if ckpt.exists() else ""
        raise UserError(f"cannot write {cfg.out} and its report: {write_failure(e, Path(cfg.out).parent)}; "
                        f"the previous model is as it was{again}") from None


def made_on(model):
    """' (trained on DATE)' from the report beside `model`, or '' where it does not say."""
    try:
        return f" (trained on {json.loads(metrics_path(model).read_text())['created'][:10]})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def say_how_to_resume(ckpt, every):
    """Where an interrupted run can go on from (`every`: --checkpoint-every), on a line of its own, not after a
    progress bar's."""
    if ckpt.exists():
        print(f"\n{ckpt} holds the run after epoch {saved_epoch(ckpt)}: rerun with --resume to continue from there",
              file=sys.stderr)
    else:
        print(f"\nno checkpoint yet (one is saved after an epoch once {every:g} s have passed, --checkpoint-every): "
              "a rerun starts afresh", file=sys.stderr)


def export(task, cfg, learn, *, history, root, facts):
    """The learner, its weights-only artifacts and its report, moved into place together or not at all."""
    dls = learn.dls
    learn.remove_cb(AnyDeviceMixedPrecision)  # the report judges the model as it is exported: fp32
    with staged_export(cfg.out) as (tmp_model, tmp_report):
        metrics = task.report(learn, history, tmp_report)
        if facts["lr_find"]:
            plot_lr_find(facts["lr_find"], tmp_report / "lr_find.png")
        described = task.describe(cfg, root, dls)
        described["counts"] = {**described["counts"], "skipped": len(facts["skipped_files"])}
        metrics.update({**facts, **described, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "versions": versions()})
        write_json(metrics, metrics_path(tmp_model))
        write_json(split_files(dls, root), split_path(tmp_model))
        task.save_examples(dls, examples_dir(tmp_model))
        learn.dls.to("cpu")  # a learner trained on a GPU loads on a machine without one
        learn.model.cpu()
        for metric in (learn.recorder.loss, learn.recorder.smooth_loss, *learn.metrics):
            metric.reset()  # their sums live on the device they were computed on
        learn.export(tmp_model.resolve())
        task.export(learn, tmp_model)
    return metrics
