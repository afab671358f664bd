"""All the demos on one page, a tab each. Run `python app.py` or `gradio app.py` (auto-reload)."""
import os
from pathlib import Path

import gradio as gr

from imagelab import UserError
from imagelab.cleaner_ui import cleaner_panel
from imagelab.ui import app_parser, autoencoder_panel, classifier_panel, launch

ROOT = Path(__file__).resolve().parent
PETS_MODEL = os.environ.get("PETS_MODEL", ROOT / "models" / "pets.pkl")
BEARS_MODEL = os.environ.get("BEARS_MODEL", ROOT / "models" / "bears.pkl")
AUTOENCODER_MODEL = os.environ.get("AUTOENCODER_MODEL", ROOT / "models" / "autoencoder.pkl")
CLEANER_MODEL, CLEANER_DATA = os.environ.get("CLEANER_MODEL"), os.environ.get("CLEANER_DATA")

with gr.Blocks(title="Image apps") as demo:
    gr.Markdown("# Image apps\nfastai models trained on your own machine.")
    with gr.Tab("Pets"):
        classifier_panel(PETS_MODEL, "python training/train_pets.py", api_name="pets_predict")
    with gr.Tab("Bears"):
        classifier_panel(BEARS_MODEL, "python training/train_bears.py", api_name="bears_predict")
    with gr.Tab("Autoencoder"):
        autoencoder_panel(AUTOENCODER_MODEL, "python training/train_autoencoder.py", api_prefix="autoencoder_")
    with gr.Tab("Cleaner"):
        if CLEANER_MODEL and CLEANER_DATA:
            try:
                cleaner_panel(CLEANER_MODEL, CLEANER_DATA, api_prefix="cleaner_")
            except UserError as e:  # e.g. CLEANER_DATA is not a folder: said in the tab, the other tabs still serve
                gr.Markdown(f"**Cleaner: {e}**")
        else:
            gr.Markdown("Clean a dataset folder with a model trained on it: start this app with "
                        "`CLEANER_MODEL=models/bears.pkl CLEANER_DATA=data/bears python app.py`, "
                        "or run `python apps/cleaner/app.py --model models/bears.pkl --data data/bears`.")

if __name__ == "__main__":
    args = app_parser(__doc__).parse_args()
    launch(demo, args)
