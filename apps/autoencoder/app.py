"""Autoencoder: upload a photo, see it rebuilt from a code of a few numbers, and walk between two photos' codes."""
from pathlib import Path

import gradio as gr

from imagelab.ui import app_parser, autoencoder_panel, launch

MODEL = Path(__file__).resolve().parents[2] / "models" / "autoencoder.pkl"
TRAIN = "python training/train_autoencoder.py   # offline: --data ../shared/data/catsdogs"

if __name__ == "__main__":
    args = app_parser(__doc__, MODEL).parse_args()
    with gr.Blocks(title="Autoencoder") as demo:
        gr.Markdown("# Autoencoder\nUpload a photo: it is squeezed into a short code and rebuilt from it.")
        autoencoder_panel(args.model, TRAIN)
    launch(demo, args)
