"""Autoencoder: upload a photo, see it rebuilt from a code of a few numbers, and walk between two photos' codes."""
import gradio as gr

from imagelab import run_cli
from imagelab.ui import app_parser, autoencoder_panel, default_model, launch

MODEL = default_model(__file__, "autoencoder", suffix=".pkl")
TRAIN = "python training/train_autoencoder.py   # offline: --data ../shared/data/catsdogs"


def main(argv=None):
    args = app_parser(__doc__, MODEL).parse_args(argv)
    with gr.Blocks(title="Autoencoder") as demo:
        gr.Markdown("# Autoencoder\nUpload a photo: it is squeezed into a short code and rebuilt from it.")
        autoencoder_panel(args.model, TRAIN)
    launch(demo, args)


if __name__ == "__main__":
    run_cli(main)
