"""Pet classifier: upload a photo, get the top-3 labels (cat or dog, or the 37 Oxford-IIIT Pet breeds)."""
from imagelab import run_cli
from imagelab.ui import app_parser, classifier_demo, default_model, launch

MODEL = default_model(__file__, "pets")
TRAIN = "python training/train_pets.py   # offline: --data ../shared/data/catsdogs --no-pretrained"


def main(argv=None):
    args = app_parser(__doc__, MODEL).parse_args(argv)
    launch(classifier_demo("Pet classifier", "Upload a photo of a cat or a dog.", args.model, TRAIN), args)


if __name__ == "__main__":
    run_cli(main)
