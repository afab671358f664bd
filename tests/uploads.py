"""Files strangers upload: odd but valid images, and things that are not usable images at all."""
import io
import struct
import zlib

import numpy as np
from PIL import Image


def _gradient(w, h):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return np.broadcast_to(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2), (h, w, 3)).astype(np.uint8)


def valid_uploads(d):
    """name -> path of images that must all be classified."""
    d.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_gradient(64, 48))
    out = {}

    def save(name, im, **kw):
        out[name] = d / name
        im.save(out[name], **kw)

    save("cmyk.jpg", rgb.convert("CMYK"))
    save("grey16.png", Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)))
    save("float32.tiff", Image.fromarray(_gradient(64, 48)[:, :, 0].astype(np.float32) / 255))  # values 0 to 1
    save("palette.png", rgb.convert("P", palette=Image.ADAPTIVE))
    save("la.png", rgb.convert("LA"))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(_gradient(64, 48)[:, :, 0]))
    save("rgba.png", rgba)
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    out["animated.gif"] = d / "animated.gif"
    frames[0].save(out["animated.gif"], save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90° to display"
    save("exif_rotated.jpg", rgb, exif=exif)
    save("one_pixel.png", Image.new("RGB", (1, 1), "orange"))
    save("sliver_4000x3.png", Image.new("RGB", (4000, 3), "purple"))
    save("big_6000x4000.jpg", rgb.resize((6000, 4000)), quality=80)
    save("photo.webp", rgb)
    save("photo.bmp", rgb)
    save("photo.tiff", rgb)
    save("jpeg_named.png", rgb, format="JPEG")
    out["broken_next_page.tiff"] = tiff_with_broken_next_page(d / "broken_next_page.tiff", rgb)
    return out


def tiff_with_broken_next_page(path, im):
    """`im` as a TIFF whose first page is whole but whose pointer to a next page points past the end of the file."""
    im.save(path)
    data = bytearray(path.read_bytes())
    order = "<" if data[:2] == b"II" else ">"
    first = struct.unpack(order + "I", data[4:8])[0]
    entries = struct.unpack(order + "H", data[first:first + 2])[0]
    pointer = first + 2 + 12 * entries  # after the first page's entries: where its next page is
    data[pointer:pointer + 4] = struct.pack(order + "I", len(data) + 1000)
    path.write_bytes(data)
    return path


def png_header_only(width, height):
    """A tiny valid-looking PNG whose header claims width x height (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def invalid_uploads(d):
    """name -> (path, expected message fragment) of uploads that must get a clear error."""
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(_gradient(256, 256)).save(buf, "JPEG")
    files = {
        "empty.jpg": (b"", "not a readable image"),
        "notes.png": (b"just some text, not a picture\n", "not a readable image"),
        "page.html": (b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", "not a readable image"),
        "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
                        "not a readable image"),
        "random.jpg": (np.random.default_rng(0).bytes(5000), "not a readable image"),
        # Pillow would hand it to Ghostscript, which runs the file's PostScript
        "vector.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n",
                       "not a readable image: not an image"),
        "truncated.jpg": (buf.getvalue()[: len(buf.getvalue()) // 3], "not a readable image"),
        "bomb.png": (png_header_only(40000, 40000), "too large"),
    }
    out = {}
    for name, (data, msg) in files.items():
        (d / name).write_bytes(data)
        out[name] = (d / name, msg)
    return out
