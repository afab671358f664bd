"""Decoding image files, the same way for training and serving, and refusing the ones that cannot be used;
fastai's `Resize` crop, which training and serving cut alike.

No fastai or torch here: a served app decodes uploads without importing the training stack.
"""
import math
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import UserError
from .paths import not_regular

# Refuse images whose header claims more pixels than this before decoding them: a 40000x40000 PNG
# of a few KB would otherwise take gigabytes of memory.
MAX_PIXELS = 40_000_000

# What image files are decoded as: the formats of cameras, phones, browsers and the web. Pillow reads more, EPS
# among them, which it runs through Ghostscript, a program that executes the file's PostScript: an upload to a
# public app, or a scraped file, is anyone's.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "AVIF", "JPEG2000", "PPM", "ICO")


def open_image(src):
    """Pillow's `Image.open` (lazy: the header is read, the pixels when needed), for `FORMATS` only."""
    return Image.open(src, formats=FORMATS)


def open_rgb(src):
    """Any image (path, file or PIL) as upright 8-bit RGB: the one decoder used by training and serving."""
    im = src if isinstance(src, Image.Image) else open_image(src)
    # A model sees one picture: an animation is its first frame, as a still of it would be. Not `n_frames`, which
    # walks every page of a TIFF: a broken pointer to a page after the first would fail a file `check_image` passed.
    if im.tell():
        im.seek(0)
    im = ImageOps.exif_transpose(im)
    if im.mode in WIDE_GREYS:
        im = grey_to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.new("RGB", rgba.size, "white")
        im.paste(rgba, mask=rgba.getchannel("A"))
    return im.convert("RGB")


WIDE_GREYS = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Pixels of a wide grey image converted at a time: its float copy of a few MB, not one the size of the whole picture.
STRIP = 1 << 18


def grey_to_8bit(im):
    """A 16-bit or 32-bit greyscale image as 8-bit ("L"), converted a strip of rows at a time.

    convert("RGB") would clip everything above 255 to white, and a float image's usual 0 to 1 to black. A 32-bit image
    does not say its range: a float one whose values all fit in 0 to 1 is read so, one whose values all fit in 8 bits
    as 8-bit, any other as 16-bit.
    """
    rows = max(1, STRIP // max(im.width, 1))

    def strips():
        for y in range(0, im.height, rows):
            a = np.asarray(im.crop((0, y, im.width, min(y + rows, im.height))), dtype=np.float64)
            yield y, np.nan_to_num(a, copy=False)

    if im.mode.startswith("I;16"):
        scale = 1 / 257
    else:
        top = max((a.max(initial=0) for _, a in strips()), default=0)
        scale = 255 if im.mode == "F" and top <= 1 else 1 / 257 if top > 255 else 1
    out = Image.new("L", im.size)
    for y, a in strips():
        a *= scale
        np.rint(a, out=a)
        out.paste(Image.fromarray(np.clip(a, 0, 255, out=a).astype(np.uint8)), (0, y))
    return out


def resize_box(w, h, size, pcts=(0.5, 0.5)):
    """fastai's `Resize(size)` crop (left, top, width, height) of a w x h image: the largest box of `size`'s
    (width, height) shape, placed at `pcts` of the room left (random in training, the centre otherwise),
    in fastai's arithmetic to the pixel."""
    m = w / size[0] if w / size[0] < h / size[1] else h / size[1]
    cw, ch = int(m * size[0]), int(m * size[1])
    return int(pcts[0] * (w - cw)), int(pcts[1] * (h - ch)), cw, ch


def val_margin(size, val_xtra):
    """What fastai's `RandomResizedCrop` adds to `size` (width, height) before its validation centre crop."""
    return math.ceil(max(size) * val_xtra / 8) * 8


def check_image(path):
    """None if `path` decodes fully as an image, else the reason it does not."""
    odd = not_regular(path)
    if odd:  # a named pipe: opened, it would wait for a writer forever
        return odd
    try:
        with open_image(path) as im:
            im.draft("RGB", (64, 64))  # JPEG decodes at 1/8 scale: a full read of every byte, much faster
            im.load()
        return None
    except Image.DecompressionBombError:
        return f"image too large (more than {Image.MAX_IMAGE_PIXELS:,} pixels)"  # Pillow's guard against bombs
    except Exception as e:  # PIL raises many types for bad files; each one is a reason to skip
        return unreadable_reason(path, e)


def read_image(src, max_pixels=MAX_PIXELS):
    """An uploaded file as RGB, or a `UserError` that says in one line why it is not usable.

    `max_pixels` bounds what one request may decode on a server; None: what training reads (Pillow's own limit).
    """
    try:
        im = src if isinstance(src, Image.Image) else open_image(src)
        if max_pixels and im.width * im.height > max_pixels:
            raise UserError(f"image too large: {im.width}x{im.height} pixels (limit {max_pixels:,})")
        return open_rgb(im)
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise UserError(f"image too large (more than {max_pixels or Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except Exception as e:  # PIL signals unreadable files with many exception types
        raise UserError(f"not a readable image: {unreadable_reason(src, e)}") from None


def unreadable_reason(src, error):
    """What is wrong with a file PIL could not decode, in words a user can act on."""
    if isinstance(src, (str, os.PathLike)) and not os.path.exists(src):
        return "a link that leads nowhere" if os.path.islink(src) else "no such file"
    if isinstance(src, (str, os.PathLike)) and os.path.isfile(src) and os.path.getsize(src) == 0:
        return "empty file"
    if isinstance(error, UnidentifiedImageError):
        return f"not an image (or not one of the formats read: {', '.join(FORMATS)})"
    message = str(error)
    if "truncated" in message or "broken data stream" in message or isinstance(error, EOFError):
        return "truncated image (the file ends before the picture does)"
    return f"corrupt image data ({message.splitlines()[0][:120] if message else type(error).__name__})"
