"""What each ingredient of the `scratch` preset adds: the same data, split, seed and time budget, one ingredient at a time.

    python benchmarks/ablation.py --data ../shared/data/catsdogs --time-budget 383 --only 1 4 5 6 7
    python benchmarks/ablation.py --data ../shared/data/catsdogs --time-budget 200 --only 0 1 2 3

Each variant trains `imagelab.train.train` of the classifier with the `scratch` preset for the same
wall time, one after the other in this process; the held-out accuracy (with its standard error) is
measured by the report on the original files, with fastai's TTA beside it. The last line printed is
one JSON object.
"""
import json
import tempfile
from pathlib import Path

from imagelab import ArgumentParser, run_cli, standard_error

# The preset before this table changed it: resnet18 with 20 epochs at most.
BEFORE = {"arch": "resnet18", "epochs": 20}
# (name, settings over the scratch preset): each row adds one ingredient to row 1, or swaps one; the last is the preset
VARIANTS = [("resnet18, last epoch", {**BEFORE, "keep": "last"}),
            ("resnet18, the best epoch (--keep best, the default)", BEFORE),
            ("+ MixUp", {**BEFORE, "mix": "mixup"}),
            ("+ CutMix instead", {**BEFORE, "mix": "cutmix"}),
            ("+ lr 1e-2 instead of 3e-3", {**BEFORE, "lr": "1e-2"}),
            ("size 96 instead of 64", {**BEFORE, "size": 96}),
            ("resnet10t instead of resnet18", {"epochs": 20}),
            ("resnet10t, up to 40 epochs (the preset)", {})]


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", metavar="DIR", required=True, help="image folder, one sub-folder per class")
    p.add_argument("--time-budget", type=float, default=200, metavar="SECONDS", help="training time of every variant")
    p.add_argument("--only", nargs="*", metavar="N", type=int, help="run only these rows of the table (from 0)")
    args = p.parse_args(argv)
    from imagelab.classifier import Classifier
    from imagelab.config import ClassifierConfig
    from imagelab.train import train
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(VARIANTS):
            if args.only is not None and i not in args.only:
                continue
            cfg = ClassifierConfig(**{**ClassifierConfig.PRESETS["scratch"], "data": args.data,
                                      "time_budget": args.time_budget, "out": str(Path(tmp) / f"{i}.pkl"), **extra})
            m = train(Classifier(), cfg)
            n = sum(m["counts"]["valid"].values())
            row = {"variant": name, **extra, "arch": cfg.arch, "accuracy": round(m["accuracy"], 4),
                   "standard_error": round(standard_error(m["accuracy"], n), 4),
                   "tta_accuracy": round(m["tta_accuracy"], 4), "tta_seconds": m["tta_seconds"],
                   "kept_epoch": m["kept_epoch"], "epochs_trained": m["epochs_trained"],
                   "valid_loss": round(m["valid_loss"], 4), "train_seconds": m["train_seconds"],
                   "images_per_second": m["images_per_second"], "valid_images": n}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(json.dumps({"data": args.data, "time_budget": args.time_budget, "rows": rows}))


if __name__ == "__main__":
    run_cli(main)
