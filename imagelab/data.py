"""Where images come from and how they are labelled: datasets, file checks, label functions, loaders."""
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastai.vision.all import (CategoryBlock, DataBlock, ImageBlock, PILImage, RandomResizedCrop,
                               RandomSplitter, URLs, aug_transforms, untar_data)
from PIL import Image
from tqdm.auto import tqdm

from . import UserError
from .folders import ignored
from .images import check_image, open_rgb

# Oxford-IIIT Pet names files `<breed>_<n>.jpg`; cat breeds are capitalised, dog breeds are not.
OXFORD_NAME = re.compile(r"^(.+)_\d+$")


class RGBImage(PILImage):
    """fastai's `PILImage`, decoded by `open_rgb` so that alpha, palettes, EXIF rotation and frames are handled."""

    @classmethod
    def create(cls, fn, **kwargs):
        if isinstance(fn, (str, Path, Image.Image)):
            return cls(open_rgb(fn))
        return super().create(fn, **kwargs)


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


def find_images(root, workers=8):
    """Every decodable image under `root` and the files skipped with why (recursive; hidden files and the
    tools' BOOKKEEPING, such as quarantined or removed images, are left out).

    Scraped folders name files `x.jpg?width=3200&fit=crop` and hold stray non-images, so files are
    judged by decoding them, not by their extension.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"no such folder: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not ignored(p.relative_to(root).parts))
    if not files:
        raise UserError(f"no files in {root}")
    with ThreadPoolExecutor(workers) as pool:
        reasons = list(tqdm(pool.map(check_image, files), total=len(files), desc="checking images",
                            unit="img", leave=False))
    good = [f for f, r in zip(files, reasons) if r is None]
    bad = [(f, r) for f, r in zip(files, reasons) if r is not None]
    if not good:
        raise UserError(f"no readable images in {root} ({len(bad)} files skipped)")
    return good, bad


def detect_labels(root, files):
    """'folder' when the images sit in one sub-folder per class, 'filename' for Oxford-style names."""
    root = Path(root)
    parents = {f.parent for f in files}
    if root not in parents and len(parents) >= 2:
        return "folder"
    if all(OXFORD_NAME.match(f.stem) for f in files):
        return "filename"
    raise UserError(f"cannot tell the labels of {root}: use one sub-folder per class, "
                    "or Oxford-style file names like Abyssinian_12.jpg")


def label_function(labels, task=None):
    """`task` ('is_cat' or 'breed') only applies to Oxford-style file names; folders name their own classes."""
    if labels == "folder":
        return parent_label
    return {"is_cat": is_cat, "breed": breed}[task or "breed"]


def pets_images():
    """Oxford-IIIT Pet through fastai's downloader (cached in ~/.fastai/data after the first run)."""
    try:
        return untar_data(URLs.PETS) / "images"
    except Exception as e:
        raise UserError(f"could not download Oxford-IIIT Pet ({type(e).__name__}: {e}); offline, train on a "
                        "local folder instead: --data DIR (e.g. --data ../shared/data/catsdogs)") from None


def classifier_dls(files, get_y, size=224, min_scale=0.35, bs=64, valid_pct=0.2, seed=42, workers=None):
    """fastai DataLoaders: `RandomResizedCrop` per item (a centre crop for validation), fastai's batch augmentation."""
    block = DataBlock(blocks=(ImageBlock(cls=RGBImage), CategoryBlock), get_y=get_y,
                      splitter=RandomSplitter(valid_pct, seed=seed),
                      item_tfms=RandomResizedCrop(size, min_scale=min_scale), batch_tfms=aug_transforms())
    kwargs = {} if workers is None else {"num_workers": workers}
    dls = block.dataloaders(list(files), bs=bs, seed=seed, **kwargs)
    if len(dls.valid_ds) == 0:
        raise UserError(f"no validation images: {len(files)} images with --valid-pct {valid_pct}")
    return dls


def split_counts(dls, get_y):
    """Images per class in each split, for the report."""
    return {name: {c: sum(get_y(f) == c for f in ds.items) for c in dls.vocab}
            for name, ds in (("train", dls.train_ds), ("valid", dls.valid_ds))}
