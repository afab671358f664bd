"""Opening an exported model to serve it: its kind, checked once when an app or CLI starts.

Every app and the batch CLI call `open_model` before they build anything, so a mistyped path, a file
that does not load, or a model of the wrong kind stops the program with one line instead of starting
an app that cannot answer.
"""
import json
import warnings
from pathlib import Path

from . import UserError, first_line
from .paths import DECODER, artifact_paths
from .writes import remove_abandoned_staging

CLASSIFIER, AUTOENCODER = "classifier", "autoencoder"
# The version of each kind's config.json this code reads (imagelab.export.learner_config,
# imagelab.autoencoder.autoencoder_config). Autoencoder /2 holds its PCA path: /1 weights do not fit it.
FORMAT = {CLASSIFIER: "imagelab-classifier/1", AUTOENCODER: "imagelab-autoencoder/2"}
# What each kind is served from: its learner, its ONNX graph, or its weights (from which the graph is made).
SERVED_FROM = {CLASSIFIER: (".pkl", ".onnx", ".safetensors"), AUTOENCODER: (".pkl", ".onnx", ".safetensors")}
# The artifacts (imagelab.paths.artifact_paths' names) a form is served with, its config apart: an autoencoder's
# graph of an image needs its graph of a code.
SERVED_WITH = {CLASSIFIER: {}, AUTOENCODER: {".onnx": ("decoder",)}}
FORMS = {kind: ", ".join(suffixes) + " or hf://USER/REPO/FILE[@REVISION]" for kind, suffixes in SERVED_FROM.items()}


def load_trusted_learner(path):
    """fastai's `load_learner` without its warning about pickle: only for a learner its owner exported.

    The warning is right in general and noise here: every caller loads the user's own model, and
    printing it at each start teaches people to ignore warnings.
    """
    from fastai.learner import load_learner
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"load_learner` uses Python's insecure pickle")
        return load_learner(path, cpu=True)


def read_config(path):
    """The JSON config beside a model file, or None when there is none; one line if it is of a kind this code
    knows, in a format it does not read (written by another version)."""
    file = artifact_paths(path)["config"]
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    kind = config_kind(config)
    if kind in FORMAT and config.get("format") != FORMAT[kind]:
        raise UserError(f"{file} is {article(kind)} of format {config.get('format')}, not {FORMAT[kind]}: retrain it "
                        "with this version's training/ scripts")
    return config


def config_kind(config):
    # Classifier configs written before "kind" existed say only their format.
    return config.get("kind") or (CLASSIFIER if config.get("format") == FORMAT[CLASSIFIER] else None)


def learner_kind(learn):
    from .autoencoder import ConvAutoencoder
    if isinstance(learn.model, ConvAutoencoder):
        return AUTOENCODER
    return CLASSIFIER if getattr(learn.dls, "vocab", None) is not None else None


def no_model(path, train=None):
    """The one line for a model file that is not there; with `train`, the command that makes it."""
    return UserError(f"no model at {path}" + (f": train one first with `{train}`" if train else ""))


def local_path(spec, kind):
    """A path as given, or an `hf://` model's forms that `kind` is served from, fetched into the Hub cache."""
    from .hub import resolve_model  # here: the apps read this module's names before their options, without the Hub
    return resolve_model(spec, prefer=SERVED_FROM[kind][1:], needs=SERVED_WITH[kind])


def model_file(path, kind, train=None):
    """`path` if it is a file that `kind` is served from, else one line why not (with `train`, the command that makes
    it). An export killed as it moved its files in is undone first: the previous model is back."""
    path = Path(path)
    if path.name.endswith(DECODER):
        raise UserError(f"cannot serve {path}: it turns codes into images; serve the autoencoder beside it, "
                        f"{path.name.removesuffix(DECODER)}.onnx")
    if path.suffix not in SERVED_FROM[kind]:
        raise UserError(f"cannot serve {path}: {article(kind)} is served from {FORMS[kind]}")
    remove_abandoned_staging(path.with_suffix(".pkl"))
    if not path.is_file():
        raise no_model(path, train)
    return path


def open_model(spec, kind, train=None, **options):
    """The served object for model `spec` (a path or hf://...): a `Predictor` or a `Reconstructor`, made with
    `options` (a Predictor's `tta`, `max_pixels`).

    A UserError says in one line what is wrong: no such file (with `train`, the command that makes
    it), a form this kind cannot be served from, a file that does not load, a model of another kind.
    """
    path = model_file(local_path(spec, kind), kind, train)
    try:
        config, learn = read_config(path), None
        if config is None and path.suffix != ".pkl":
            raise UserError(f"cannot serve {path}: {artifact_paths(path)['config'].name} is not beside it")
        if config is None:
            learn = load_trusted_learner(path)
        got = config_kind(config) if config is not None else learner_kind(learn)
        if got != kind:
            raise UserError(f"{path} is {article(got or 'unknown kind of')} model, not {article(kind)}: "
                            f"this program serves {kind}s")
        return _serve(kind, path, learn, options)
    except UserError:
        raise
    except Exception as e:  # a corrupt or foreign file fails in many ways, all of them "does not load"
        if isinstance(e, ImportError) and e.name and e.name.split(".")[0] != __package__:
            # a .pkl or .safetensors where only ONNX Runtime was installed (a Space's requirements); a module of
            # this package that a pickle names but this version lacks is the generic case
            raise UserError(f"cannot load the model {path}: it needs {e.name}, which is not installed here (serve "
                            "its .onnx, or install this project's requirements.txt)") from None
        raise UserError(f"cannot load the model {path}: {first_line(e)} (a damaged or incomplete copy? export or "
                        "download it again)") from None


def _serve(kind, path, learn, options):
    from .inference import Predictor, Reconstructor
    return (Predictor if kind == CLASSIFIER else Reconstructor)(path, learn=learn, **options)


def article(word):
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"
