"""What a run records about itself: JSON files and the library versions it ran with.

Standard library only: the downloader writes its summary without loading the training stack.
"""
import json
import math
import platform
from importlib.metadata import PackageNotFoundError, version

LIBRARIES = ("fastai", "timm", "torch")  # whose versions a model's metrics.json records


def write_json(obj, path):
    """`obj` as strict JSON, which has no NaN or infinity: such a number is written as null."""
    path.write_text(json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")


def finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def versions():
    """The versions of the libraries a model was trained with, for its metrics.json."""
    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {**{name: installed(name) for name in LIBRARIES}, "python": platform.python_version()}
