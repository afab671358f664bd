"""All the demos on one page, a tab each: `python app.py`.

Each tab's model is its environment variable (PETS_MODEL, BEARS_MODEL, AUTOENCODER_MODEL; the cleaner
tab needs CLEANER_MODEL and CLEANER_DATA) or its default in models/; PETS_FLAG_DATA and BEARS_FLAG_DATA turn
on flagging in their tab (the dataset folder that keeps the flagged images). A default model not trained yet
gets a tab that says how to train it; any other model that cannot be served stops the app with one line.
"""
import os
from pathlib import Path

from imagelab import UserError, run_cli
from imagelab.app_options import app_parser
from imagelab.paths import default_model

ROOT = Path(__file__).resolve().parent
TABS = {  # tab: (environment variable, kind, default model, how to train it)
    "Pets": ("PETS_MODEL", "classifier", default_model("pets", ROOT), "python training/train_pets.py"),
    "Bears": ("BEARS_MODEL", "classifier", default_model("bears", ROOT), "python training/train_bears.py"),
    "Autoencoder": ("AUTOENCODER_MODEL", "autoencoder", default_model("autoencoder", ROOT),
                    "python training/train_autoencoder.py"),
}


def tab_model(variable, kind, default):
    """The tab's opened model, or its default path when that model is not trained yet."""
    from imagelab.loading import open_model
    given = os.environ.get(variable)
    if given is None and not default.exists():
        return default
    return open_model(given or default, kind)


def cleaner():
    """The cleaner tab's `Cleaner`, or None when CLEANER_MODEL and CLEANER_DATA are not both set."""
    model, data = os.environ.get("CLEANER_MODEL"), os.environ.get("CLEANER_DATA")
    if bool(model) != bool(data):
        raise UserError("the cleaner tab needs both CLEANER_MODEL and CLEANER_DATA")
    from imagelab.cleaning import Cleaner
    return Cleaner(model, data) if model else None


def build():
    """The page: every model opened and checked before the first tab is drawn."""
    models = {tab: tab_model(*spec[:3]) for tab, spec in TABS.items()}
    clean = cleaner()
    import gradio as gr
    from imagelab.cleaner_ui import cleaner_panel
    from imagelab.ui import autoencoder_panel, classifier_panel
    with gr.Blocks(title="Image apps") as demo:
        gr.Markdown("# Image apps\nfastai models trained on your own machine.")
        for tab in ("Pets", "Bears"):
            with gr.Tab(tab):
                classifier_panel(models[tab], TABS[tab][3], api_name=f"{tab.lower()}_predict",
                                 flag_data=os.environ.get(f"{tab.upper()}_FLAG_DATA") or None)
        with gr.Tab("Autoencoder"):
            autoencoder_panel(models["Autoencoder"], TABS["Autoencoder"][3], api_prefix="autoencoder_")
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
    launch(build(), args)


if __name__ == "__main__":
    run_cli(main)
