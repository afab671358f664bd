"""Cleaning a labelled image folder with a trained model: rank a class's images by loss, then move the ones
the user marks to another class folder or to `removed/`, logging every move so that it can be undone.

Nothing is ever deleted, and no request can read or move a file outside the dataset root: every path is
`<class>/<file>` (or `flagged/<class>/<file>`, an image the apps' visitors flagged, or `removed/<class>/<file>`
in the log), each part a plain name in UTF-8, no symlinks, and the resolved result must still sit in the folder it
names.
"""
import contextlib
import json
import os
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
from PIL import Image

from . import UserError
from .images import check_image, open_rgb
from .paths import (CLEANING_LOG, FLAGGED, REMOVED, check_class, check_class_name, existing_folder, hidden, plain_name,
                    split_path)

ACTIONS = ("keep", "relabel", "remove")


def unsendable(rel):
    """Why the relative path `rel` (as the disk names it) cannot be listed and sent back in a request, or None.
    JSON carries UTF-8 text: a name that is not UTF-8 (its bytes held by Python as lone surrogates) can neither be
    shown nor named in a request; `plain_name` refuses a backslash. Such files are left out, and named in `unlisted`."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    return "holds a backslash" if "\\" in rel else None


def printable(rel):
    """`rel` to show in a message, its bytes that are not UTF-8 as \\xff escapes."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def safe_path(root, rel, classes, under=()):
    """`root/<class>/<file>` (or `root/<top>/<class>/<file>` for a `top` in `under`: REMOVED, FLAGGED) for the
    relative path `rel`, checked to be inside `root`, through no symlink, with `<class>` one of `classes`;
    else a UserError."""
    if not isinstance(rel, str):
        raise UserError(f"not a path: {rel!r}")
    why = unsendable(rel)
    if why:  # no page lists it: a request made it up
        raise UserError(f"not a path the cleaner lists ({why}): {rel!r}")
    parts = rel.split("/")
    folder = root
    if parts[0] in under:
        parts, folder = parts[1:], root / parts[0]
    if len(parts) != 2 or parts[0] not in classes:
        raise UserError(f"not <class>/<file> of this dataset: {rel!r}")
    path = folder / check_class_name(parts[0]) / plain_name(parts[1])
    for p in (folder, path.parent, path):
        where = "" if p == path else f" ({p.relative_to(root).as_posix()}/ is one)"
        if p.is_symlink():
            raise UserError(f"refusing a symbolic link: {rel!r}{where}")
        if p != path and p.exists() and not p.is_dir():
            raise UserError(f"not a folder: {p.relative_to(root).as_posix()} (in {rel!r})")
    if path.resolve().parent != (folder / parts[0]).resolve() or not path.resolve().is_relative_to(root):
        raise UserError(f"outside the dataset: {rel!r}")
    return path


def damage(entry):
    """What is wrong with a log line's JSON as a batch that `Cleaner._move` writes, or None: a line edited by hand, or
    by another program, that undo cannot read."""
    if not isinstance(entry, dict) or type(entry.get("batch")) is not int:
        return "not a numbered batch"
    if entry.get("kind") not in ("clean", "undo") or (entry["kind"] == "undo" and type(entry.get("undoes")) is not int):
        return "neither a clean nor the undo of a numbered batch"
    moves = entry.get("moves")
    if not isinstance(moves, list) or not all(isinstance(m, dict) and isinstance(m.get("from"), str)
                                              and isinstance(m.get("to"), str) for m in moves):
        return "its moves are not each a 'from' and a 'to'"
    return None


def ends_mid_line(f):
    """Whether the binary file `f` ends with a line that lacks its newline (a write cut short by a crash)."""
    if f.seek(0, os.SEEK_END) == 0:
        return False
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


def free_name(folder, name, taken=()):
    """`name` in `folder`, or `stem_1.ext`, `stem_2.ext`... if taken (on the disk, or in `taken`: the destinations of
    a batch's earlier moves): a move never overwrites a file."""
    path, stem, suffix = folder / name, Path(name).stem, name[len(Path(name).stem):]
    i = 0
    while path.exists() or path.is_symlink() or path in taken:
        i += 1
        path = folder / f"{stem}_{i}{suffix}"
    return path


class Cleaner:
    """A dataset folder (one sub-folder per class) and a classifier trained on it.

    `model` is any form the apps serve (a path to `.pkl`, `.onnx`, `.safetensors`, or hf://...) or a
    `Predictor` already opened; images are ranked with that predictor, like the apps classify them.
    """

    def __init__(self, model, root):
        from .inference import Predictor
        from .loading import CLASSIFIER, open_model
        self.root = existing_folder(root).resolve()
        if isinstance(model, Predictor):
            self.predictor = model
        else:
            # max_pixels: the dataset's images, as big as training reads
            self.predictor = open_model(model, CLASSIFIER, max_pixels=None)
        self.classes = [check_class_name(str(c)) for c in self.predictor.vocab]
        split = split_path(self.predictor.path)
        self.split = json.loads(split.read_text()) if split.is_file() else {}
        self.splits = (["valid", "train", "all"] if self.split else ["all"]) + [FLAGGED]
        self.log = self.root / CLEANING_LOG
        if not any((self.root / c).is_dir() for c in self.classes):  # files labelled by name have nowhere to move
            raise UserError(f"{self.root} has no folder named after a class of the model ({', '.join(self.classes)}): "
                            "the cleaner sorts a dataset of one sub-folder per class, the one the model was trained on")
        linked = [c for c in self.classes if (self.root / c).is_symlink()]
        if linked:  # training reads through it; the cleaner moves files only where they really are
            raise UserError(f"{self.root / linked[0]} is a link to a folder elsewhere: clean the folder it links to, "
                            f"{(self.root / linked[0]).resolve()}, or a copy of the dataset")
        self.moving = threading.Lock()  # one apply or undo at a time: each takes the next batch number of the log

    def files(self, label, split="all"):
        """Relative paths of the readable images of class `label` in `split` (a plain file each, no links, named in
        UTF-8); split `flagged`: those flagged in the apps (`flagged/<label>/`), not yet moved into the class folder."""
        return [r for r in self._candidates(label, split) if not unsendable(r) and check_image(self.root / r) is None]

    def unlisted(self, label, split="all"):
        """One line on the files of `label` in `split` that `files` leaves out for their names ("" when none)."""
        names = [printable(r) for r in self._candidates(label, split) if unsendable(r)]
        if not names:
            return ""
        them = "it" if len(names) == 1 else "them"
        return (f"{len(names)} file{'s' * (len(names) > 1)} left out ({names[0]}{', ...' * (len(names) > 1)}): a name "
                f"that is not valid UTF-8 (or holds a backslash) cannot be sent back from the page; rename {them} to "
                f"clean {them} here")

    def _candidates(self, label, split):
        """The relative paths of every plain file of `label` in `split`, named as the disk names them."""
        check_class(label, self.classes)
        if split not in self.splits:
            raise UserError(f"split must be one of {', '.join(self.splits)}, not {split!r}")
        top = f"{FLAGGED}/" if split == FLAGGED else ""
        folder = self.root / top / label
        if any(p.is_symlink() for p in (folder, folder.parent)) or not folder.is_dir():
            return []
        names = sorted(e.name for e in os.scandir(folder)
                       if e.is_file(follow_symlinks=False) and not hidden(e.name))
        rels = [f"{top}{label}/{n}" for n in names]
        if split in ("valid", "train"):
            chosen = set(self.split[split])
            rels = [r for r in rels if r in chosen]
        return rels

    def rank(self, label, split="all", limit=None):
        """The `limit` (None or 0: all) images of `label` in `split` with the highest loss, each with the model's
        prediction."""
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise UserError(f"limit must be a number of images, 0 for all: not {limit!r}")
        rels = self.files(label, split)
        if not rels:
            return []
        probs = self.predictor.probabilities([self.root / r for r in rels])
        # cross-entropy, the training loss: -log of the probability given to the true class
        losses = -np.log(np.maximum(probs[:, self.classes.index(label)], np.finfo(np.float32).tiny))
        records = [{"file": r, "label": label, "predicted": self.classes[int(p.argmax())],
                    "probability": round(float(p.max()), 4), "loss": round(float(loss), 4)}
                   for r, p, loss in zip(rels, probs, losses)]
        records.sort(key=lambda rec: -rec["loss"])
        return records[:limit] if limit else records

    def thumbnail(self, rel, size=256):
        path = safe_path(self.root, rel, self.classes, under=(FLAGGED,))
        if not path.is_file():
            raise UserError(f"no such file: {rel!r}")
        im = open_rgb(path)
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        return im

    def apply(self, actions):
        """Carry out [{"file": "<class>/<file>", "action": "keep" | "remove" | "relabel", "to": "<class>"}].

        A flagged image (`flagged/<class>/<file>`) relabelled to any class, its own included, moves into that
        class folder. Every entry is checked before anything moves: one bad entry refuses the whole request.
        Returns the moves made ({"from", "to"} relative paths), also appended to the log as one batch.
        """
        if not isinstance(actions, list):
            raise UserError("actions must be a list of {file, action, to}")
        plan, seen = [], set()
        for a in actions:
            if not isinstance(a, dict) or a.get("action") not in ACTIONS:
                raise UserError(f"each action needs a file and an action ({', '.join(ACTIONS)}): {a!r}")
            src = safe_path(self.root, a.get("file"), self.classes, under=(FLAGGED,))
            if not src.is_file():
                raise UserError(f"no such file: {a['file']!r}")
            if a["file"] in seen:
                raise UserError(f"listed twice: {a['file']!r}")
            seen.add(a["file"])
            if a["action"] == "relabel" and a.get("to") not in self.classes:
                raise UserError(f"relabel needs 'to', a class of this model: {a.get('to')!r}")
            if a["action"] == "remove":
                plan.append((src, self.root / REMOVED / src.parent.name, None))
            elif a["action"] == "relabel" and src.parent != self.root / a["to"]:
                plan.append((src, self.root / a["to"], None))
        with self.locked():
            return self._move(plan, "clean")

    def undo(self):
        """Move the files of the last batch not yet undone back where they were."""
        with self.locked():
            return self._undo()

    @contextlib.contextmanager
    def locked(self):
        """One apply or undo at a time on this dataset, also between processes (two cleaners on one folder): each
        takes the next batch number of the log."""
        with self.moving, open(self.log, "a+b") as log:
            if fcntl is not None:  # POSIX; elsewhere, one cleaner per folder
                fcntl.flock(log, fcntl.LOCK_EX)
            yield

    def _undo(self):
        _, damaged = self._lines()
        if damaged:  # it may be the batch to undo, or say which one an undo undid
            number, wrong, _ = damaged[0]
            raise UserError(f"cannot undo: line {number} of {self.log} is damaged ({wrong}); put it right or delete "
                            "it, then undo again (the other lines are as they were)")
        batches = self.history()
        # undone: by an undo that moved all it planned; one stopped part way (killed, interrupted, a failed move) is
        # done again by the next, from where it stopped
        undone = {b.get("undoes") for b in batches if b.get("kind") == "undo" and not b.get("cut_short")}
        todo = [b for b in batches if b.get("kind") == "clean" and b["batch"] not in undone]
        if not todo:
            raise UserError("nothing to undo")
        last = todo[-1]
        plan = []
        for m in reversed(last["moves"]):
            src = safe_path(self.root, m["to"], self.classes, under=(REMOVED,))
            dst = safe_path(self.root, m["from"], self.classes, under=(FLAGGED,))
            if not src.exists() and dst.is_file():
                continue  # back already: put back by an undo stopped part way, or by hand
            if not src.is_file() or dst.exists():
                raise UserError(f"cannot undo batch {last['batch']}: {m['to']} has moved or {m['from']} exists")
            plan.append((src, dst.parent, dst.name))
        return self._move(plan, "undo", undoes=last["batch"])

    def _lines(self):
        """(batches, damaged): every batch line of the log, and (line number, what is wrong, its batch number or None)
        of each line that is JSON but no batch (`damage`). A line that is not JSON (a write cut short by a crash or a
        full disk) is passed over: the rest of the log still undoes."""
        if not self.log.is_file():
            return [], []
        batches, damaged = [], []
        for number, line in enumerate(self.log.read_text(errors="replace").splitlines(), 1):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            wrong = damage(entry)
            if wrong is None:
                batches.append(entry)
            else:
                batch = entry.get("batch") if isinstance(entry, dict) and type(entry.get("batch")) is int else None
                damaged.append((number, wrong, batch))
        return batches, damaged

    def history(self):
        """The logged batches, each with the moves it made: those that moved files, and every undo (one that found
        its files back already still undid its batch).

        A batch is logged twice: what it is about to move ("planned"), then what it moved. One that moved less than
        it planned is "cut_short": stopped by a failed move or Ctrl-C, or killed in between (Ctrl-C on the server,
        kill -9), in which case its moves are the planned ones found done."""
        lines, _ = self._lines()
        planned = {b["batch"]: b for b in lines if b.get("planned")}
        ended = {b["batch"] for b in lines if not b.get("planned")}
        batches = []
        for b in lines:
            if b.get("planned"):
                if b["batch"] in ended:
                    continue  # its second line says what moved
                moves, cut_short = [m for m in b["moves"] if self.moved(m)], True
            else:  # a log written before the planned lines has only this one
                moves = b["moves"]
                cut_short = b["batch"] in planned and len(moves) < len(planned[b["batch"]]["moves"])
            entry = {**{k: v for k, v in b.items() if k != "planned"}, "moves": moves, "cut_short": cut_short}
            if moves or entry.get("kind") == "undo":
                batches.append(entry)
        return batches

    def moved(self, move):
        """Whether the logged `move` was made: its file is at its destination and gone from where it was."""
        return (self.root / move["to"]).is_file() and not (self.root / move["from"]).exists()

    def _move(self, plan, kind, **extra):
        """Move each (file, folder, name) (name None: the file's own, or a free variant), never overwriting;
        log the moves as one batch, before and after they are made (`history`)."""
        batches, damaged = self._lines()  # a damaged line's number too: put right, it must not share it
        batch = 1 + max([b["batch"] for b in batches] + [n for _, _, n in damaged if n is not None], default=0)
        targets, taken = [], set()
        for src, folder, name in plan:
            dst = folder / name if name is not None else free_name(folder, src.name, taken)
            taken.add(dst)
            targets.append((src, dst))
            try:  # where a file goes passes the checks of where one comes from: through a link (`removed` leading
                # out of the dataset, say) it would land out of undo's reach
                safe_path(self.root, self.rel(dst), self.classes, under=(REMOVED, FLAGGED))
            except UserError as e:
                raise UserError(f"nothing moved: {e}") from None
        if not targets and kind == "clean":
            return []  # nothing to move (keep, say), nothing to log; an undo is logged even then: its batch is undone
        entry = {"batch": batch, "kind": kind, **extra, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._log({**entry, "planned": True, "moves": [{"from": self.rel(s), "to": self.rel(d)} for s, d in targets]},
                  "nothing moved")
        moves = []
        try:
            for src, dst in targets:
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.exists() or dst.is_symlink():
                    raise FileExistsError(17, "will not overwrite", str(dst))
                os.rename(src, dst)
                moves.append({"from": self.rel(src), "to": self.rel(dst)})
        except OSError as e:
            raise UserError(f"moved {len(moves)} of {len(targets)} files, then: {e.strerror}: {e.filename}") from None
        finally:  # the log says exactly what moved, even when a move failed half-way
            self._log({**entry, "moves": moves}, f"{len(moves)} of {len(targets)} files moved, which undo still finds")
        return moves

    def _log(self, entry, then):
        """Append `entry` to the log; a UserError that says `then` (what the batch did) if it cannot be written."""
        try:
            with open(self.log, "a+b") as f:  # a line of its own after one cut short
                f.write((("\n" if ends_mid_line(f) else "") + json.dumps(entry) + "\n").encode())
        except OSError as e:
            raise UserError(f"cannot write the cleaning log {self.log}: {e.strerror}; {then}") from None

    def rel(self, path):
        return path.relative_to(self.root).as_posix()
