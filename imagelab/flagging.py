"""Flag to retrain: a visitor marks a classifier app's answer wrong and names the right class; the upload is
kept in `<dataset>/flagged/<class>/`, which the cleaner shows and the trainer adds with `--flagged`.

An upload is never stored as it came: it is decoded by the one decoder (`images.read_image`, which refuses
what is not a usable image), shrunk to at most `MAX_SIDE` pixels and written as a new JPEG under a name made
from its content, so nothing a stranger sends (a script, a polyglot file, a path in its name) reaches the
disk. Flags are rate-limited across all visitors and the folder holds at most `MAX_FILES` images.
No fastai or torch here: a served app flags without the training stack.
"""
import hashlib
import io
import os
import re
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from . import UserError
from .images import read_image
from .lookalikes import collect, fingerprint, pairs
from .paths import BOOKKEEPING, FLAGGED, SPLIT_FOLDERS, check_class, check_class_name, hidden
from .writes import WRITE_ERRORS, staging_path, write_failure

# Training reads images at a few hundred pixels; a bigger copy would only cost the owner's disk.
MAX_SIDE = 1024
MAX_FILES = 2000
# A person flags a few answers a minute; more than this is a script filling the disk.
PER_MINUTE = 30
FLAGGED_NAME = re.compile(r"[0-9a-f]{16}\.jpg")  # what `Flagger.flag` names a file: its content's hash


def folder_names(root):
    """The names of the folders under `root`, at any depth (a class is named by its images' folder, wherever it is),
    hidden ones and the dataset tools' own left out."""
    found = set()
    for top, dirs, _ in os.walk(root):
        dirs[:] = [d for d in dirs if not hidden(d) and not (top == str(root) and d in BOOKKEEPING)]
        found.update(dirs)
    return sorted(found)


class Flagger:
    """Saves flagged uploads of a classifier with classes `classes` into `<root>/flagged/<class>/`.

    `held_out`: image files whose pictures are never kept (the app's examples, held-out images), by the rule training
    applies to every flagged image (imagelab.data.with_flagged), said to the visitor at once.
    """

    def __init__(self, root, classes, per_minute=PER_MINUTE, max_files=MAX_FILES, held_out=()):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise UserError(f"no such folder to keep flagged images in: {root}")
        self.classes = [check_class_name(str(c)) for c in classes]
        folders = [f for f in folder_names(self.root) if f not in SPLIT_FOLDERS]
        if folders and not set(folders) & set(self.classes):  # Oxford-style datasets may have no folders
            raise UserError(f"{root} holds the folders {', '.join(folders[:5])}{', ...' * (len(folders) > 5)} and "
                            f"none of this model's classes ({', '.join(self.classes)}): flag into the dataset the "
                            "model was trained on")
        self.folder = self.root / FLAGGED
        self.check_writable()
        self.per_minute, self.max_files = per_minute, max_files
        self.recent, self.lock = deque(), threading.Lock()
        self.held_out = collect([fingerprint(f) for f in held_out])

    def flag(self, image, label):
        """Keep `image` (an uploaded file's path) as an example of class `label`; returns its path relative to
        the dataset folder. A UserError says why a flag is refused: not a class, too many flags, not an image."""
        check_class(label, self.classes)
        self.take_turn()
        im = read_image(image)
        if pairs(collect([fingerprint(im)]), self.held_out):
            raise UserError("this is one of the app's examples, a held-out image the model is measured on: "
                            "training on it would make that measure wrong")
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        name = f"{hashlib.sha256(data).hexdigest()[:16]}.jpg"  # the same image flagged twice is kept once
        path = self.folder / check_class_name(label) / name
        # The latest flag of a picture wins: kept under two labels, it would train both ways. Written before the
        # other copies go, so the picture is never lost; under the lock, so two visitors flagging it at once leave
        # one copy, not none.
        with self.lock, self.writing("could not keep the image"):
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                staged = staging_path(path)
                try:
                    staged.write_bytes(data)
                    os.replace(staged, path)
                finally:
                    staged.unlink(missing_ok=True)
            for other in self.folder.glob(f"*/{name}"):
                if other != path:
                    other.unlink(missing_ok=True)
        return path.relative_to(self.root).as_posix()

    def check_writable(self):
        """One line when the app starts if flagged images cannot be written (a read-only disk, a folder not ours), not
        an error at every visitor's flag: a file written into the folder that will hold them, and removed."""
        where = self.folder if self.folder.is_dir() else self.root
        with self.writing(f"cannot keep flagged images in {self.root}"):
            probe = staging_path(where / "probe")
            try:
                probe.write_bytes(b"")
            finally:
                probe.unlink(missing_ok=True)

    @contextmanager
    def writing(self, failed):
        """A write that fails because of where it writes (a full or read-only disk, a folder not ours) as one line,
        `failed` and why, not a traceback."""
        try:
            yield
        except OSError as e:
            if e.errno not in WRITE_ERRORS:
                raise
            raise UserError(f"{failed}: {write_failure(e, self.root)}") from None

    def take_turn(self):
        """Refuse a flag beyond `per_minute` in the last minute (all visitors together) or a full folder."""
        now = time.monotonic()
        with self.lock:
            while self.recent and now - self.recent[0] > 60:
                self.recent.popleft()
            if len(self.recent) >= self.per_minute:
                raise UserError("too many flags in the last minute: try again in a minute")
            if self.count() >= self.max_files:
                raise UserError(f"the flagged folder is full ({self.max_files} images): its owner must sort it first")
            self.recent.append(now)

    def count(self):
        return sum(1 for _ in self.folder.glob("*/*.jpg")) if self.folder.is_dir() else 0
