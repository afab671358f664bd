"""Classify files and folders with an exported model: one row per image, bad files and missing paths reported, never a stop.

    python -m imagelab.predict models/pets.pkl photo.jpg holiday/ --top-k 2 --csv predictions.csv

A path that cannot be classified (missing, empty, not an image, truncated...) gets a row with the reason
in its `error` column. The exit status is 0 when at least one image was classified; when none was (say,
every path was mistyped), the rows are still written and the program ends with one line and status 2.
The CSV is UTF-8; a file name that is not (as a disk may hold) is written as the bytes it has. `--csv OUT`
appears whole when the run ends: an interrupted run leaves no half-written file, and an earlier OUT as it was.
"""
import csv
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from . import ArgumentParser, UserError, require, run_cli, stdout_reader_gone
from .loading import CLASSIFIER, FORMS, open_model
from .paths import not_regular, visible_files
from .writes import staging_path


def expand(paths):
    """(path, None) for each file as given and each file in a folder (recursively, hidden files skipped), in a
    stable order; (path, reason) for a path that is not there or not a regular file (a named pipe: never opened)."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from ((f, not_regular(f)) for f in visible_files(p))
        elif p.exists():
            yield p, not_regular(p)
        else:
            yield p, "no such file or folder"


def classify(predictor, items, top_k, writer, progress):
    """Write one row per item; return the reasons of the ones that were not classified."""
    width = 2 * top_k
    errors = []
    for f, error in tqdm(items, desc="classifying", unit="img", disable=not progress):
        if error is None:
            try:
                top = predictor.predict(f, k=top_k)
                cells = [x for label, prob in top.items() for x in (label, f"{prob:.4f}")]
                writer.writerow([str(f)] + cells + [""] * (width - len(cells)) + [""])
                continue
            except UserError as e:
                error = str(e)
        errors.append(f"{f}: {error}")
        writer.writerow([str(f)] + [""] * width + [error])
    return errors


def check_paths(paths):
    """One line, before the model loads, for an empty PATH: Path("") is ".", and the current folder would be
    classified, every file below it."""
    empty = [i for i, p in enumerate(paths, 1) if not p]
    if empty:
        which = f" (PATH {', '.join(map(str, empty))} of {len(paths)})" if len(paths) > 1 else ""
        raise UserError(f"an empty PATH argument ''{which}: name an image file or folder (. for the current folder)")


def check_output(path):
    """One line, before the model loads, for a --csv that cannot be written there."""
    if not path:  # Path("") is ".", the current folder: found only once every image was classified
        raise UserError("--csv is empty: name the CSV file to write (e.g. --csv predictions.csv), or leave --csv out "
                        "for standard output")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--csv {path}: that is a folder; name a file")
    if not path.parent.is_dir():
        raise UserError(f"--csv {path}: no such folder: {path.parent}")


@contextmanager
def output(path):
    """Standard output, or `path` written whole: rows go to a hidden sibling renamed onto `path` (the file a link
    names, not the link) at the end. What is not a file (/dev/null, /dev/stdout, a pipe) is written as it is:
    renamed over, a device would become a file."""
    if path is None:
        if hasattr(sys.stdout, "reconfigure"):  # not a notebook's or a test's stand-in
            sys.stdout.reconfigure(encoding="utf-8", errors="surrogateescape")
        yield sys.stdout
        return
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            yield f
        return
    path = Path(os.path.realpath(path))
    tmp = staging_path(path)
    try:
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv=None):
    p = ArgumentParser(prog="python -m imagelab.predict", description=__doc__.splitlines()[0])
    p.add_argument("model", help=f"exported classifier: {FORMS[CLASSIFIER]} (a .pkl alone is unpickled: trusted only)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--top-k", type=int, default=1, help="labels per image")
    p.add_argument("--csv", metavar="OUT", help="write the rows to this CSV file instead of standard output")
    p.add_argument("--tta", action="store_true", help="average each image's probabilities with its mirror image's "
                   "(test-time augmentation): twice the time per image")
    args = p.parse_args(argv)
    require([("--top-k", args.top_k, args.top_k >= 1, "at least 1")])
    check_paths(args.paths)
    if args.csv is not None:
        check_output(args.csv)
    # max_pixels: your own files, as big as training reads
    predictor = open_model(args.model, CLASSIFIER, tta=args.tta, max_pixels=None)
    top_k = min(args.top_k, len(predictor.vocab))  # a column per class at most
    items = list(expand(args.paths))
    if not items:  # before --csv is written: an earlier OUT stays as it was
        raise UserError(f"nothing classified: no files in {' '.join(args.paths)}")
    header = ["path"] + [f"{c}{i}" for i in range(1, top_k + 1) for c in ("label", "prob")] + ["error"]
    try:
        with output(args.csv) as out:
            writer = csv.writer(out)
            writer.writerow(header)
            errors = classify(predictor, items, top_k, writer, progress=bool(args.csv))
    except BrokenPipeError:  # `| head` has read what it wanted
        stdout_reader_gone()
        return
    except OSError as e:  # a full disk, a folder that went away
        raise UserError(f"could not write {args.csv or 'standard output'}: {e.strerror or e}") from None
    if len(errors) == len(items):
        raise UserError(f"nothing classified: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    failed = f", {len(errors)} not (the error column says why)" if errors else ""
    print(f"{len(items) - len(errors)} classified{failed}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main, interrupted="interrupted: a --csv file is written only at the end (an earlier one is as it was)")
