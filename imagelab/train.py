"""The generic image-classifier trainer behind every training script; each script is a preset of it."""
import argparse
import time
from datetime import datetime, timezone

from fastai.vision.all import set_seed

from . import UserError
from .data import classifier_dls, detect_labels, find_images, label_function, split_counts
from .export import export_weights_only, save_examples, staged_export
from .models import classifier_learner
from .reports import LossHistory, classifier_report, versions, write_json

# Chosen for accuracy per CPU second; README.md ("Choosing the default architecture") has the numbers.
DEFAULT_ARCH = "convnext_nano"
# fastai's documented defaults: fine_tune's base_lr, and a one-cycle peak that suits from-scratch convnets.
FINE_TUNE_LR, SCRATCH_LR = 2e-3, 3e-3


def classifier_parser(description, out, epochs=3, size=224):
    """The knobs every classifier script shares, grouped like a table; scripts add their own data options."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    train.add_argument("--bs", type=int, default=32, help="batch size")
    train.add_argument("--lr", default=None, help=f"learning rate, or 'find' for fastai's lr_find "
                       f"(default: {FINE_TUNE_LR} fine-tuning, {SCRATCH_LR} from scratch)")
    train.add_argument("--workers", type=int, default=None, help="data-loading processes (default: fastai's)")
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


def train_classifier(args, root, task=None):
    """Train on the images under `root`, export `args.out` and its report; returns the metrics."""
    if args.epochs < 1 or args.size < 8 or not 0 < args.valid_pct < 1:
        raise UserError("need --epochs >= 1, --size >= 8 and 0 < --valid-pct < 1")
    set_seed(args.seed, reproducible=True)
    files, skipped = find_images(root)
    for f, why in skipped:
        print(f"skipped {f}: {why}")
    labels = args.labels or detect_labels(root, files)
    get_y = label_function(labels, task)
    dls = classifier_dls(files, get_y, size=args.size, min_scale=args.min_scale, bs=args.bs,
                         valid_pct=args.valid_pct, seed=args.seed, workers=args.workers)
    counts = split_counts(dls, get_y)
    print(f"{len(files)} images ({len(skipped)} skipped), classes: {', '.join(map(str, dls.vocab))}")
    learn = classifier_learner(dls, args.arch, args.pretrained)
    lr = learning_rate(learn, args.lr, args.pretrained)

    history = LossHistory()
    start = time.perf_counter()
    if args.pretrained:
        learn.fine_tune(args.epochs, base_lr=lr, cbs=[history])
        epochs_run = args.epochs + 1  # fine_tune adds one frozen epoch
    else:
        learn.fit_one_cycle(args.epochs, lr, cbs=[history])
        epochs_run = args.epochs
    seconds = time.perf_counter() - start

    with staged_export(args.out) as (tmp_model, tmp_report):
        metrics = classifier_report(learn, history, tmp_report)
        metrics.update(
            task=task if labels == "filename" else "folder names", data=str(root), labels=labels,
            arch=args.arch, pretrained=args.pretrained, size=args.size, min_scale=args.min_scale,
            epochs=args.epochs, bs=args.bs, lr=lr, seed=args.seed, valid_pct=args.valid_pct,
            train_seconds=round(seconds, 2), images_per_second=round(len(dls.train_ds) * epochs_run / seconds, 2),
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
    print(f"accuracy {metrics['accuracy']:.4f} on {len(dls.valid_ds)} held-out images; "
          f"wrote {args.out} and its report")
    return metrics
