"""Convolutional autoencoder: learn a compact code for images, scored against PCA with as many components.

    python training/train_autoencoder.py                          # downloads Oxford-IIIT Pet
    python training/train_autoencoder.py --data ../shared/data/catsdogs --epochs 3 --size 64 --code-size 64
    python training/train_autoencoder.py --data DIR --sparsity 1e-3  # the sparse variant
"""
import argparse
import time
from datetime import datetime, timezone

from imagelab import UserError, run_cli  # first: it quiets fastai's import-time deprecation warning
from imagelab.autoencoder import (LOSSES, CodeSparsity, ConvAutoencoder, autoencoder_dls, autoencoder_learner,
                                  autoencoder_report)
from imagelab.data import Presized, default_cache, find_images, pets_images, presize
from imagelab.export import save_examples, staged_export
from imagelab.metadata import versions, write_json
from imagelab.reports import LossHistory
from fastai.vision.all import set_seed


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="any local folder of images (recursive, labels ignored); "
                      "skips the download")
    data.add_argument("--valid-pct", type=float, default=0.2, help="share of images held out for scoring")
    data.add_argument("--seed", type=int, default=42, help="seed of the split, the augmentation and the init")
    model = p.add_argument_group("model")
    model.add_argument("--code-size", type=int, default=64, help="numbers in the code (the bottleneck); "
                       "PCA gets as many components")
    model.add_argument("--depth", type=int, default=2, help="stride-2 blocks in the encoder (upsampling blocks in the "
                       "decoder); in three epochs 2 levels train better than 3 or 4")
    model.add_argument("--width", type=int, default=32, help="channels of the first block, doubling each block")
    model.add_argument("--blocks", type=int, default=1, help="residual blocks at each level of the encoder and decoder")
    model.add_argument("--loss", choices=sorted(LOSSES), default="mse", help="reconstruction loss")
    model.add_argument("--sparsity", type=float, default=0.0, metavar="LAMBDA",
                       help="L1 penalty on the code (sparse autoencoder; the code goes through a ReLU)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--size", type=int, default=64, help="square input size in pixels")
    # Small batches: three epochs of 1,280 images are 960 steps at 4 a batch, 120 at 32, and the model
    # needs steps more than it needs big batches (notes in README "Autoencoder").
    train.add_argument("--bs", type=int, default=4, help="batch size")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the one-cycle schedule")
    train.add_argument("--wd", type=float, default=None, help="decoupled weight decay (None: fastai's 0.01)")
    train.add_argument("--workers", type=int, default=None,
                       help="data-loading processes (None: none with --presize, else fastai's: one per core)")
    train.add_argument("--presize", action=argparse.BooleanOptionalAction, default=True,
                       help="decode each image once into a small cached copy and train on the copies")
    train.add_argument("--cache", metavar="DIR",
                       help=f"folder of presized copies (None: $IMAGELAB_CACHE or {default_cache()})")
    output = p.add_argument_group("output")
    output.add_argument("--out", default="models/autoencoder.pkl",
                        help="exported learner; its report goes in <out stem>.report/")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.epochs < 1 or args.sparsity < 0 or not 0 < args.valid_pct < 1:
        raise UserError("need --epochs >= 1, --sparsity >= 0 and 0 < --valid-pct < 1")
    set_seed(args.seed, reproducible=True)
    model = ConvAutoencoder(args.size, args.code_size, args.depth, args.width, sparse=args.sparsity > 0,
                            blocks=args.blocks)
    root = args.data or pets_images()
    files, skipped = find_images(root)
    for f, why in skipped:
        print(f"skipped {f}: {why}")
    presized = Presized(presize(files, args.size, args.cache) if args.presize else None)
    # Presized copies decode in a millisecond: worker processes would only take cores from the model.
    workers = args.workers if args.workers is not None else (0 if args.presize else None)
    dls = autoencoder_dls(files, args.size, args.bs, args.valid_pct, args.seed, workers, get_x=presized)
    print(f"{len(files)} images ({len(skipped)} skipped): {len(dls.train_ds)} to train, {len(dls.valid_ds)} held out")
    learn = autoencoder_learner(dls, model, args.loss, args.wd)

    history = LossHistory()
    start = time.perf_counter()
    learn.fit_one_cycle(args.epochs, args.lr, cbs=[history] + ([CodeSparsity(args.sparsity)] if args.sparsity else []))
    seconds = time.perf_counter() - start

    presized.copies.clear()  # the report (and PCA) and the exported model read the original files, as the app will
    with staged_export(args.out) as (tmp_model, tmp_report):
        m = autoencoder_report(learn, history, tmp_report)
        m.update(kind="autoencoder", data=str(root), code_size=args.code_size, depth=args.depth, width=args.width, blocks=args.blocks,
                 loss=args.loss, wd=args.wd, presize=args.presize,
                 sparsity=args.sparsity, size=args.size, epochs=args.epochs, bs=args.bs, lr=args.lr, seed=args.seed,
                 valid_pct=args.valid_pct, train_seconds=round(seconds, 2),
                 images_per_second=round(len(dls.train_ds) * args.epochs / seconds, 2),
                 counts={**m["counts"], "skipped": len(skipped)}, skipped_files=[str(f) for f, _ in skipped],
                 created=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=versions())
        write_json(m, tmp_report / "metrics.json")
        save_examples(dls.valid_ds.items, lambda f: "example", tmp_report / "examples", per_class=4)
        learn.export(tmp_model.resolve())
    print(f"held-out MSE {m['ae_mse']:.5f} (PSNR {m['ae_psnr']:.2f} dB) vs PCA with {m['pca_components']} components "
          f"{m['pca_mse']:.5f} ({m['pca_psnr']:.2f} dB): ratio {m['mse_ratio_ae_to_pca']:.3f}; "
          f"trained in {seconds:.0f} s; wrote {args.out} and its report")
    return m


if __name__ == "__main__":
    run_cli(main)
