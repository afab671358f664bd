"""Pet classifier: fine-tune a timm model on Oxford-IIIT Pet, "is it a cat" or the 37 breeds.

    python training/train_pets.py                                 # downloads Oxford-IIIT Pet
    python training/train_pets.py --task breed --epochs 4
    python training/train_pets.py --data ../shared/data/catsdogs --preset scratch     # offline
"""
from imagelab import run_cli
from imagelab.config import ClassifierConfig, ConfigParser
from imagelab.paths import default_model


def options(argv=None):
    """The checked settings: a mistake is one line before the training stack loads (quickstart.sh checks them
    before it installs anything)."""
    parser = ConfigParser(ClassifierConfig, __doc__.splitlines()[0], out=str(default_model("pets")), task="is_cat")
    return parser.config_from(parser.parse_args(argv))


def main(argv=None):
    cfg = options(argv)
    from imagelab.classifier import Classifier
    from imagelab.train import train
    return train(Classifier(), cfg)


if __name__ == "__main__":
    run_cli(main)
