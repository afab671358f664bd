"""Look-alikes (imagelab.lookalikes): what a folder holds twice, how far apart other photos are, and whether copies
of a photo (smaller, recompressed, converted, brightened, mirrored) are still found.

    python benchmarks/lookalikes.py --data ../shared/data/catsdogs ../shared/data/bears

Prints, per folder, the time to fingerprint it (with no cache, into an empty one, and read back from it, as later
runs do) and to compare every pair, the look-alike pairs found and the closest pairs that are not (bits of 255,
largest colour difference of 255); then, over the first `--copies` photos, the largest distance between a photo and
each kind of copy, and how many copies were missed; then the pairs found among photos of one layout (small on
white), none a copy; then the time to compare every pair of bigger folders (`--scale`).
"""
import io
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from imagelab import ArgumentParser, run_cli
from imagelab.images import open_rgb
from imagelab.lookalikes import (MAX_BITS, MAX_COLOUR, WORDS, Fingerprints, bit_distances, collect, fingerprint,
                                 fingerprints, pairs)
from imagelab.paths import dataset_files

COPIES = {  # what the same photo looks like on another site
    "half size, JPEG q70": lambda im: encoded(im.resize((max(1, im.width // 2), max(1, im.height // 2))), "JPEG", 70),
    "JPEG q40": lambda im: encoded(im, "JPEG", 40),
    "PNG": lambda im: encoded(im, "PNG"),
    "WEBP q75": lambda im: encoded(im, "WEBP", 75),
    "10% brighter, JPEG q90": lambda im: encoded(ImageEnhance.Brightness(im).enhance(1.1), "JPEG", 90),
    "mirrored, JPEG q90": lambda im: encoded(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG", 90),
    "2.5% cropped off each side, JPEG q90": lambda im: encoded(im.crop(
        (im.width // 40, im.height // 40, im.width - im.width // 40, im.height - im.height // 40)), "JPEG", 90),
}


def encoded(im, fmt, quality=None):
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": quality} if quality else {}))
    buf.seek(0)
    return buf


def distances(a, b):
    return int(bit_distances(a[0], b[0])), round(float(np.abs(a[1] - b[1]).max()), 1)


def timed(make):
    start = time.perf_counter()
    return make(), round(time.perf_counter() - start, 3)


def survey(folder, closest=6):
    files = dataset_files(Path(folder))
    with ThreadPoolExecutor(8) as pool:  # as imagelab.lookalikes.fingerprints makes them, with no cache
        plain, uncached = timed(lambda: collect(list(pool.map(fingerprint, files))))
    with tempfile.TemporaryDirectory() as cache:
        _, empty = timed(lambda: fingerprints(files, cache=cache))  # a folder's first run: made and kept
        prints, cached = timed(lambda: fingerprints(files, cache=cache))  # every later run: read back
    identical = all(np.array_equal(getattr(plain, n), getattr(prints, n)) for n in ("bits", "colours", "known"))
    start = time.perf_counter()
    found = pairs(prints)
    compare = time.perf_counter() - start
    bits = bit_distances(prints.bits[:, None], prints.bits[None]).astype(float)
    bits[np.tril_indices(len(files))] = np.inf  # each pair once
    for a, b in found:
        bits[a, b] = np.inf  # listed as look-alikes
    others = zip(*np.unravel_index(np.argsort(bits, axis=None)[:closest], bits.shape))
    return {"folder": str(folder), "images": len(files),
            "fingerprint_seconds": {"uncached": uncached, "empty_cache": empty, "cached": cached},
            "cached_speedup": round(uncached / cached, 1), "cached_identical": identical,
            "compare_seconds": round(compare, 2),
            "lookalikes": [[str(files[a].relative_to(folder)), str(files[b].relative_to(folder))] for a, b in found],
            "closest_others": [distances((prints.bits[a], prints.colours[a]), (prints.bits[b], prints.colours[b]))
                               for a, b in others]}


def one_layout(folder, n=200):
    """`n` photos of `folder`, each small in the middle of a white square (a shop's pictures): none is a copy of
    another, yet their broad shapes are alike. Returns the look-alike pairs found and the closest distance."""
    shots = []
    for photo in dataset_files(Path(folder))[:n]:
        im = open_rgb(photo)
        im.thumbnail((90, 90))
        canvas = Image.new("RGB", (256, 256), "white")
        canvas.paste(im, ((256 - im.width) // 2, (256 - im.height) // 2))
        shots.append(encoded(canvas, "JPEG", 90))
    prints = fingerprints(shots)
    bits = bit_distances(prints.bits[:, None], prints.bits[None])
    closest = int(bits[np.triu_indices(len(shots), 1)].min())
    return {"photos": len(shots), "lookalikes": len(pairs(prints)), "closest_bits": closest}


def copies(folders, n):
    photos = [f for folder in folders for f in dataset_files(Path(folder))[:n]]
    worst = {}
    for f in photos:
        original, im = fingerprint(f), open_rgb(f)
        for name, make in COPIES.items():
            bits, colour = distances(original, fingerprint(make(im)))
            b, c, missed = worst.get(name, (0, 0.0, 0))
            worst[name] = (max(b, bits), max(c, colour), missed + (bits > MAX_BITS or colour > MAX_COLOUR))
    return {name: {"max_bits": b, "max_colour": c, "missed": m, "of": len(photos)} for name, (b, c, m) in worst.items()}


def scale(n):
    """Seconds to compare every pair of `n` random fingerprints: a folder of that many images."""
    rng = np.random.default_rng(0)
    prints = Fingerprints(rng.integers(0, 2 ** 63, (n, 2, WORDS), dtype=np.uint64), rng.uniform(0, 255, (n, 3)),
                          np.ones(n, bool))
    start = time.perf_counter()
    pairs(prints)
    return round(time.perf_counter() - start, 2)


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", metavar="DIR", nargs="+", required=True, help="image folders")
    p.add_argument("--copies", type=int, default=60, help="photos of each folder copied in every way")
    p.add_argument("--scale", type=int, nargs="*", default=[10_000, 50_000],
                   help="also time comparing every pair of this many (random) fingerprints")
    args = p.parse_args(argv)
    for folder in args.data:
        print(json.dumps(survey(folder)))
    thresholds = {"bits": MAX_BITS, "colour": MAX_COLOUR}
    print(json.dumps({"thresholds": thresholds, "copies": copies(args.data, args.copies)}))
    print(json.dumps({"one_layout": one_layout(args.data[0])}))
    print(json.dumps({"compare_seconds": {n: scale(n) for n in args.scale}}))


if __name__ == "__main__":
    run_cli(main)
