"""Classify files and folders with an exported model: one row per image, bad files reported, never a stop.

    python -m imagelab.predict models/pets.pkl photo.jpg holiday/ --top-k 2 --csv predictions.csv
"""
import argparse
import csv
import sys
from pathlib import Path

from tqdm.auto import tqdm

from . import UserError, run_cli
from .inference import Predictor
from .paths import visible_files


def expand(paths):
    """Files as given, folders walked recursively (hidden files skipped), in a stable order."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from visible_files(p)
        elif p.exists():
            yield p
        else:
            raise UserError(f"no such file or folder: {p}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m imagelab.predict", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="exported model: .pkl (trusted) or its .onnx / .safetensors artifact")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--top-k", type=int, default=1, help="labels per image")
    p.add_argument("--csv", metavar="OUT", help="write the rows to this CSV file instead of standard output")
    args = p.parse_args(argv)
    files = list(expand(args.paths))
    predictor = Predictor(args.model)
    header = ["path"] + [f"{c}{i}" for i in range(1, args.top_k + 1) for c in ("label", "prob")] + ["error"]
    out = open(args.csv, "w", newline="") if args.csv else sys.stdout
    try:
        writer = csv.writer(out)
        writer.writerow(header)
        bad = 0
        for f in tqdm(files, desc="classifying", unit="img", disable=not args.csv):
            try:
                top = predictor.predict(f, k=args.top_k)
                row = [str(f)] + [x for label, prob in top.items() for x in (label, f"{prob:.4f}")]
                row += [""] * (len(header) - len(row) - 1) + [""]
            except UserError as e:
                bad += 1
                row = [str(f)] + [""] * (len(header) - 2) + [str(e)]
            writer.writerow(row)
    finally:
        if args.csv:
            out.close()
    print(f"{len(files) - bad} classified, {bad} unreadable", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
