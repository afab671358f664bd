"""Pet classifier: upload a photo, get the top-3 labels (cat or dog, or the 37 Oxford-IIIT Pet breeds)."""
from pathlib import Path

from imagelab.ui import app_parser, classifier_demo, launch

MODEL = Path(__file__).resolve().parents[2] / "models" / "pets.pkl"
TRAIN = "python training/train_pets.py   # offline: --data ../shared/data/catsdogs --no-pretrained"

if __name__ == "__main__":
    args = app_parser(__doc__, MODEL).parse_args()
    launch(classifier_demo("Pet classifier", "Upload a photo of a cat or a dog.", args.model, TRAIN), args)
