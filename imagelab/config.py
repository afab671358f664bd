"""Typed training configurations, and the command line that fills them.

Each field is one knob: its default, its help and its option group live on the field, so a script's
`--help` reads like a table of the knobs and the library is called with keyword arguments:

    ClassifierConfig(data="photos", arch="resnet18", pretrained=False, epochs=4)

Standard library only: `--help` answers at once and the environment is set before torch loads.
"""
import argparse
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from . import ArgumentParser, UserError, require
from .paths import cache_folder, checkpoint_path, existing_folder, nothing_to_resume, writable_model_path


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_device_name(name):
    """One line unless `name` is a `--device` this project trains on (whether the machine has it is imagelab.device's
    question, which needs torch)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps")


def check_precision_name(name):
    if name not in PRECISIONS:
        raise UserError(f"unknown --precision {name!r}: use {', '.join(PRECISIONS)}")


def parse_lr(text):
    """--lr: a number, or 'find' for fastai's learning-rate finder."""
    if text == "find":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'find', not {text!r}") from None


MAX_WIDTH = 512  # the autoencoder's channels stop doubling here, so deep models stay a sensible size
# Pixels a side: photos are presized to 1.5 times this, and a batch of larger inputs fills any machine's memory.
MAX_SIZE = 2048
MAX_BLOCKS = 16  # the autoencoder's residual blocks a level: far past where more stopped helping (benchmarks)


def knob(default, group, help, resume=True, **option):
    """A config field and its command-line option. `resume`: whether a checkpoint made with another value
    must be refused (anything that changes the data, the model or the schedule). `option` goes to argparse."""
    return field(default=default, metadata={"group": group, "help": help, "resume": resume, "option": option})


@dataclass
class TrainConfig:
    """The knobs of the training loop that every kind of model shares."""
    PRESETS: ClassVar[dict] = {}
    # Whether early epochs may train on smaller inputs: not for a model whose layers are sized for --size.
    PROGRESSIVE: ClassVar[bool] = True

    data: str | None = knob(None, "data", "local image folder; skips the download", metavar="DIR")
    valid_pct: float = knob(0.2, "data", "share of images held out for validation")
    seed: int = knob(42, "data", "seed of the split, the augmentation and the initialisation")
    flagged: bool = knob(False, "data", "also train on the images the apps' visitors flagged, kept in "
                         "DIR/flagged/<class>/ (apps' --flag-data DIR)")
    epochs: int = knob(3, "training", "epochs (with --time-budget: at most)")
    size: int = knob(224, "training", "square input size in pixels")
    start_size: int | None = knob(None, "training", "progressive resizing: the first half of each fit of 2+ epochs "
                                  "trains on inputs growing from PX to --size (default: half of --size from scratch "
                                  "where the model allows, --size when fine-tuning; equal to --size turns it off)", metavar="PX")
    bs: int = knob(32, "training", "batch size")
    lr: float | str | None = knob(None, "training", "learning rate, or 'find' for fastai's lr_find (default: the "
                                  "model's own)", type=parse_lr)
    wd: float | None = knob(None, "training", "decoupled weight decay (default: fastai's, 0.01)")
    workers: int | None = knob(None, "training", "read the images from files with this many loader processes "
                               "(default: with --presize, batches are cut from the images decoded in memory when "
                               "they fit; else files, with none on a CPU, or one a core with --no-presize; up to 8 "
                               "on a GPU)", resume=False)
    presize: bool = knob(True, "training", "decode and shrink every image once into a cache, then train from the "
                         "small copies", resume=False)
    cache: str | None = knob(None, "training", f"folder of presized copies and look-alike fingerprints (default: "
                             f"$IMAGELAB_CACHE or {cache_folder()})", resume=False, metavar="DIR")
    device: str = knob("auto", "hardware", "where to train: auto (a CUDA GPU, else Apple's MPS, else the CPU), "
                       "cpu, cuda, cuda:N or mps", resume=False)
    precision: str = knob("auto", "hardware", "auto: bf16 autocast on GPUs that have it, fp16 with loss scaling on "
                          "older ones, fp32 on CPUs and MPS (bf16 on a CPU that computes it natively, AVX512-BF16 or "
                          "AMX, is yours to ask for); exports are fp32 whatever trained", resume=False,
                          choices=PRECISIONS)
    time_budget: float | None = knob(None, "training", "train for this long or --epochs, whichever ends "
                                     "first: the one-cycle schedule follows the nearer end", metavar="SECONDS")
    keep: str = knob("best", "training", "which weights to export: those of the epoch with the lowest validation "
                     "loss, or the last", resume=False, choices=["best", "last"])
    patience: int | None = knob(None, "training", "early stopping: end training after this many epochs without a "
                                "lower validation loss", metavar="EPOCHS")
    resume: bool = knob(False, "training", "continue the interrupted run whose checkpoint (<out stem>.ckpt) is "
                        "beside --out", resume=False)
    checkpoint_every: float = knob(60.0, "training", "save the checkpoint after an epoch once this long has passed "
                                   "since the last save, and after a fit's last epoch (0: after every epoch)",
                                   resume=False, metavar="SECONDS")
    out: str = knob("models/model.pkl", "output", "exported learner; its report goes in <out stem>.report/",
                    resume=False)

    def check(self):
        """One line for the first setting that cannot work (cheap checks: scripts call it before torch loads)."""
        require([
            ("--epochs", self.epochs, self.epochs >= 1, "at least 1"),
            ("--size", self.size, 8 <= self.size <= MAX_SIZE, f"between 8 and {MAX_SIZE}"),
            ("--seed", self.seed, 0 <= self.seed < 2**32, "between 0 and 2**32 - 1 (NumPy's range)"),
            ("--valid-pct", self.valid_pct, 0 < self.valid_pct < 1, "more than 0 and less than 1"),
            ("--bs", self.bs, self.bs >= 2, "at least 2 (batch norm learns from a batch's own statistics)"),
            ("--start-size", self.start_size, self.start_size is None or 8 <= self.start_size <= self.size,
             f"between 8 and --size ({self.size})"),
            ("--lr", self.lr, self.lr in (None, "find") or 0 < self.lr < math.inf, "more than 0 (or find)"),
            ("--wd", self.wd, self.wd is None or 0 <= self.wd < math.inf, "0 or more"),
            ("--workers", self.workers, self.workers is None or self.workers >= 0, "0 or more"),
            ("--time-budget", self.time_budget, self.time_budget is None or self.time_budget > 0, "more than 0"),
            ("--patience", self.patience, self.patience is None or self.patience >= 1, "at least 1"),
            ("--checkpoint-every", self.checkpoint_every, self.checkpoint_every >= 0, "0 or more"),
        ])
        if self.start_size is not None and self.start_size < self.size and not self.PROGRESSIVE:
            raise UserError(f"this model trains at one size (its layers are sized for --size): drop --start-size "
                            f"or set it to --size ({self.size})")
        check_device_name(self.device)
        check_precision_name(self.precision)
        if self.data is not None:
            existing_folder(self.data)
        writable_model_path(self.out)
        if self.data is not None and Path(self.out).resolve().is_relative_to(Path(self.data).resolve()):
            raise UserError(f"--out {self.out} is inside --data {self.data}: the next run would train on its report's "
                            "plots and example images; write the model outside the dataset folder")
        if self.lr == "find" and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # each process would find its own
            raise UserError("--lr find runs in one process: run it once without the launcher (with --epochs 1, say), "
                            "then launch with the rate it prints")
        if self.resume and not checkpoint_path(self.out).exists():
            raise nothing_to_resume(checkpoint_path(self.out))

    def first_size(self):
        """Progressive resizing's first input size: --start-size, else half of --size where the model allows."""
        if self.start_size is not None:
            return self.start_size
        return self.size // 2 if self.PROGRESSIVE else self.size

    def settings(self):
        """What a checkpoint must have been made with to be resumed."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["resume"]}

    def record(self):
        """The settings as they go into metrics.json (paths as given)."""
        # the run records the device and precision it chose; the rest changes nothing in the model
        left_out = ("resume", "checkpoint_every", "workers", "cache", "out", "device", "precision")
        return {k: v for k, v in asdict(self).items() if k not in left_out}


@dataclass
class ClassifierConfig(TrainConfig):
    """An image classifier: a timm backbone, fine-tuned or trained from scratch."""
    PRESETS: ClassVar[dict] = {
        # small offline datasets, no pretrained weights: small inputs and many epochs beat few epochs at full size,
        # and a small ResNet's extra epochs beat resnet18 in the same time (benchmarks/README.md: ablation)
        "scratch": {"pretrained": False, "arch": "resnet10t", "size": 64, "bs": 64, "epochs": 40,
                    "label_smoothing": 0.1},
    }

    labels: str | None = knob(None, "data", "how DIR is labelled (default: detected)", choices=["folder", "filename"])
    task: str = knob("breed", "data", "for Oxford-style file names (Abyssinian_12.jpg): cat vs dog (upper-case "
                     "first letter = cat) or the 37 breeds", choices=["is_cat", "breed"])
    arch: str = knob("convnext_nano", "model", "any timm model name")
    pretrained: bool = knob(True, "model", "start from ImageNet weights from the Hub (fine_tune) or from scratch "
                            "(one-cycle)")
    min_scale: float = knob(0.35, "training", "RandomResizedCrop's smallest crop area")
    label_smoothing: float = knob(0.0, "training", "label smoothing of the loss")
    mix: str = knob("none", "training", "mix pairs of training images (fastai's callbacks): MixUp blends two "
                    "images and their labels, CutMix pastes a patch of one into the other",
                    choices=["none", "mixup", "cutmix"])

    def check(self):
        super().check()
        require([("--min-scale", self.min_scale, 0 < self.min_scale <= 1, "more than 0 and at most 1"),
                 ("--label-smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1,
                  "at least 0 and less than 1")])

    def first_size(self):
        # Fine-tuning trains at --size throughout: ImageNet weights are tuned to its resolution, and there smaller
        # inputs can cost accuracy (fastai's book, chapter 7); from scratch they buy epochs (benchmarks/README.md)
        if self.start_size is None and self.pretrained:
            return self.size
        return super().first_size()


@dataclass
class AutoencoderConfig(TrainConfig):
    """An autoencoder that starts as PCA and learns what PCA misses, scored against PCA with as many components."""
    PRESETS: ClassVar[dict] = {
        # longer training than the default (only --epochs changes): still minutes on a CPU
        "long": {"epochs": 12},
    }
    PROGRESSIVE: ClassVar[bool] = False  # the code's linear layers are sized for --size

    size: int = knob(64, "training", "square input size in pixels")
    # Small batches: the model needs steps more than big ones (benchmarks/README.md, "Autoencoder against PCA").
    bs: int = knob(8, "training", "batch size")
    code_size: int = knob(64, "model", "numbers in the code (the bottleneck); PCA gets as many components")
    depth: int = knob(2, "model", "stride-2 blocks in the encoder (upsampling blocks in the decoder)")
    width: int = knob(32, "model", f"channels of the first block, doubling each block up to {MAX_WIDTH}")
    blocks: int = knob(1, "model", "residual blocks at each level of the encoder and decoder")
    loss: str = knob("mse", "model", "reconstruction loss", choices=["l1", "mse"])
    sparsity: float = knob(0.0, "model", "L1 penalty on the code (sparse autoencoder; the code goes through a learned "
                           "soft threshold)", metavar="LAMBDA")

    def check(self):
        super().check()
        check_autoencoder_shape(self.size, self.code_size, self.depth, self.width, self.blocks)
        # a new model's rule, not the shape check's: models trained wider before it still load
        require([("--sparsity", self.sparsity, 0 <= self.sparsity < math.inf, "0 or more"),
                 ("--width", self.width, self.width <= MAX_WIDTH, f"at most {MAX_WIDTH} (where the channels stop "
                                                                   "doubling: wider builds the same model)")])


def check_autoencoder_shape(size, code_size, depth, width, blocks):
    """One line if imagelab.autoencoder.ConvAutoencoder cannot be built with these numbers."""
    pixels = 3 * size * size
    require([
        # a code as long as the image compresses nothing, and its layers would take memory by the gigabyte
        ("--code-size", code_size, 1 <= code_size < pixels, f"at least 1 and less than the image's {pixels:,} "
                                                            f"numbers (3 x --size {size} squared)"),
        ("--depth", depth, depth >= 1, "at least 1"),
        ("--width", width, width >= 1, "at least 1"),
        ("--blocks", blocks, 0 <= blocks <= MAX_BLOCKS, f"between 0 and {MAX_BLOCKS}"),
    ])
    if size % 2 ** depth:
        raise UserError(f"--size {size} must be divisible by 2**depth = {2 ** depth} (each of the --depth {depth} "
                        "blocks halves the image)")


def add_option(group, f):
    flag = "--" + f.name.replace("_", "-")
    kwargs = {"default": f.default, "help": f.metadata["help"], **f.metadata["option"]}
    if f.type is bool:
        kwargs["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
    elif f.type in (int, float, int | None, float | None) and "type" not in kwargs:
        kwargs["type"] = float if float in getattr(f.type, "__args__", (f.type,)) else int
    group.add_argument(flag, **kwargs)


def as_options(values):
    """{"pretrained": False, "size": 64} -> '--no-pretrained --size 64'."""
    def one(name, value):
        flag = name.replace("_", "-")
        return (f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag} {value}"
    return " ".join(one(k, v) for k, v in values.items())


class ConfigParser(ArgumentParser):
    """The options of a config class in groups; `--preset NAME` sets defaults that the options given override."""

    def __init__(self, config, description, **defaults):
        super().__init__(description=description)
        self.config = config
        if config.PRESETS:
            self.add_argument("--preset", choices=list(config.PRESETS), help="defaults for a kind of run, which "
                              "the options given override: " + "; ".join(
                                  f"{name} = {as_options(values)}" for name, values in config.PRESETS.items()))
        groups = {}
        for f in fields(config):
            if f.metadata["group"] not in groups:
                groups[f.metadata["group"]] = self.add_argument_group(f.metadata["group"])
            add_option(groups[f.metadata["group"]], f)
        self.set_defaults(**defaults)

    def parse_known_args(self, args=None, namespace=None):
        if self.config.PRESETS:
            pre = ArgumentParser(add_help=False)
            pre.add_argument("--preset", choices=self.config.PRESETS)
            preset = pre.parse_known_args(args)[0].preset
            if preset:
                self.set_defaults(**self.config.PRESETS[preset])
        return super().parse_known_args(args, namespace)

    def config_from(self, args):
        """The checked config of a parsed namespace (options a script added itself stay in the namespace): a
        setting that cannot work, or a missing folder, answers at once, before the training stack loads."""
        cfg = self.config(**{f.name: getattr(args, f.name) for f in fields(self.config)})
        cfg.check()
        return cfg

