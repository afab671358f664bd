"""The apps' command-line options, parsed before gradio or any model is imported: `--help` answers at once.

Standard library only, like `imagelab.paths`.
"""
import argparse
import os
from pathlib import Path

from . import paths
from .loading import FORMS


def app_parser(description, default_model=None, kind="classifier", flagging=False):
    """Options every app takes; `--model` (a `kind` model, `default_model` unless given) when it serves one;
    `--flag-data` where visitors may flag wrong answers (a classifier app)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if default_model is not None:
        p.add_argument("--model", default=os.environ.get("MODEL_PATH", str(default_model)),
                       help=f"exported {kind} ({FORMS[kind]}); also the MODEL_PATH environment variable")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (0.0.0.0 to share on your network)")
    p.add_argument("--mcp", action="store_true", default=os.environ.get("GRADIO_MCP_SERVER", "").lower() == "true",
                   help="also serve the app's endpoints as MCP tools at /gradio_api/mcp/, for AI assistants; "
                        "also GRADIO_MCP_SERVER=true")
    if flagging:
        p.add_argument("--flag-data", metavar="DIR", default=os.environ.get("FLAG_DATA") or None,
                       help="let visitors flag a wrong answer with its right class: the image is kept in "
                            "DIR/flagged/<class>/ (DIR: the dataset folder; train with --flagged to add them); "
                            "off unless given; also FLAG_DATA")
    return p


def default_model(app_file, name):
    """A Space bundle keeps its model's graph beside app.py (`models/<name>.onnx`); the repository its learner in
    `models/<name>.pkl`."""
    here = Path(app_file).resolve().parent
    bundled = paths.default_model(name, here, ".onnx")
    return bundled if bundled.exists() else paths.default_model(name, here.parents[1])


def app_model(args, kind, default, train):
    """Open the model the app serves, once, before anything is built: a UserError if it cannot be served.

    The train command is named only when the model missing is the default one, not a path the user gave.
    """
    from .loading import open_model
    return open_model(args.model, kind, train if args.model == str(default) else None)
