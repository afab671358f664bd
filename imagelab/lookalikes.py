"""Look-alikes: one picture in two files (resized, recompressed, converted, mirrored), found by a perceptual hash.

An image search returns the same photo from many sites, and photo folders hold copies. A picture on both sides
of the train/valid split is measured on what was trained on; the downloader keeps one of them, and the split
keeps look-alikes on one side. No fastai or torch here: the downloader uses it.

The hash says which of a 64 x 64 grey thumbnail's lowest 16 x 16 cosine frequencies (its mean left out: 255
bits) are above their median, and keeps the thumbnail's mean colour: copies of one photo differ in a few bits
and a few levels, other photos in many more, even photos of one layout, such as small objects on white
(benchmarks/README.md, "Look-alikes"). Each image also has the bits of its mirror image: training flips pictures,
so a photo and its mirror image on both sides of the split are one picture trained on and measured.

A file's fingerprint is kept in the cache (beside the presized copies) until the file changes: a later run on the
same folder decodes only its new and changed files.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .images import open_image, open_rgb
from .paths import cache_folder, digest, file_key
from .writes import remove_abandoned_staging, staging_path

SIDE, FREQUENCIES = 64, 16
WORDS = 4  # the 255 bits, in four 64-bit words: compared a word at a time
MAX_BITS, MAX_COLOUR = 26, 32  # of 255 bits; of 255 levels, in any channel (a retouched copy shifts colours)
_n = np.arange(SIDE)
_DCT = np.cos(np.pi * (2 * _n[None, :] + 1) * _n[:, None] / (2 * SIDE))  # DCT-II, unscaled: medians ignore scale
VERSION = 2  # part of every cache key: bump it when the way fingerprints are made changes
THREADS = 8  # images decoded and fingerprinted at once


class Fingerprints:
    """The bits (N x 2 x 4 words: the image's, its mirror image's) and mean colours (N x 3) of N images, and which
    have them (`known`)."""

    def __init__(self, bits, colours, known):
        self.bits, self.colours, self.known = bits, colours, known

    def __len__(self):
        return len(self.bits)

    def __getitem__(self, rows):
        return Fingerprints(self.bits[rows], self.colours[rows], self.known[rows])

    def __add__(self, other):
        return Fingerprints(np.concatenate([self.bits, other.bits]), np.concatenate([self.colours, other.colours]),
                            np.concatenate([self.known, other.known]))


def fingerprint(src):
    """(bits of the picture and of its mirror image, mean colour) of the picture in `src` (a file, or an image
    decoded already); None for one that does not decode or is one flat colour (whose bits would be rounding noise:
    two such files are the same only byte for byte)."""
    try:
        if isinstance(src, Image.Image):
            small = open_rgb(src).resize((SIDE, SIDE), Image.Resampling.BOX)
        else:
            with open_image(src) as im:
                im.draft("RGB", (SIDE * 4, SIDE * 4))  # JPEG: decode at a fraction of the size, still over the side
                small = open_rgb(im).resize((SIDE, SIDE), Image.Resampling.BOX)
    except Exception:  # not a picture: nothing looks like it
        return None
    rgb = np.asarray(small, dtype=np.float64)
    grey = rgb @ [0.299, 0.587, 0.114]
    if grey.std() < 1:
        return None
    return np.stack([hash_bits(grey), hash_bits(grey[:, ::-1])]), rgb.mean((0, 1))


def hash_bits(grey):
    """Which of the lowest cosine frequencies of `grey` (SIDE x SIDE) are above their median, in WORDS words."""
    freq = (_DCT @ grey @ _DCT.T)[:FREQUENCIES, :FREQUENCIES].ravel()[1:]
    bits = np.zeros(8 * WORDS, np.uint8)
    packed = np.packbits(freq > np.median(freq))
    bits[:len(packed)] = packed
    return bits.view(np.uint64)


def bit_distances(a, b):
    """Bits that differ between the fingerprint bits `a` and `b` (... x 2 x WORDS, broadcast): between the pictures,
    or between `a`'s mirror image and `b`, whichever is fewer. (Mirroring flips the signs of the odd horizontal
    frequencies, whose median is near 0: `b`'s mirror image against `a` differs in about as many bits.)"""
    def differ(x):  # a word at a time, in uint8: at most 255 bits differ
        return sum(np.bitwise_count(a[..., x, w] ^ b[..., 0, w]) for w in range(WORDS))
    return np.minimum(differ(0), differ(1))


def fingerprints(paths, cache=None):
    """The fingerprints of `paths`, files or open files (one that does not decode looks like nothing). Those of files
    are kept in `cache` (imagelab.paths.cache_folder) and read back while the file is unchanged."""
    paths = list(paths)
    keys = [cache_key(p) for p in paths]
    stores = {folder: store_path(cache, folder) for folder in {Path(p).parent for p, k in zip(paths, keys) if k}}
    kept = {k: f for store in stores.values() for k, f in load(store).items()}
    todo = [i for i, k in enumerate(keys) if k not in kept]  # never an open file's: its key is None
    with ThreadPoolExecutor(THREADS) as pool:  # PIL releases the GIL while decoding
        made = dict(zip(todo, tqdm(pool.map(fingerprint, [paths[i] for i in todo]), total=len(todo),
                                   desc="looking for look-alikes", unit="img", leave=False, disable=not todo)))
    found = [made[i] if i in made else kept[k] for i, k in enumerate(keys)]
    for folder in {Path(paths[i]).parent for i in todo if keys[i]}:
        save(stores[folder], {k: f for p, k, f in zip(paths, keys, found) if k and Path(p).parent == folder})
    return collect(found)


def cache_key(src):
    """The name of `src`'s fingerprint in the cache (imagelab.paths.file_key), or None for an open file or a file
    that is gone (whose fingerprint is nothing)."""
    if not isinstance(src, (str, os.PathLike)):
        return None
    try:
        return file_key(src, VERSION)
    except OSError:
        return None


def store_path(cache, folder):
    """Where the fingerprints of the files of `folder` are kept. One file a folder, rewritten whole with what a run
    asked of it whenever it made any: the cache holds a folder's files as they are, not every version they had (one
    file a photo would keep those, and cost a run thousands of reads), and is read in one go."""
    return cache_folder(cache) / "fingerprints" / f"{digest(VERSION, Path(folder).resolve())}.npz"


def load(store):
    """{cache key: fingerprint} of a folder's store; nothing from one that is missing or unreadable (cut short,
    damaged): its fingerprints are made again and it is rewritten."""
    try:
        with np.load(store) as kept:
            keys, bits, colours, known = kept["keys"].tolist(), kept["bits"], kept["colours"], kept["known"]
    except Exception:
        return {}
    return {k: (b, c) if ok else None for k, b, c, ok in zip(keys, bits, colours, known)}


def save(store, found):
    """Write a folder's store ({cache key: fingerprint}) whole or not at all: a run killed while writing, or two at
    once, leave the last complete one."""
    prints = collect(list(found.values()))
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_staging(store)  # left by a run killed while writing
        tmp = staging_path(store)
        with open(tmp, "wb") as f:  # a file, not a name: np.savez would add .npz to the name
            np.savez(f, keys=np.array(list(found), str), bits=prints.bits, colours=prints.colours, known=prints.known)
        os.replace(tmp, store)
    except OSError:  # a full or read-only cache: the fingerprints are right, the next run makes them again
        pass


def collect(found):
    """`Fingerprints` of what `fingerprint` found for each image (None: nothing)."""
    nothing = (np.zeros((2, WORDS), np.uint64), np.zeros(3))
    return Fingerprints(np.array([(f or nothing)[0] for f in found], np.uint64).reshape(len(found), 2, WORDS),
                        np.array([(f or nothing)[1] for f in found], np.float64).reshape(len(found), 3),
                        np.array([f is not None for f in found], bool))


def pairs(a, b=None):
    """(i, j) for each image i of `a` that looks like image j of `b` (None: of `a`, j > i)."""
    b_is_a, b = b is None, a if b is None else b
    mine, theirs = np.flatnonzero(a.known), np.flatnonzero(b.known)  # what looks like nothing is like nothing
    rows = max(1, 2 ** 22 // max(1, len(theirs)))  # a few million comparisons at a time, in tens of MB
    found = []
    for start in range(0, len(mine), rows):
        i = mine[start:start + rows]
        bits = bit_distances(a.bits[i, None], b.bits[None, theirs])
        near_i, near_j = np.nonzero(bits <= MAX_BITS)
        i, j = i[near_i], theirs[near_j]
        keep = np.abs(a.colours[i] - b.colours[j]).max(-1) <= MAX_COLOUR
        if b_is_a:
            keep &= j > i
        found += zip(i[keep].tolist(), j[keep].tolist())
    return found


def groups(prints, near=None):
    """For each image, the first image of its group of look-alikes (itself when it looks like no earlier one).
    `near`: `pairs(prints)`, when the caller has them.

    Every image of a group looks like its first: A like B and B like C make no group of A and C, which may look
    nothing alike (chained, photos of one layout would merge into a few big groups)."""
    first = list(range(len(prints)))
    for i, j in sorted(pairs(prints) if near is None else near):  # i < j: each meets its earlier look-alikes in order
        if first[j] == j and first[i] == i:
            first[j] = i
    return first
