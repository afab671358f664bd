"""Pet classifier: fine-tune a timm model on Oxford-IIIT Pet, "is it a cat" or the 37 breeds.

    python training/train_pets.py                                 # downloads Oxford-IIIT Pet
    python training/train_pets.py --task breed --epochs 4
    python training/train_pets.py --data ../shared/data/catsdogs --no-pretrained   # offline
"""
from imagelab import run_cli
from imagelab.data import pets_images
from imagelab.train import classifier_parser, train_classifier


def main(argv=None):
    parser = classifier_parser(__doc__.splitlines()[0], out="models/pets.pkl")
    parser.add_argument_group("task").add_argument(
        "--task", choices=["is_cat", "breed"], default="is_cat",
        help="for Oxford-style file names: cat vs dog (upper-case first letter = cat) or the 37 breeds")
    args = parser.parse_args(argv)
    train_classifier(args, args.data or pets_images(), task=args.task)


if __name__ == "__main__":
    run_cli(main)
