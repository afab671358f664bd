"""What a dataset folder holds: one sub-folder per class, plus the dataset tools' own bookkeeping.

No fastai here: the download tool and the cleaner's page use these without the training stack.
"""
from . import UserError

# What the dataset tools write at the top of a dataset folder (imagelab.download, imagelab.cleaning):
# never training images, so find_images leaves them out; class folders cannot take these names.
BOOKKEEPING = ("quarantine", "removed", "download-summary.json", "cleaning-log.jsonl")


def ignored(parts):
    """Whether a file, given as its path parts below the dataset folder, is not a training image."""
    return parts[0] in BOOKKEEPING or any(part.startswith(".") for part in parts)


def check_class_name(name):
    """A class name is a folder name: one plain path component, not hidden, not one of the tools' own."""
    if (not isinstance(name, str) or not name.strip() or name.startswith(".") or name in BOOKKEEPING
            or any(c in name for c in "/\\\0")):
        raise UserError(f"not a usable class name: {name!r}")
    return name
