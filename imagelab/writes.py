"""How this project writes files: all or nothing (a staging path renamed into place; an install cut short undone by
the next run or app), one run at a time into a model, and what a write that failed says.

Light (the standard library, and psutil where a staging path is left to judge), like imagelab.paths.
"""
import errno
import glob
import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

from . import UserError, first_line

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def staging_path(path):
    """A hidden sibling of `path`, unique to this process and thread: written first, then renamed onto `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


@contextmanager
def one_run_writes(model):
    """Hold the lock of `model` (`.<name>.lock` beside it) for the block: one run at a time trains into `--out`, its
    checkpoint, report and exports; another is refused with one line instead of overwriting them meanwhile. POSIX
    (flock); elsewhere runs are not guarded."""
    if fcntl is None:
        yield
        return
    model = Path(model)
    lock = model.with_name(f".{model.name}.lock")
    made = [p for p in lock.parents if not p.exists()]  # nearest first: removed again if the run leaves them empty
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip()
            f.close()
            raise UserError(f"another run{f' (process {pid})' if pid.isdigit() else ''} is training into {model}: "
                            "wait for it to end, or give another --out") from None
        try:
            if os.path.samestat(os.stat(lock), os.fstat(f.fileno())):
                break
        except FileNotFoundError:
            pass
        f.close()  # the run before removed it as it ended, after this one opened it: lock the file now there
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)  # while holding it: whoever opened it meanwhile sees it gone, and opens anew
        f.close()
        for folder in made:  # a run refused before it wrote anything leaves no folders behind
            try:
                folder.rmdir()
            except OSError:  # not empty: the run's files, or another's
                break


def remove_abandoned_staging(path):
    """Delete the staging paths of `path` (files or folders) whose process has ended: left by a run killed mid-write.
    An export killed while its files moved in is undone first (`undo_install`): the previous model is back whole,
    and its previous versions, kept in the staging folder, are never deleted before. Called where a run starts and
    where a model is opened to be served: neither must see a mix of two models."""
    path = Path(path)
    found = list(path.parent.glob(f".{glob.escape(path.name)}.*.*.tmp"))
    if not found:
        return
    import psutil  # only where there is something to judge: the apps' Spaces do not install it
    for p in found:
        pid = p.name[len(path.name) + 2:].split(".")[0]
        if not pid.isdigit() or psutil.pid_exists(int(pid)):
            continue  # not a staging path, or its writer may still be writing
        if p.is_dir():
            try:
                undo_install(p)
            except OSError as e:
                raise UserError(f"an export into {p.parent} was cut short, and its previous files cannot be put back "
                                f"from {p}: {e.strerror}") from None
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# In a staging folder while its files move in beside it (imagelab.export.install): the versions they replace, and the
# journal that names what moves and which of those names held a previous version. Written whole before the first
# move and deleted after the last, the journal is there exactly while the folder beside it may hold a mix.
PREVIOUS, INSTALLING = ".previous", ".installing.json"


def undo_install(stage):
    """Put back what an install from the staging folder `stage` replaced beside it and end that install (its journal
    says what); nothing where none had begun or it has ended. Every step can be taken again: an undo cut short by
    another kill is finished by the next. A file moved in is not in `stage` any more; one whose journal says it had
    no previous version is removed."""
    journal = stage / INSTALLING
    try:
        f = open(journal)
    except FileNotFoundError:
        return
    with f:
        if fcntl is not None:  # a run and an app that start together undo it one at a time: the second finds it done
            fcntl.flock(f, fcntl.LOCK_EX)
        if os.fstat(f.fileno()).st_nlink == 0:
            return
        try:
            moving = json.load(f)
        except ValueError:  # cut short as it was written: no file had moved yet
            moving = {"names": [], "had": []}
        folder, previous = stage.parent, stage / PREVIOUS
        for name in moving["names"]:
            dest, old, had = folder / name, previous / name, name in moving["had"]
            moved_in = not os.path.lexists(stage / name)
            if moved_in and had and not os.path.lexists(old):
                continue  # its previous version is back already
            if moved_in and dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)  # a folder cannot be replaced in one step
            elif moved_in and not had:
                dest.unlink(missing_ok=True)
            # A folder not moved in yet had stepped aside for it; a file not moved in is still its previous version
            # (the copy beside it may be incomplete)
            if os.path.lexists(old) and (moved_in or not os.path.lexists(dest)):
                os.replace(old, dest)
        journal.unlink()


# What a write fails with because of where it writes (not a bug): the disk full, read-only or not ours, a name too long.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
                errno.EIO}


def write_failure(error, folder):
    """Why a file could not be written into `folder`, in a few words: the system's reason, and the disk's free space
    where it may be full. PyTorch's writer fails with a message of its own ("unexpected pos ...") that never says."""
    if torch_write_failed(error):
        reason = "the file could not be written whole"
    elif isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason = error.strerror
    else:
        return error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
    try:
        free = shutil.disk_usage(folder).free // 2**20
        return f"{reason} ({free:,} MB free on its disk without the unfinished files)"
    except OSError:
        return reason


def torch_write_failed(error):
    """Whether `error` is PyTorch's writer failing to write a file (a full disk, as a rule)."""
    return isinstance(error, RuntimeError) and any(s in str(error) for s in ("PytorchStreamWriter", "inline_container"))
