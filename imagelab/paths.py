"""Where things live: the files beside a model, which names in a dataset folder are images, the cache folder and the
names a cache gives what it keeps of a file.

Light (the standard library): the downloader, the cleaner and the apps use these
rules without the training stack.
"""
import hashlib
import os
import stat
from pathlib import Path

from . import UserError
from .writes import staging_path

REPO = Path(__file__).resolve().parents[1]

# What the dataset tools write at the top of a dataset folder (imagelab.download, imagelab.cleaning,
# imagelab.flagging): not training images unless asked for (flagged ones), so dataset_files leaves them out;
# class folders cannot take these names.
FLAGGED, REMOVED, QUARANTINE = "flagged", "removed", "quarantine"
CLEANING_LOG, DOWNLOAD_SUMMARY = "cleaning-log.jsonl", "download-summary.json"
BOOKKEEPING = (QUARANTINE, REMOVED, FLAGGED, DOWNLOAD_SUMMARY, CLEANING_LOG)
# A dataset with train/ and valid/ folders keeps their split (imagelab.data.folder_split): train/ and the flagged
# images train, valid/ is measured, any other top-level folder (a test/ set) is left out. metrics.json "split" then
# says FOLDER_SPLIT, else how the images were drawn at random.
SPLIT_FOLDERS = TRAIN, VALID = "train", "valid"
LABELLED_FOLDERS = (*SPLIT_FOLDERS, FLAGGED)
FOLDER_SPLIT = f"{TRAIN}/ and {VALID}/ folders"


def split_by_folders(tops):
    """Whether a dataset folder whose top-level names are `tops` is split by `train/` and `valid/` folders (as
    fastai's from_folder): its classes are below them."""
    return set(SPLIT_FOLDERS) <= set(tops)


def default_model(name, root=REPO, suffix=".pkl"):
    """`<root>/models/<name>.pkl`: where `training/train_<name>.py` exports by default and the apps look (root: a
    checkout, whatever the working folder, or a Space)."""
    return Path(root) / "models" / f"{name}{suffix}"


def existing_folder(root):
    """`root` as a Path, or one line if it is not a folder (a mistyped --data)."""
    if not str(root).strip():  # Path("") is the working folder: not what an empty --data or variable meant
        raise UserError("no folder given (an empty name): name the dataset folder")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"not a folder: {root}" if root.exists() else f"no such folder: {root}")
    return root


def writable_model_path(path):
    """`path` (--out) as a Path, or one line if a learner cannot be written there: found before the training, not
    after it."""
    path = Path(path)
    if path.suffix != ".pkl":
        raise UserError(f"--out must name a .pkl file, the learner (its other files are written beside it): {path}")
    if path.is_dir():
        raise UserError(f"--out {path} is a folder: name the file, e.g. --out {path / 'model.pkl'}")
    existing = next(p for p in path.parents if p.exists())  # the folder, or the part of it that exists
    if not existing.is_dir():
        raise UserError(f"cannot write {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {existing} is not writable (read-only, or not yours)")
    # the longest name a run writes (the checkpoint's staging name), where it will write
    probe = existing / max(staging_path(path).name, staging_path(checkpoint_path(path)).name, key=len)
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:  # a name too long for the disk, a system folder (/proc, /sys), root's files on a network disk
        raise UserError(f"cannot write {path}: {e.strerror} ({existing})") from None
    # The export's names (that fit, now known); a folder where the checkpoint goes fails its first write, in one line
    for other in artifact_paths(path).values():
        check_replaceable(path, other, folder=False)
    check_replaceable(path, report_dir(path), folder=True)
    return path


def check_replaceable(model, path, folder):
    """One line if `path`, where a run into `model` writes a folder (`folder`) or a file, holds the other kind: an
    export cannot replace one with the other."""
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"cannot export to {model}: {path} is a {'file' if folder else 'folder'}; move it away, or "
                        "give another --out")


def report_dir(model):
    """The folder beside a model with its plots, metrics and example images: `pets.pkl` -> `pets.report/`."""
    model = Path(model)
    return model.with_name(model.stem + ".report")


def examples_dir(model):
    return report_dir(model) / "examples"


EXAMPLE_SUFFIX = ".jpg"  # the examples are small JPEGs whatever the photos were: any browser and Space shows them


def example_images(model):
    """The example images saved beside a model (the app's examples), in name order; nothing else in their folder."""
    return sorted(examples_dir(model).glob("*" + EXAMPLE_SUFFIX))


def metrics_path(model):
    return report_dir(model) / "metrics.json"


def split_path(model):
    """Which files trained and which were held out, relative to the data folder (the cleaner shows either)."""
    return report_dir(model) / "split.json"


# An autoencoder's graph of a code, beside its graph of an image (`ae.onnx`): not a model that serves by itself.
DECODER = ".decoder.onnx"


def artifact_paths(model):
    """The weights-only artifacts beside a learner: `pets.pkl` -> `pets.safetensors`, `pets.config.json`, `pets.onnx`
    (and an autoencoder's `ae.decoder.onnx`, code to image).

    Loading them runs no pickle: safetensors and ONNX are plain data, the config is JSON.
    """
    model = Path(model)
    return {"weights": model.with_suffix(".safetensors"), "onnx": model.with_suffix(".onnx"),
            "config": model.with_name(model.stem + ".config.json"),
            "decoder": model.with_name(model.stem + DECODER)}


def checkpoint_path(model):
    """`models/pets.pkl` -> `models/pets.ckpt` (ignored by git like the model)."""
    model = Path(model)
    return model.with_name(model.stem + ".ckpt")


def nothing_to_resume(checkpoint):
    """The one line of --resume where there is no checkpoint at `checkpoint`: found by the options' check, or later."""
    return UserError(f"nothing to resume: no checkpoint at {checkpoint}")


def cache_folder(cache=None):
    """Where presized copies, look-alike fingerprints and downloaded runtimes live: `cache` (--cache) when given, else
    $IMAGELAB_CACHE, else imagelab in $XDG_CACHE_HOME or ~/.cache (safe to delete at any time)."""
    if cache:
        return Path(cache)
    if os.environ.get("IMAGELAB_CACHE"):
        return Path(os.environ["IMAGELAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagelab"


def digest(*parts):
    """A file name for what `parts` name, the same in every run (fsencode: any name a disk holds, UTF-8 or not)."""
    return hashlib.sha1(os.fsencode("|".join(map(str, parts)))).hexdigest()


def file_key(path, version, *extra):
    """The name of what a cache keeps of the file at `path` (its presized copy, its fingerprint): it changes when the
    file does (its path, modification time or size) and when `version` (how the cache makes it) or `extra` do."""
    st = Path(path).stat()
    return digest(version, Path(path).resolve(), st.st_mtime_ns, st.st_size, *extra)


def hidden(name):
    return name.startswith(".")


def not_regular(path):
    """The reason to skip a named pipe, socket or device, or a link to one, unopened: opening a pipe waits for a writer
    that may never come, and a device may never end. None for a file, or a path not there (its reader says why)."""
    try:
        mode = os.stat(path).st_mode  # stat opens nothing
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) else "not a regular file"


def visible_files(folder):
    """Every entry under `folder` that is not a folder (recursive, through links to folders: a class folder is often
    one), none hidden or inside a hidden folder, in a stable order. A folder reached twice (a link back up) is read
    once; a link that leads nowhere, a named pipe or a link to one is listed, for its reader to say so
    (`not_regular`, before it opens anything)."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not hidden(d))
        found += [Path(top) / f for f in files if not hidden(f)]
    return sorted(found)


def is_flagged(path, root=""):
    """Whether `path` is an image the apps' visitors flagged: `root/flagged/<class>/<name>` (`root` left out: a path
    relative to the dataset folder, as split.json and the cleaning log name them)."""
    return Path(path).relative_to(root).parts[0] == FLAGGED


def dataset_files(root, flagged=False):
    """The candidate images of a dataset folder: its visible files, less the dataset tools' bookkeeping;
    with `flagged`, also the images the apps' visitors flagged (`flagged/<class>/`)."""
    root = Path(root)
    left_out = tuple(b for b in BOOKKEEPING if not (flagged and b == FLAGGED))
    return [p for p in visible_files(root) if p.relative_to(root).parts[0] not in left_out]


def plain_name(name):
    """A file name that is one path component and nothing else, not hidden."""
    if not isinstance(name, str) or name in ("", ".", "..") or hidden(name) or any(c in name for c in "/\\\0"):
        raise UserError(f"not a file name: {name!r}")
    return name


def check_class(label, classes):
    """One line unless `label` is one of the model's `classes` (what a caller of the flag or cleaner API sent)."""
    if label not in classes:
        what = "choose a class" if label in (None, "") else f"not a class of this model: {label!r}"
        raise UserError(f"{what} (classes: {', '.join(classes)})")


def check_class_name(name):
    """A class name is a folder name: one plain path component, not hidden, not one of the tools' own."""
    if not isinstance(name, str) or not name.strip() or name in BOOKKEEPING:
        raise UserError(f"not a usable class name: {name!r}")
    try:
        return plain_name(name)
    except UserError:
        raise UserError(f"not a usable class name: {name!r}") from None
