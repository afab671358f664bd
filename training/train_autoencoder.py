"""Convolutional autoencoder: learn a compact code for images, scored against PCA with as many components.

    python training/train_autoencoder.py                          # downloads Oxford-IIIT Pet
    python training/train_autoencoder.py --data ../shared/data/catsdogs --epochs 3 --size 64 --code-size 64
    python training/train_autoencoder.py --data DIR --sparsity 1e-3  # the sparse variant
"""
from imagelab import run_cli
from imagelab.config import AutoencoderConfig, ConfigParser
from imagelab.paths import default_model


def main(argv=None):
    parser = ConfigParser(AutoencoderConfig, __doc__.splitlines()[0], out=str(default_model("autoencoder")))
    cfg = parser.config_from(parser.parse_args(argv))
    from imagelab.autoencoder import AutoencoderTask
    from imagelab.train import train
    return train(AutoencoderTask(), cfg)


if __name__ == "__main__":
    run_cli(main)
