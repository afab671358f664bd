"""Data cleaner: a class's images ordered by the model's loss; keep, relabel or remove each one."""
import os
from pathlib import Path

import gradio as gr

from imagelab import UserError
from imagelab.cleaner_ui import cleaner_panel
from imagelab.ui import app_parser, launch

MODEL = Path(__file__).resolve().parents[2] / "models" / "bears.pkl"

if __name__ == "__main__":
    parser = app_parser(__doc__, MODEL)
    parser.add_argument("--data", default=os.environ.get("CLEANER_DATA"), required="CLEANER_DATA" not in os.environ,
                        help="the dataset folder (one sub-folder per class) to clean; also CLEANER_DATA")
    args = parser.parse_args()
    try:
        with gr.Blocks(title="Data cleaner") as demo:
            gr.Markdown(f"# Data cleaner\n{__doc__}")
            cleaner_panel(args.model, args.data)
    except UserError as e:
        parser.exit(2, f"error: {e}\n")
    launch(demo, args)
