"""Bear classifier: upload a photo, get the top-3 labels (grizzly, black or teddy bear)."""
from pathlib import Path

from imagelab.ui import app_parser, classifier_demo, launch

MODEL = Path(__file__).resolve().parents[2] / "models" / "bears.pkl"
TRAIN = "python training/train_bears.py   # offline: --data ../shared/data/bears --no-pretrained"

if __name__ == "__main__":
    args = app_parser(__doc__, MODEL).parse_args()
    launch(classifier_demo("Bear classifier", "Upload a photo of a grizzly, a black bear or a teddy bear.",
                           args.model, TRAIN), args)
