"""The apps' command-line options, parsed before gradio or any model is imported: `--help` answers at once.

Standard library only, like `imagelab.paths`.
"""
import argparse
import errno
import os
import socket
from pathlib import Path
from typing import NamedTuple

from . import ArgumentParser, UserError, paths
from .loading import FORMS, open_model


class AppModel(NamedTuple):
    kind: str  # what the app serves: a "classifier" or an "autoencoder"
    train: str  # how to train one, shown where it is missing: online (the Hub's data and weights), then offline


APPS = {  # the model each app serves (named after it: models/<app>.pkl)
    "pets": AppModel("classifier", "python training/train_pets.py   # offline: --data ../shared/data/catsdogs "
                                   "--preset scratch"),
    "bears": AppModel("classifier", "python training/train_bears.py   # offline: --data ../shared/data/bears "
                                    "--preset scratch"),
    "autoencoder": AppModel("autoencoder", "python training/train_autoencoder.py   # offline: --data "
                                           "../shared/data/catsdogs"),
}


def from_env(name):
    """The environment variable `name`, None where it is unset or empty (`MODEL_PATH=` is no path: not the current
    folder)."""
    return os.environ.get(name) or None


def port(text):
    """A TCP port number, for argparse."""
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (1 to 65535): {text!r}")
    return int(text)


def app_parser(description, app=None, model=None, flagging=False):
    """Options every app takes; `--model` (a model of the kind `app` serves, `model` unless given) when it
    serves one; `--flag-data` where visitors may flag wrong answers (a classifier app)."""
    p = ArgumentParser(description=description)
    if model is not None:
        p.add_argument("--model", default=from_env("MODEL_PATH") or str(model),
                       help=f"exported {APPS[app].kind} ({FORMS[APPS[app].kind]}); also the MODEL_PATH environment "
                            "variable")
    p.add_argument("--port", type=port, default=from_env("GRADIO_SERVER_PORT") or "7860",
                   help="port to listen on; also GRADIO_SERVER_PORT")
    p.add_argument("--host", default=from_env("GRADIO_SERVER_NAME") or "127.0.0.1",
                   help="address to listen on (0.0.0.0 to share on your network); also GRADIO_SERVER_NAME")
    p.add_argument("--mcp", action="store_true", default=os.environ.get("GRADIO_MCP_SERVER", "").lower() == "true",
                   help="also serve the app's endpoints as MCP tools at /gradio_api/mcp/, for AI assistants; "
                        "also GRADIO_MCP_SERVER=true")
    if flagging:
        p.add_argument("--flag-data", metavar="DIR", default=from_env("FLAG_DATA"),
                       help="let visitors flag a wrong answer with its right class: the image is kept in "
                            "DIR/flagged/<class>/ (DIR: the dataset folder; train with --flagged to add them); "
                            "off unless given; also FLAG_DATA")
    return p


def app_default_model(app_file, name):
    """A Space bundle keeps its model's graph beside app.py (`models/<name>.onnx`); the repository its learner in
    `models/<name>.pkl`."""
    here = Path(app_file).resolve().parent
    bundled = paths.default_model(name, here, ".onnx")
    return bundled if bundled.exists() else paths.default_model(name, here.parents[1])


def train_hint(app, model, default):
    """How to train `app`'s model, to say where `model` is missing: only when it is the `default` path (a path the
    user gave may just be mistyped)."""
    return APPS[app].train if Path(model).resolve() == Path(default).resolve() else None


def app_model(model, app, default):
    """Open `model`, which `app` serves, once, before anything is built: a UserError if it cannot be served."""
    return open_model(model, APPS[app].kind, train_hint(app, model, default))


def check_listen(host, port, how="--port"):
    """One line if `host`:`port` cannot be listened on, found before the server tries: uvicorn prints a line of its
    own (`ERROR: [Errno 99] ...`) before the app's error. Bound as uvicorn binds (IPv6 where the host has a colon);
    `how`: how to choose another port."""
    host = host or "127.0.0.1"  # Gradio's for an empty name
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no owner
            s.bind((host.strip("[]"), port))
    except OSError as e:
        raise cannot_listen(host, port, e, how) from None


def cannot_listen(host, port, error, how="--port"):
    code, where = getattr(error, "errno", None), f"[{host.strip('[]')}]" if ":" in host else host
    if code == errno.EADDRINUSE:
        why = f"the port is in use (choose another with {how})"
    elif code == errno.EACCES:
        why = f"ports below 1024 need root (choose another with {how})"
    elif isinstance(error, socket.gaierror) or code in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        why = f"{host} is not an address of this machine"
    else:
        why = f"the port is in use (choose another with {how}) or {host} is not an address of this machine"
    return UserError(f"cannot listen on {where}:{port}: {why} ({str(error).split('.')[0]})")
