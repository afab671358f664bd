"""Bear classifier: upload a photo, get the top-3 labels (grizzly, black or teddy bear)."""
from imagelab import run_cli
from imagelab.ui import app_parser, classifier_demo, default_model, launch

MODEL = default_model(__file__, "bears")
TRAIN = "python training/train_bears.py   # offline: --data ../shared/data/bears --no-pretrained"


def main(argv=None):
    args = app_parser(__doc__, MODEL).parse_args(argv)
    launch(classifier_demo("Bear classifier", "Upload a photo of a grizzly, a black bear or a teddy bear.",
                           args.model, TRAIN), args)


if __name__ == "__main__":
    run_cli(main)
