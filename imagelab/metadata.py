"""What a run records about itself: JSON files and the library versions it ran with.

Standard library only: the downloader writes its summary without loading the training stack.
"""
import json
import platform
from importlib.metadata import PackageNotFoundError, version


def write_json(obj, path):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def versions(packages=("fastai", "timm", "torch")):
    """The versions of the libraries a model was trained with, for its metrics.json."""
    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {**{name: installed(name) for name in packages}, "python": platform.python_version()}
