"""The generic image-classifier trainer behind every training script; each script is a preset of it."""
import argparse
import sys
import time
from datetime import datetime, timezone

from fastai.callback.core import Callback, CancelFitException, TrainEvalCallback
from fastai.torch_core import rank_distrib
from fastai.vision.all import RandomResizedCrop, set_seed

from . import UserError
from .checkpoint import RESUME_KEYS, Checkpoint, load_checkpoint, restore
from .data import (Presized, classifier_dls, default_cache, detect_labels, find_images, folder_split, label_function,
                   presize, split_counts)
from .distributed import distributed, leave_distributed, world_size
from .export import export_weights_only, save_examples, staged_export
from .models import classifier_learner
from .metadata import versions, write_json
from .paths import checkpoint_path
from .reports import LossHistory, classifier_report

# Chosen for accuracy per CPU second; README.md ("Choosing the default architecture") has the numbers.
DEFAULT_ARCH = "convnext_nano"
# fastai's documented defaults: fine_tune's base_lr, and a one-cycle peak that suits from-scratch convnets.
FINE_TUNE_LR, SCRATCH_LR = 2e-3, 3e-3
# Defaults for a kind of run; options given on the command line still win. README.md ("Speed") has the numbers.
PRESETS = {
    # small offline datasets, no pretrained weights: small inputs and many epochs beat few epochs at full size
    "scratch": {"pretrained": False, "size": 64, "bs": 64, "epochs": 20, "label_smoothing": 0.1},
}


class ClassifierParser(argparse.ArgumentParser):
    """`--preset NAME` sets the defaults of the other options; the options given still override it."""

    def parse_known_args(self, args=None, namespace=None):
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--preset", choices=PRESETS)
        preset = pre.parse_known_args(args)[0].preset
        if preset:
            self.set_defaults(**PRESETS[preset])
        return super().parse_known_args(args, namespace)


def classifier_parser(description, out, epochs=3, size=224):
    """The knobs every classifier script shares, grouped like a table; scripts add their own data options."""
    p = ClassifierParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), help="defaults for a kind of run, which the options given "
                   "override; scratch (small offline datasets): --no-pretrained --size 64 --bs 64 --epochs 20 "
                   "--label-smoothing 0.1")
    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="local image folder (one sub-folder per class, or "
                      "Oxford-style file names); skips the download")
    data.add_argument("--labels", choices=["folder", "filename"], help="how DIR is labelled (default: detected)")
    data.add_argument("--valid-pct", type=float, default=0.2, help="share of images held out for validation")
    data.add_argument("--seed", type=int, default=42, help="seed of the split, the augmentation and the init")
    model = p.add_argument_group("model")
    model.add_argument("--arch", default=DEFAULT_ARCH, help="any timm model name")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start from ImageNet weights from the Hub (fine_tune) or from scratch (one-cycle)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=epochs)
    train.add_argument("--size", type=int, default=size, help="square input size in pixels")
    train.add_argument("--min-scale", type=float, default=0.35, help="RandomResizedCrop's smallest crop area")
    train.add_argument("--start-size", type=int, default=None, metavar="PX",
                       help="progressive resizing: the first half of each fit of 2+ epochs trains on crops growing "
                       "from PX to --size (default: half of --size; --start-size equal to --size turns it off)")
    train.add_argument("--bs", type=int, default=32, help="batch size")
    train.add_argument("--lr", default=None, help=f"learning rate, or 'find' for fastai's lr_find "
                       f"(default: {FINE_TUNE_LR} fine-tuning, {SCRATCH_LR} from scratch)")
    train.add_argument("--wd", type=float, default=None, help="weight decay (default: fastai's, 0.01)")
    train.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the loss")
    train.add_argument("--workers", type=int, default=None,
                       help="data-loading processes (default: none with --presize, else fastai's: one per core)")
    train.add_argument("--presize", action=argparse.BooleanOptionalAction, default=True,
                       help="decode and shrink every image once into a cache, then train from the small copies")
    train.add_argument("--cache", metavar="DIR", default=None,
                       help=f"folder of presized copies (default: $IMAGELAB_CACHE or {default_cache()})")
    train.add_argument("--time-budget", type=float, metavar="SECONDS", default=None,
                       help="train for this long: the one-cycle schedule follows the clock, --epochs is a cap")
    train.add_argument("--resume", action="store_true",
                       help="continue the interrupted run whose checkpoint (<out stem>.ckpt) is beside --out")
    output = p.add_argument_group("output")
    output.add_argument("--out", default=out, help="exported learner; its report goes in <out stem>.report/")
    return p


def learning_rate(learn, lr, pretrained):
    if lr is None:
        return FINE_TUNE_LR if pretrained else SCRATCH_LR
    if lr == "find":
        return float(learn.lr_find(show_plot=False).valley)
    try:
        return float(lr)
    except ValueError:
        raise UserError(f"--lr must be a number or 'find', not {lr!r}") from None


class TimeBudget(Callback):
    """Fit for `seconds` of wall time: the one-cycle schedule follows the clock and training stops when time is up."""
    order = TrainEvalCallback.order + 1  # after fastai's step counter sets pct_train, before the schedulers read it

    def __init__(self, seconds, spent=0.0):
        self.seconds, self.spent = seconds, spent

    def before_fit(self):
        self.start = time.perf_counter() - self.spent

    def before_batch(self):
        if self.training:
            self.learn.pct_train = min(1.0, (time.perf_counter() - self.start) / self.seconds)

    def after_batch(self):
        if self.training and time.perf_counter() - self.start >= self.seconds:
            raise CancelFitException  # the report then evaluates the model as it is

    def after_epoch(self):
        if time.perf_counter() - self.start >= self.seconds:
            raise CancelFitException


class ProgressiveResize(Callback):
    """fastai's progressive resizing, epoch by epoch: small crops first, the full `size` for the second half
    of every fit of two epochs or more.

    On a CPU the model's forward and backward passes are nearly all of a step and grow with the pixels:
    an epoch at half the size cost about a third here (README: Speed). The second half of every fit, validation, the report and
    the export all use the full size, so the model is tuned to and judged at the size it serves.
    """
    order = TimeBudget.order + 1  # reads the clock-driven pct_train of a time-budgeted fit

    def __init__(self, crop, size, start):
        self.crop, self.size, self.start = crop, size, start

    def size_now(self):
        done = max(self.epoch / self.n_epoch, self.pct_train)  # pct_train: the clock under --time-budget
        if done >= 0.5 or self.n_epoch < 2:  # a one-epoch fit (fine_tune's frozen one) trains at full size
            return self.size
        grown = self.start + (self.size - self.start) * done / 0.5
        return min(self.size, max(self.start, round(grown / 8) * 8))  # multiples of 8 suit the convolutions

    def resize(self, size):
        self.crop.size = (size, size)

    def before_train(self):
        self.resize(self.size_now())

    def before_validate(self):
        self.resize(self.size)

    def after_fit(self):
        self.resize(self.size)


def fits(args, lr):
    """The one-cycle fits of a run as (epochs, fit): one from scratch; fine-tuning has two.

    This is fastai's `fine_tune` spelled out (a frozen epoch at `lr`, then every layer at
    `lr/2` with discriminative rates) so that a resumed run can start inside either fit.
    """
    if not args.pretrained:
        return [(args.epochs, lambda learn, **kw: learn.fit_one_cycle(args.epochs, lr, **kw))]

    def frozen(learn, **kw):
        learn.freeze()
        learn.fit_one_cycle(1, slice(lr), pct_start=0.99, **kw)

    def unfrozen(learn, **kw):
        learn.unfreeze()
        learn.fit_one_cycle(args.epochs, slice(lr / 2 / 100, lr / 2), pct_start=0.3, div=5.0, **kw)
    return [(1, frozen), (args.epochs, unfrozen)]


def train_classifier(args, root, task=None, cbs=()):
    """Train on the images under `root`, export `args.out` and its report; returns the metrics.

    `cbs` are extra fastai callbacks for every fit (loggers, the benchmark's turn-taking).

    Under a distributed launcher every process trains on its share of each batch; only the main
    process writes the checkpoint, the report and the model (the others return None).
    """
    if args.epochs < 1 or args.size < 8 or not 0 < args.valid_pct < 1:
        raise UserError("need --epochs >= 1, --size >= 8 and 0 < --valid-pct < 1")
    if args.start_size is not None and not 8 <= args.start_size <= args.size:
        raise UserError(f"need 8 <= --start-size <= --size ({args.size})")
    main_process = rank_distrib() == 0
    ckpt = checkpoint_path(args.out)
    if args.resume and not ckpt.exists():
        raise UserError(f"nothing to resume: no checkpoint at {ckpt}")
    if not args.resume and ckpt.exists() and main_process:
        print(f"note: {ckpt} holds an interrupted run; this run starts afresh (--resume continues it)")
    set_seed(args.seed, reproducible=True)
    files, skipped = find_images(root)
    for f, why in skipped:
        print(f"skipped {f}: {why}")
    labels = args.labels or detect_labels(root, files)
    get_y = label_function(labels, task)
    splitter = folder_split(root, files)
    presized = Presized(presize(files, args.size, args.cache) if args.presize else None)
    # Presized copies decode in a millisecond: worker processes would only take cores from the model.
    workers = args.workers if args.workers is not None else (0 if args.presize else None)
    dls = classifier_dls(files, get_y, size=args.size, min_scale=args.min_scale, bs=args.bs,
                         valid_pct=args.valid_pct, seed=args.seed, workers=workers, splitter=splitter,
                         get_x=presized)
    start_size = args.size // 2 if args.start_size is None else args.start_size
    crop = next(t for t in dls.train.after_item.fs if isinstance(t, RandomResizedCrop))
    resize = ProgressiveResize(crop, args.size, start_size)
    counts = split_counts(dls, get_y)
    print(f"{len(files)} images ({len(skipped)} skipped), classes: {', '.join(map(str, dls.vocab))}")
    learn = classifier_learner(dls, args.arch, args.pretrained, wd=args.wd, label_smoothing=args.label_smoothing)
    if len(dls.train_ds) < args.bs:  # fastai drops incomplete training batches: nothing would be trained
        raise UserError(f"only {len(dls.train_ds)} training images, fewer than --bs {args.bs}")
    settings = {"data": str(root), "task": task, **{k: getattr(args, k) for k in RESUME_KEYS if hasattr(args, k)}}

    state = load_checkpoint(ckpt, settings) if args.resume else None
    lr = state["lr"] if state else learning_rate(learn, args.lr, args.pretrained)
    history = LossHistory()
    if state:
        history.train, history.valid, history.step = state["history"]
        restore(learn, state)
        print(f"resuming after epoch {state['epoch']} of {sum(n for n, _ in fits(args, lr))} from {ckpt}")
    done = state["epoch"] if state else 0  # epochs finished, over all fits of the run
    seconds = state["seconds"] if state else 0.0
    first_step = history.step
    rng = state["rng"] if state else None
    start = time.perf_counter()

    def extra():  # what a checkpoint holds besides weights, optimizer and random streams
        return {"lr": lr, "history": (history.train, history.valid, history.step),
                "seconds": seconds + time.perf_counter() - start}

    try:
        with distributed(learn):
            offset, schedule = 0, fits(args, lr)
            for n, fit in schedule:
                if done < offset + n:  # this fit is not finished yet
                    first = done - offset
                    budget = [TimeBudget(args.time_budget, seconds + time.perf_counter() - start)] \
                        if args.time_budget and fit is schedule[-1][1] else []  # the budget drives the last fit
                    fit(learn, start_epoch=first,
                        cbs=[history, Checkpoint(ckpt, settings, extra, offset, first, rng), resize, *budget, *cbs])
                    rng = None  # restored once, before the first epoch this process trains
                    done = offset + n
                offset += n
    except KeyboardInterrupt:
        if main_process and ckpt.exists():
            print(f"the last finished epoch is saved in {ckpt}: rerun with --resume to continue", file=sys.stderr)
        raise
    seconds_here = time.perf_counter() - start
    processes = world_size()
    images = (history.step - first_step) * args.bs * processes  # every training batch is full (drop_last)
    leave_distributed()
    if not main_process:
        return None

    presized.copies.clear()  # the report and the exported model read the original files, as the app will
    with staged_export(args.out) as (tmp_model, tmp_report):
        metrics = classifier_report(learn, history, tmp_report)
        metrics.update(
            kind="classifier",
            task=task if labels == "filename" else "folder names", data=str(root), labels=labels,
            split="train/ and valid/ folders" if splitter else f"random {args.valid_pct:.0%}",
            arch=args.arch, pretrained=args.pretrained, size=args.size, start_size=start_size, min_scale=args.min_scale,
            epochs=args.epochs, bs=args.bs, lr=lr, wd=args.wd, label_smoothing=args.label_smoothing,
            seed=args.seed, valid_pct=args.valid_pct, presize=args.presize, processes=processes,
            resumed_after_epoch=state["epoch"] if state else None,
            valid_loss_per_epoch=[round(v, 5) for _, v in history.valid],
            train_seconds=round(seconds + seconds_here, 2),
            images_trained=images, images_per_second=round(images / seconds_here, 2) if images else None,
            counts={**counts, "skipped": len(skipped)}, skipped_files=[str(f) for f, _ in skipped],
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            versions=versions())
        write_json(metrics, tmp_report / "metrics.json")
        # Which file was held out, relative to the data folder: the cleaner shows a class's train or valid images.
        write_json({name: [f.relative_to(root).as_posix() for f in ds.items]
                    for name, ds in (("train", dls.train_ds), ("valid", dls.valid_ds))}, tmp_report / "split.json")
        save_examples(dls.valid_ds.items, get_y, tmp_report / "examples")
        learn.export(tmp_model.resolve())
        export_weights_only(learn, tmp_model)
    ckpt.unlink(missing_ok=True)  # the run is complete: nothing left to resume
    print(f"accuracy {metrics['accuracy']:.4f} on {len(dls.valid_ds)} held-out images; "
          f"wrote {args.out} and its report")
    return metrics
