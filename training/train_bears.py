"""Bear classifier: grizzly, black or teddy, from a web image search or any folder with one sub-folder per class.

    python training/train_bears.py                       # search + download into data/bears (once), then train
    python training/train_bears.py --download --per-class 200                # fetch more, then train
    python training/train_bears.py --download-only --classes cat dog --query "{} photo" --dest data/pets2
    python training/train_bears.py --data ../shared/data/bears --preset scratch   # offline
"""
from pathlib import Path

from imagelab import UserError, run_cli
from imagelab.config import ClassifierConfig, ConfigParser
from imagelab.paths import REPO, default_model
from imagelab.download import make_dataset


def main(argv=None):
    parser = ConfigParser(ClassifierConfig, __doc__.splitlines()[0], out=str(default_model("bears")))
    g = parser.add_argument_group("download (a web image search per class; --data skips it)")
    g.add_argument("--download", action="store_true", help="search and download into --dest, then train on it "
                   "(the default when --dest does not exist yet)")
    g.add_argument("--download-only", action="store_true", help="search and download into --dest, do not train")
    g.add_argument("--classes", nargs="+", default=["grizzly", "black", "teddy"], help="one folder per class")
    g.add_argument("--per-class", type=int, default=150, help="search results to download per class")
    g.add_argument("--query", default="{} bear", help="search query; {} is replaced by the class name")
    g.add_argument("--dest", default=str(REPO / "data" / "bears"), help="dataset folder the images are downloaded "
                   "into (default: data/bears in this checkout, from whatever folder you run, beside its models/)")
    g.add_argument("--download-workers", type=int, default=16, help="parallel downloads")
    g.add_argument("--timeout", type=float, default=10, help="seconds allowed for one image (and, when longer "
                   "than 10, for each search request)")
    args = parser.parse_args(argv)

    if args.data and (args.download or args.download_only):
        raise UserError("--data trains on a folder you have; --download fills --dest: use one of them")
    download = args.download or args.download_only or not (args.data or Path(args.dest).is_dir())
    cfg = None
    if not args.download_only:  # every training setting checked before the downloads, not after them
        if download and len(set(args.classes)) < 2:
            raise UserError(f"--classes: a classifier needs at least two, not {args.classes}")
        cfg = parser.config_from(args)
    if download:
        make_dataset(args.classes, args.dest, per_class=args.per_class, query=args.query,
                     workers=args.download_workers, timeout=args.timeout)
    if cfg:
        from imagelab.classifier import Classifier
        from imagelab.train import train
        cfg.data = args.data or args.dest
        train(Classifier(), cfg)


if __name__ == "__main__":
    run_cli(main)
