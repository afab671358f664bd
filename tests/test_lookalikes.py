"""Look-alike fingerprints kept across runs: read back while a file is unchanged, made again when it changes, and
never a damaged cache, whatever happens to a run while it writes one."""
import io
import os
import signal
import subprocess
import time
import zipfile

import numpy as np
from PIL import Image

from conftest import PY, ROOT, read_until, shapes
from imagelab.lookalikes import collect, fingerprint, fingerprints, store_path


def same(a, b):
    """Two `Fingerprints` alike to the bit (colours too)."""
    return all(np.array_equal(getattr(a, n), getattr(b, n)) and getattr(a, n).dtype == getattr(b, n).dtype
               for n in ("bits", "colours", "known"))


def uncached(files):
    return collect([fingerprint(f) for f in files])


def photos(folder, n=4):
    """`n` pictures in each of two class folders, a flat one (its fingerprint is nothing) and a file that is no
    picture at all."""
    files = [shapes(folder / c / f"{i}.jpg", seed=10 * k + i) for k, c in enumerate(("cats", "dogs")) for i in range(n)]
    Image.new("RGB", (40, 30), "grey").save(folder / "cats" / "flat.png")
    (folder / "dogs" / "notes.jpg").write_text("not a picture")
    return files + [folder / "cats" / "flat.png", folder / "dogs" / "notes.jpg"]


def test_fingerprints_are_kept_across_runs_until_their_file_changes(tmp_path, decodes):
    files, cache = photos(tmp_path / "data"), tmp_path / "cache"
    expected = uncached(files)
    decodes.clear()
    assert same(fingerprints(files, cache=cache), expected)
    assert sorted(decodes) == sorted(files)  # the first run decodes every file, pictures or not
    decodes.clear()
    assert same(fingerprints(files, cache=cache), expected) and decodes == []  # the next one none

    changed, touched, gone = files[0], files[5], files[2]
    expected_first = fingerprint(changed)
    shapes(changed, seed=99)  # another picture
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # the same bytes
    gone.unlink()
    files.remove(gone)
    expected = uncached(files)
    decodes.clear()
    found = fingerprints(files, cache=cache)
    assert sorted(decodes) == sorted([changed, touched])
    assert same(found, expected) and not same(found[:1], collect([expected_first]))

    shapes(gone, seed=98)  # a new file where one was
    files.append(gone)
    expected = uncached(files)
    decodes.clear()
    assert same(fingerprints(files, cache=cache), expected) and decodes == [gone]
    for folder in ("cats", "dogs"):  # each store holds the files of its folder as they are now, not their history
        with np.load(store_path(cache, tmp_path / "data" / folder)) as store:
            assert len(store["keys"]) == len(list((tmp_path / "data" / folder).iterdir()))
    assert len(list((cache / "fingerprints").iterdir())) == 2

    held = io.BytesIO(changed.read_bytes())  # an upload, say: fingerprinted, not kept
    assert same(fingerprints([held], cache=cache), collect([fingerprint(changed)]))
    assert len(list((cache / "fingerprints").iterdir())) == 2


def test_a_damaged_or_unwritable_cache_is_made_again(tmp_path, decodes):
    files, cache = photos(tmp_path / "data"), tmp_path / "cache"
    expected = fingerprints(files, cache=cache)
    cats, dogs = (store_path(cache, tmp_path / "data" / c) for c in ("cats", "dogs"))
    cats.write_bytes(cats.read_bytes()[:len(cats.read_bytes()) // 2])  # cut short
    with zipfile.ZipFile(dogs) as z:  # arrays are stored as they are, one after another
        last_of_bits = z.getinfo("colours.npy").header_offset - 1
    damaged = bytearray(dogs.read_bytes())
    damaged[last_of_bits] ^= 0xFF  # a fingerprint's bits changed: the zip's checksum tells
    dogs.write_bytes(damaged)
    decodes.clear()
    assert same(fingerprints(files, cache=cache), expected) and sorted(decodes) == sorted(files)
    decodes.clear()
    assert same(fingerprints(files, cache=cache), expected) and decodes == []  # rewritten whole

    (tmp_path / "a-file").write_text("")  # a cache that cannot be written: right fingerprints, made every time
    for _ in range(2):
        decodes.clear()
        assert same(fingerprints(files, cache=tmp_path / "a-file"), expected) and len(decodes) == len(files)


WRITER = """
import hashlib, os, sys
from pathlib import Path
from imagelab.lookalikes import fingerprints
files, cache, forever = sorted(Path(sys.argv[1]).iterdir()), sys.argv[2], sys.argv[3] == 'forever'
n = 1
while True:
    found = fingerprints(files, cache=cache)
    print(hashlib.sha256(found.bits.tobytes() + found.colours.tobytes()).hexdigest(), flush=True)
    if not forever:
        break
    n += 1
    os.utime(files[0], ns=(n, n))  # a changed file: the store is written again
"""


def test_runs_at_once_or_killed_while_writing_leave_a_whole_cache(tmp_path, decodes):
    folder, cache = tmp_path / "data", tmp_path / "cache"
    files = [shapes(folder / f"{i}.png", seed=i) for i in range(60)]
    expected = uncached(files)
    both = [subprocess.Popen([PY, "-c", WRITER, folder, cache, "once"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0] and outs[0] == outs[1]
    decodes.clear()
    assert same(fingerprints(files, cache=cache), expected) and decodes == []

    writer = subprocess.Popen([PY, "-c", WRITER, folder, cache, "forever"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    read_until(writer.stdout, "(?:[0-9a-f]{64}\n){20}", timeout=120)  # some stores written, then killed at once
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    store = store_path(cache, folder)
    half = store.with_name(f".{store.name}.{writer.pid}.1.tmp")  # what a run killed in the middle of a write leaves
    half.write_bytes(store.read_bytes()[:100])
    expected = uncached(files)
    decodes.clear()
    assert same(fingerprints(files, cache=cache), expected)
    assert decodes in ([], [files[0]])  # at most the file it last changed
    os.utime(files[1])
    assert same(fingerprints(files, cache=cache), expected)
    assert not half.exists() and [p.name for p in store.parent.iterdir()] == [store.name]
