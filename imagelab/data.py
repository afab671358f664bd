"""Where images come from and how they are labelled: datasets, file checks, label functions, loaders."""
import io
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastai.vision.all import (CategoryBlock, DataBlock, IntToFloatTensor, PILImage, RandomResizedCrop, RandomSplitter,
                               Transform, TransformBlock, URLs, aug_transforms, untar_data)
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import UserError, first_line
from .images import check_image, open_image, open_rgb
from .lookalikes import fingerprints, groups, pairs
from .flagging import FLAGGED_NAME
from .paths import (FLAGGED, FOLDER_SPLIT, LABELLED_FOLDERS, SPLIT_FOLDERS, TRAIN, VALID, cache_folder, dataset_files,
                    existing_folder, file_key, is_flagged, split_by_folders)
from .writes import staging_path

# Oxford-IIIT Pet names files `<breed>_<n>.jpg`; cat breeds are capitalised, dog breeds are not.
OXFORD_NAME = re.compile(r"^(.+)_\d+$")


class RGBImage(PILImage):
    """fastai's `PILImage`, decoded by `open_rgb` so that alpha, palettes, EXIF rotation and frames are handled.

    Takes what a course learner takes: a path (str or Path), a PIL image (fastai's `PILImage` too), the
    bytes of a file, or an HxWxC uint8 array.
    """

    @classmethod
    def create(cls, fn, **kwargs):
        if isinstance(fn, (bytes, bytearray)):
            fn = io.BytesIO(fn)
        elif isinstance(fn, np.ndarray):
            fn = Image.fromarray(fn)
        if isinstance(fn, (str, Path, Image.Image, io.IOBase)):
            return cls(open_rgb(fn))
        return super().create(fn, **kwargs)


class ReadRGB(Transform):
    """`RGBImage.create` as a transform. fastai's `ImageBlock(cls=RGBImage)` dispatches to the classmethod through a
    function made at run time, which an exported learner carries by value, with this file's path on the trainer's
    disk; a learner refers to this class by name."""

    def encodes(self, fn):
        return RGBImage.create(fn)


def RGBImageBlock():
    """fastai's `ImageBlock`, decoding with `open_rgb`."""
    return TransformBlock(type_tfms=ReadRGB(), batch_tfms=IntToFloatTensor)


# Presized copies keep this many times the training size on their short side: RandomResizedCrop's
# crops (a third of the image or more) then come from about as many pixels as they end up with.
PRESIZE = 1.5
PRESIZE_VERSION = 2  # part of every cache key: bump it when the way copies are made changes
# Threads that decode images (PIL releases the GIL while decoding): presizing also resizes and writes a JPEG.
PRESIZE_THREADS, CHECK_THREADS = 4, 8


def presized_path(src, side, cache):
    """The cache file for `src` at `side` pixels, named by imagelab.paths.file_key: it changes when the file does."""
    key = file_key(src, PRESIZE_VERSION, side)
    return Path(cache) / f"{side}px" / key[:2] / f"{key}.jpg"


def presize_one(src, dest, side):
    """Decode `src` once (upright RGB, as `open_rgb`), shrink its short side to `side`, save it as a JPEG."""
    with open_image(src) as im:
        im.draft("RGB", (side, side))  # JPEG: decode at 1/2..1/8 scale while both sides stay >= side
        im = open_rgb(im)
    scale = side / min(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.LANCZOS, reducing_gap=3.0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(dest)
    im.save(tmp, "JPEG", quality=95, subsampling=0)  # 4:4:4 chroma: colour edges stay sharp
    os.replace(tmp, dest)  # atomic: a concurrent or interrupted run never sees half a file


def presize(files, size, cache=None):
    """{file: presized copy} for every file, making the missing copies (decoded in parallel threads).

    Decoding and cropping a full-size photo costs a CPU a fair share of what the model's step costs;
    decoding a small copy is several times cheaper. Copies are made once per dataset and size, then reused.
    """
    side = round(size * PRESIZE)
    cache = cache_folder(cache)
    dests = {f: presized_path(f, side, cache) for f in files}
    todo = [f for f, d in dests.items() if not d.exists()]
    failed = []

    def make(f):
        try:
            presize_one(f, dests[f], side)
        except Exception as e:  # a full or read-only cache, or a file unreadable after all: train on the original
            dests.pop(f)
            failed.append(e)

    if todo:
        with ThreadPoolExecutor(PRESIZE_THREADS) as pool:  # PIL releases the GIL while decoding and resizing
            list(tqdm(pool.map(make, todo), total=len(todo), desc=f"presizing to {side}px", unit="img", leave=False))
    if failed:
        print(f"note: {len(failed)} of {len(files)} presized copies could not be made in {cache} "
              f"({first_line(failed[0])}): those images are read from their files")
    return dests


class Presized(Transform):
    """A file's presized copy when one is known, else the file: the `get_x` of the training data.

    `copies` is emptied before export, so an exported learner reads the files it is given.
    """
    # What `learn.predict` may be given: fastai's test_dl looks up the item's type here to decide which
    # steps to apply (without it, only a pathlib.Path would do). Anything but a Path passes through.
    input_types = (Path, str, bytes, bytearray, io.IOBase, Image.Image, np.ndarray)

    def __init__(self, copies=None):
        super().__init__()
        self.copies = dict(copies or {})

    def encodes(self, path: Path):
        return self.copies.get(path, path)


def is_cat(path):
    """Oxford-IIIT Pet: an upper-case first letter of the file name means a cat."""
    return "cat" if Path(path).name[0].isupper() else "dog"


def breed(path):
    """Oxford-IIIT Pet: the breed is the file name without its trailing `_<n>`."""
    m = OXFORD_NAME.match(Path(path).stem)
    if not m:
        raise ValueError(f"not an Oxford-IIIT Pet file name: {Path(path).name}")
    return m.group(1)


def parent_label(path):
    return Path(path).parent.name


class FlaggedOr:
    """An Oxford-style label function that reads a flagged image's class from its folder (`flagged/<class>/`):
    the apps name a flagged upload after its content, so its name says nothing of its class."""

    def __init__(self, get_y):
        self.get_y = get_y

    def __call__(self, path):
        path = Path(path)
        flagged = path.parent.parent.name == FLAGGED and FLAGGED_NAME.fullmatch(path.name)
        return path.parent.name if flagged else self.get_y(path)


def find_images(root, flagged=False):
    """Every decodable image under `root` and the files skipped with why (recursive; hidden files and the
    tools' BOOKKEEPING, such as quarantined or removed images, are left out; flagged ones too unless `flagged`).

    Scraped folders name files `x.jpg?width=3200&fit=crop` and hold stray non-images, so files are
    judged by decoding them, not by their extension.
    """
    root = existing_folder(root)
    files = dataset_files(root, flagged)
    if not files:
        raise UserError(f"no files in {root}")
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        reasons = list(tqdm(pool.map(check_image, files), total=len(files), desc="checking images",
                            unit="img", leave=False))
    good = [f for f, r in zip(files, reasons) if r is None]
    bad = [(f, r) for f, r in zip(files, reasons) if r is not None]
    if not good:
        raise UserError(f"no readable images in {root} ({len(bad)} files skipped)")
    return good, bad


def detect_labels(root, files):
    """'folder' when the images sit in one sub-folder per class, 'filename' for Oxford-style names (flagged images,
    `flagged/<class>/`, go with either)."""
    root = Path(root)
    files = [f for f in labelled(root, files) if not is_flagged(f, root)] or files
    bases = {root / f for f in SPLIT_FOLDERS} if split_by_folders(top_names(root, files)) else {root}
    parents = {f.parent for f in files}
    if not parents & bases and len(parents) >= 2:
        return "folder"
    if not parents & bases:
        (only,) = parents
        unreadable = unreadable_classes(root, files)
        if unreadable:  # the other classes are there: their files could not be read
            raise UserError(f"{no_readable_image(root, unreadable, where=f' in {root}')}, so "
                            f"{only.relative_to(root).as_posix()}/ is the only class: a classifier needs at least two; "
                            f"add photos to {'it' if len(unreadable) == 1 else 'them'}")
        raise UserError(f"only one class in {root} ({only.name}/): a classifier needs one sub-folder per class, "
                        "at least two")
    wrong = misnamed(files)
    if not wrong:
        return "filename"
    raise UserError(f"cannot tell the labels of {root}: some images are outside class sub-folders, and {len(wrong)} of "
                    f"{len(files)} are not named like Abyssinian_12.jpg (such as {Path(wrong[0]).relative_to(root)}): "
                    "use one sub-folder per class, or Oxford-style file names")


def unreadable_classes(root, files):
    """The class folders of a dataset whose images `files` are (those find_images could read) that hold files, none
    readable, with how many: {folder: files}. Their classes are missing from the model."""
    root = Path(root)
    files = [Path(f) for f in [f for f in labelled(root, files) if not is_flagged(f, root)] or files]
    split = split_by_folders(top_names(root, files))
    bases = {root / f for f in SPLIT_FOLDERS} if split else {root}
    classes = {f.parent.name for f in files}
    return Counter(f.parent for f in dataset_files(root) if f.parent not in bases and f.parent.name not in classes
                   and (not split or f.relative_to(root).parts[0] in SPLIT_FOLDERS))


def no_readable_image(root, unreadable, where=""):
    """What `unreadable_classes` found, in words: 'b/, c/<where> have no readable image (their 3 files were skipped as
    unreadable)'."""
    one, n = len(unreadable) == 1, sum(unreadable.values())
    return (f"{', '.join(f'{d.relative_to(root).as_posix()}/' for d in sorted(unreadable))}{where} "
            f"{'has' if one else 'have'} no readable image ({'its' if one else 'their'} "
            f"{'file was' if n == 1 else f'{n} files were'} skipped as unreadable)")


def misnamed(files):
    """The files whose names are not Oxford-style (`Abyssinian_12.jpg`): the filename labels cannot read them."""
    return [f for f in files if not OXFORD_NAME.match(Path(f).stem)]


def labelled(root, files):
    """The `files` a run labels: with `train/` and `valid/` folders, those in them and the flagged ones (a `test/`
    beside them is left out, folder_split); else all."""
    if not split_by_folders(top_names(root, files)):
        return files
    return [f for f in files if Path(f).relative_to(root).parts[0] in LABELLED_FOLDERS]


def check_oxford_names(root, files):
    """One line unless every one of the dataset's own images (flagged ones aside) has an Oxford-style name."""
    own = [f for f in labelled(root, files) if not is_flagged(f, root)]
    wrong = misnamed(own)
    if wrong:
        raise UserError(f"--labels filename reads Oxford-style names like Abyssinian_12.jpg (upper case: a cat), but "
                        f"{len(wrong)} of {len(own)} are not (such as {Path(wrong[0]).relative_to(root)}): rename "
                        "them, or use one sub-folder per class")


def unknown_flagged(root, files, get_y):
    """The flagged images of `files` whose class none of the dataset's own images has (flagged in an app that
    serves another model, say): training on them would add a class the dataset never had."""
    files = labelled(root, files)
    own = {get_y(f) for f in files if not is_flagged(f, root)}
    return [f for f in files if is_flagged(f, root) and get_y(f) not in own]


def label_function(labels, task):
    """`task` ('is_cat' or 'breed') only applies to Oxford-style file names; folders name their own classes."""
    if labels == "folder":
        return parent_label
    return FlaggedOr({"is_cat": is_cat, "breed": breed}[task])


def pets_images():
    """Oxford-IIIT Pet through fastai's downloader (cached in ~/.fastai/data after the first run)."""
    try:
        return untar_data(URLs.PETS) / "images"
    except Exception as e:
        raise UserError(f"could not download Oxford-IIIT Pet ({type(e).__name__}: {e}); offline, train on a "
                        "local folder instead: --data DIR (e.g. --data ../shared/data/catsdogs)") from None


def folder_split(root, files, cache=None):
    """A splitter for folders already split into `train/` and `valid/` (as fastai's from_folder), else None.
    Flagged images (`--flagged`) train: the held-out set stays the one the metrics were measured on. Images of either
    (`train/` or flagged) that look like a held-out one (imagelab.lookalikes) do not train. `cache`: where look-alike
    fingerprints are kept (--cache)."""
    root = Path(root)
    if not split_by_folders(top_names(root, files)):
        return None
    others = sorted(top_names(root, files) - set(LABELLED_FOLDERS))
    if others:  # a test/ set, say: as fastai's GrandparentSplitter, neither trained on nor measured
        print(f"note: {', '.join(others)} left out: with train/ and valid/ folders, only train/ (and {FLAGGED}/) "
              "trains and only valid/ is measured")

    def split(items):
        tops = [Path(f).relative_to(root).parts[0] for f in items]
        held = [i for i, top in enumerate(tops) if top == VALID]
        held_prints = fingerprints([items[i] for i in held], cache=cache)
        train, valid = with_flagged(root, items, set(held), held_prints=held_prints, cache=cache)
        own = [i for i in train if tops[i] == TRAIN]
        seen = pairs(fingerprints([items[i] for i in own], cache=cache), held_prints)
        copies = {own[i] for i, _ in seen}
        if copies:  # the folders' split is the user's: the held-out side stays as it is, its copies do not train
            copy, like = (Path(items[i]).relative_to(root) for i in (own[seen[0][0]], held[seen[0][1]]))
            print(f"note: {len(copies)} files of {TRAIN}/ look like images of {VALID}/ (a copy, resized, recompressed "
                  f"or mirrored) and are left out of training, which would be measured on itself (such as {copy}, "
                  f"like {like})")
        return [i for i in train if tops[i] in (TRAIN, FLAGGED) and i not in copies], valid
    return split


def top_names(root, files):
    """The top-level names under `root` that `files` are in."""
    return {Path(f).relative_to(root).parts[0] for f in files}


def dataset_split(root, files, valid_pct, seed, cache=None):
    """How every model's images are split: (splitter, what metrics.json calls it). `train/` and `valid/` folders
    keep their split, else `random_split`."""
    by_folders = folder_split(root, files, cache)
    if by_folders:
        return by_folders, FOLDER_SPLIT
    return random_split(root, valid_pct, seed, cache), f"random {valid_pct:.0%}"


def classifier_dls(files, get_y, *, splitter, size, min_scale, bs, workers=None, get_x=None):
    """fastai DataLoaders: `RandomResizedCrop` per item (a centre crop for validation), fastai's batch augmentation.

    `splitter`: `dataset_split`'s; `get_x` maps a file to what is decoded
    (`Presized`); `workers`: loader processes (None: fastai's default). The loaders shuffle by the global
    seed (fastai's take none of their own).
    """
    block = DataBlock(blocks=(RGBImageBlock(), CategoryBlock), get_x=get_x, get_y=get_y, splitter=splitter,
                      item_tfms=RandomResizedCrop(size, min_scale=min_scale), batch_tfms=aug_transforms())
    dls = block.dataloaders(list(files), bs=bs, num_workers=workers)
    if len(dls.valid_ds) == 0:
        if len(dls.train_ds) <= len(dls.vocab):  # one photo per class: any held out would leave its class unlearnt
            classes = ", ".join(map(str, dls.vocab))
            raise UserError(f"{len(dls.train_ds)} images for {len(dls.vocab)} classes ({classes}), "
                            "one each: a class needs a photo to train on and one to hold out; add photos, "
                            "at least two of each class")
        raise UserError(f"no validation images among {len(files)} images: raise --valid-pct")
    # Before the class count: a class whose only photos are held out is missing from fastai's vocab, and "only one
    # class" would hide that it is there.
    held = Counter(str(get_y(f)) for f in dls.valid_ds.items)
    untrained = sorted(set(held) - set(map(str, dls.vocab)))  # fastai's vocab is the training images' labels
    if untrained:
        it, n = "it" if len(untrained) == 1 else "them", sum(held[c] for c in untrained)
        held_out = "the only one is held out" if n == 1 else f"all {n} are held out"
        # moving its folder out would leave one class: then the photos are the only way
        move = f", or move {'its folder' if it == 'it' else 'their folders'} out" if len(dls.vocab) >= 2 else ""
        raise UserError(f"no training images of {', '.join(untrained)}: {held_out}, so the model could not learn "
                        f"{it}; add photos of {it} (to train/ where folders hold the split){move}")
    if len(dls.vocab) < 2:
        raise UserError(f"only one class ({dls.vocab[0]}) among {len(files)} images: a classifier needs at least two")
    return dls


def random_split(root, valid_pct, seed, cache=None):
    """fastai's seeded `RandomSplitter` over the dataset's own images, look-alikes (one picture in two files or more,
    imagelab.lookalikes, fingerprints kept in `cache`) drawn together: a picture is held out whole or trains whole.
    Without look-alikes the split is fastai's. Flagged images (`--flagged`) train, so adding them leaves the held-out
    set as it was."""
    root = Path(root)

    def split(items):
        own = [i for i, f in enumerate(items) if not is_flagged(f, root)]
        prints = fingerprints([items[i] for i in own], cache=cache)
        near = pairs(prints)
        first = groups(prints, near)  # of each image, its group's first image
        heads = sorted(set(first))
        together = len(own) - len(heads)
        if together:
            print(f"note: {together} of {len(own)} files repeat a picture another file holds (a copy, resized or "
                  "recompressed): each picture is held out whole or trains whole")
        if together and len(heads) < 2:  # no --valid-pct helps: one picture cannot both train and be held out
            raise UserError(f"only 1 distinct picture among {len(own)} images (the others are copies of it, resized "
                            "or recompressed): a model needs at least 2, one to train on and one to hold out; add "
                            "images")
        if together and int(valid_pct * len(heads)) == 0:
            raise UserError(f"only {len(heads)} distinct pictures among {len(own)} images: --valid-pct {valid_pct} "
                            "holds none of them out")
        _, valid = RandomSplitter(valid_pct, seed=seed)(heads)
        held = {heads[v] for v in valid}
        kept = [k for k, f in enumerate(first) if f in held]  # in the order of `items`, as with_flagged takes them
        # A like B like C, in two groups (A, B) and (C): B must not train while C is held out
        chained = {own[a] for i, j in near for a, b in ((i, j), (j, i)) if first[a] not in held and first[b] in held}
        train, valid = with_flagged(root, items, {own[k] for k in kept}, held_prints=prints[kept], cache=cache)
        train = [i for i in train if i not in chained]
        if chained:
            print(f"note: {len(chained)} files look like a held-out file of another group of look-alikes (a chain: "
                  f"A like B like C) and are left out of training: {len(train)} train, {len(valid)} held out")
        return train, valid
    return split


def with_flagged(root, items, held_out, held_prints=None, cache=None):
    """(train, valid) indices: the held-out ones, and every other but the flagged images that look like a held-out
    one (an app's example, say): trained on, they would be measured on themselves. `held_prints`: the held-out
    images' fingerprints in index order, when the caller has them."""
    flagged = [i for i, f in enumerate(items) if is_flagged(f, root)]
    if flagged and held_out:
        valid = sorted(held_out)
        if held_prints is None:
            held_prints = fingerprints([items[i] for i in valid], cache=cache)
        seen = pairs(fingerprints([items[i] for i in flagged], cache=cache), held_prints)
        left_out = {flagged[i] for i, _ in seen}
        if left_out:
            n = len(left_out)
            print(f"note: {n} flagged {'file looks' if n == 1 else 'files look'} like held-out images and "
                  f"{'is' if n == 1 else 'are'} left out "
                  f"(such as {Path(items[flagged[seen[0][0]]]).relative_to(root)}, like "
                  f"{Path(items[valid[seen[0][1]]]).relative_to(root)})")
    else:
        left_out = set()
    return [i for i in range(len(items)) if i not in held_out and i not in left_out], sorted(held_out)


def contradicting_flags(root, items, get_y, cache=None):
    """(flagged, own) pairs of `items`: a flagged image that looks like one of the dataset's own images with another
    label (a visitor who says the dataset's label is wrong, or is wrong). `cache`: where fingerprints are kept."""
    root = Path(root)
    flagged = [f for f in items if is_flagged(f, root)]
    own = [f for f in items if not is_flagged(f, root)]
    if not flagged or not own:
        return []
    found = pairs(fingerprints(flagged, cache=cache), fingerprints(own, cache=cache))
    return [(flagged[i], own[j]) for i, j in found if get_y(flagged[i]) != get_y(own[j])]


def split_counts(dls, get_y):
    """Images per class in each split, for the report."""
    counts = {name: Counter(map(get_y, ds.items)) for name, ds in (("train", dls.train_ds), ("valid", dls.valid_ds))}
    return {name: {c: n[c] for c in dls.vocab} for name, n in counts.items()}
