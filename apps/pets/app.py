"""Pet classifier: upload a photo, get the top-3 labels (cat or dog, or the 37 Oxford-IIIT Pet breeds)."""
from pathlib import Path

import gradio as gr

from imagelab.ui import app_parser, classifier_panel, launch

MODEL = Path(__file__).resolve().parents[2] / "models" / "pets.pkl"
TRAIN = "python training/train_pets.py   # offline: --data ../shared/data/catsdogs --no-pretrained"


def pets_demo(model_path=MODEL):
    with gr.Blocks(title="Pet classifier") as demo:
        gr.Markdown("# Pet classifier\nUpload a photo of a cat or a dog.")
        classifier_panel(model_path, TRAIN)
    return demo


if __name__ == "__main__":
    args = app_parser(__doc__, MODEL).parse_args()
    launch(pets_demo(args.model), args)
