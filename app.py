"""All the demos on one page, a tab each. Run `python app.py` or `gradio app.py` (auto-reload)."""
import os
from pathlib import Path

import gradio as gr

from imagelab.ui import app_parser, autoencoder_panel, classifier_panel, launch

ROOT = Path(__file__).resolve().parent
PETS_MODEL = os.environ.get("PETS_MODEL", ROOT / "models" / "pets.pkl")
AUTOENCODER_MODEL = os.environ.get("AUTOENCODER_MODEL", ROOT / "models" / "autoencoder.pkl")

with gr.Blocks(title="Image apps") as demo:
    gr.Markdown("# Image apps\nfastai models trained on your own machine.")
    with gr.Tab("Pets"):
        classifier_panel(PETS_MODEL, "python training/train_pets.py", api_name="pets_predict")
    with gr.Tab("Autoencoder"):
        autoencoder_panel(AUTOENCODER_MODEL, "python training/train_autoencoder.py", api_prefix="autoencoder_")

if __name__ == "__main__":
    args = app_parser(__doc__).parse_args()
    launch(demo, args)
