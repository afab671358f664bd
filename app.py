"""All the demos on one page, a tab each: `python app.py`.

Each tab's model is its environment variable (PETS_MODEL, BEARS_MODEL, AUTOENCODER_MODEL; the cleaner
tab needs CLEANER_MODEL and CLEANER_DATA) or its default in models/; PETS_FLAG_DATA and BEARS_FLAG_DATA turn
on flagging in their tab (the dataset folder that keeps the flagged images). A default model not trained yet
gets a tab that says how to train it; any other model that cannot be served stops the app with one line.
"""
from contextlib import contextmanager
from pathlib import Path

from imagelab import UserError, run_cli
from imagelab.app_options import APPS, app_parser, from_env
from imagelab.loading import CLASSIFIER, open_model
from imagelab.paths import default_model

ROOT = Path(__file__).resolve().parent  # this file's checkout: not always the imported imagelab's (an install, a copy)


def tab_model(app):
    """The opened model of `app`'s tab (`<APP>_MODEL`, else models/<app>.pkl), or that default's path when it is
    not trained yet."""
    variable = f"{app.upper()}_MODEL"
    given, default = from_env(variable), default_model(app, ROOT)
    if given is None and not default.exists():
        return default
    with named(variable if given else None):
        return open_model(given or default, APPS[app].kind)


def cleaner():
    """The cleaner tab's `Cleaner`, or None when CLEANER_MODEL and CLEANER_DATA are not both set."""
    model, data = from_env("CLEANER_MODEL"), from_env("CLEANER_DATA")
    if bool(model) != bool(data):
        raise UserError("the cleaner tab needs both CLEANER_MODEL and CLEANER_DATA")
    from imagelab.cleaning import Cleaner
    with named("CLEANER_MODEL, CLEANER_DATA"):
        return Cleaner(model, data) if model else None


@contextmanager
def named(variables):
    """A `UserError` inside names the environment `variables` it came from (a user who set them long ago, or in a
    Space's settings, would not know which path the line means)."""
    try:
        yield
    except UserError as e:
        if not variables:
            raise
        raise UserError(f"{variables}: {e}") from None


def build():
    """The page: every model opened and checked before the first tab is drawn."""
    models = {app: tab_model(app) for app in APPS}
    clean = cleaner()
    import gradio as gr
    from imagelab.cleaner_ui import cleaner_panel
    from imagelab.ui import autoencoder_panel, classifier_panel
    with gr.Blocks(title="Image apps") as demo:
        gr.Markdown("# Image apps\nfastai models trained on your own machine.")
        for app in [app for app, served in APPS.items() if served.kind == CLASSIFIER]:
            with gr.Tab(app.title()):
                classifier_panel(models[app], train_command=APPS[app].train, api_name=f"{app}_predict",
                                 flag_data=from_env(f"{app.upper()}_FLAG_DATA"))
        with gr.Tab("Autoencoder"):
            autoencoder_panel(models["autoencoder"], train_command=APPS["autoencoder"].train, api_prefix="autoencoder_")
        with gr.Tab("Cleaner"):
            if clean:
                cleaner_panel(clean, api_prefix="cleaner_")
            else:
                gr.Markdown("Clean a dataset folder with a model trained on it: start this app with "
                            "`CLEANER_MODEL=models/bears.pkl CLEANER_DATA=data/bears python app.py`, "
                            "or run `python apps/cleaner/app.py --model models/bears.pkl --data data/bears`.")
    return demo


def main(argv=None):
    args = app_parser(__doc__).parse_args(argv)
    from imagelab.ui import launch
    launch(build(), args.host, args.port, args.mcp)


if __name__ == "__main__":
    run_cli(main)
