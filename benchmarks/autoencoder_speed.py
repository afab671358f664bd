"""The autoencoder's data paths side by side: batches cut from the images decoded in memory against the presized files.

    python benchmarks/autoencoder_speed.py --data ../shared/data/catsdogs
    python benchmarks/autoencoder_speed.py --data ../shared/data/catsdogs --device cuda --bs 64 --epochs 8

Both runs are `imagelab.train.train` of the autoencoder with the same settings and seed: `memory` with its
defaults (the store of imagelab/store.py wherever the presized images fit), `files` reading the presized
files item by item (`--workers`: the path taken when they do not fit). They train at the same time in
threads that take turns (train_speed.py's `Turns`: batch by batch on a CPU, epoch by epoch on a GPU), each
timed only while it holds its turn. The held-out MSE ratio to PCA of each says whether the paths train
alike. The last line printed is one JSON object.
"""
import json
import os
import tempfile
from functools import partial
from pathlib import Path

from imagelab import ArgumentParser, run_cli
from imagelab.config import AutoencoderConfig
from train_speed import Turns, side_by_side  # benchmarks/, the script's own folder


def parse(argv=None):
    defaults_ = AutoencoderConfig()
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", metavar="DIR", required=True, help="image folder (labels ignored)")
    p.add_argument("--size", type=int, default=defaults_.size, help="input size in pixels")
    p.add_argument("--epochs", type=int, default=2, help="epochs each data path trains")
    p.add_argument("--bs", type=int, default=defaults_.bs, help="batch size")
    p.add_argument("--code-size", type=int, default=defaults_.code_size, help="numbers in the code")
    p.add_argument("--seed", type=int, default=42, help="split and initialisation")
    p.add_argument("--device", default="auto", help="where both runs train: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", help="both runs' --precision")
    p.add_argument("--workers", type=int, default=None,
                   help="loader processes of `files` (default: the trainer's choice for the device)")
    p.add_argument("--cache", metavar="DIR", help="presized-image cache (default: the trainer's)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    from fastai.callback.progress import ProgressCallback  # the training stack: after --help, after run_cli's setup()
    from fastai.vision.all import defaults
    from imagelab.autoencoder import AutoencoderTask
    from imagelab.data import find_images, presize
    from imagelab.device import pick_device
    from imagelab.train import loader_workers, train
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        common = {"data": args.data, "size": args.size, "epochs": args.epochs, "bs": args.bs,
                  "code_size": args.code_size, "seed": args.seed, "device": args.device,
                  "precision": args.precision, "cache": args.cache}
        memory = AutoencoderConfig(**common, out=str(Path(tmp) / "memory.pkl"))
        workers = args.workers if args.workers is not None else loader_workers(memory, device)
        configs = {"memory": memory,
                   "files": AutoencoderConfig(**common, workers=workers, out=str(Path(tmp) / "files.pkl"))}
        presize(find_images(Path(args.data))[0], args.size, args.cache)  # built once, outside the timed turns
        defaults.callbacks = [cb for cb in defaults.callbacks if cb is not ProgressCallback]  # two runs, one terminal
        turns = Turns(list(configs), per="epoch" if device.type == "cuda" else "batch")
        jobs = {name: partial(train, AutoencoderTask(), cfg, cbs=[turns.callback(name, workers=name == "files")])
                for name, cfg in configs.items()}
        res, busy, load_before = side_by_side(turns, jobs, device, args.seed)
        if turns.errors:
            raise next(iter(turns.errors.values()))
    ips = {name: res[name]["images_trained"] / turns.held[name] for name in configs}
    out = {"data": str(args.data), "train_images": res["memory"]["counts"]["train"],
           "valid_images": res["memory"]["counts"]["valid"], "size": args.size, "bs": args.bs,
           "epochs": args.epochs, "code_size": args.code_size, "turns": turns.per,
           "device": res["memory"]["device"], "precision": res["memory"]["precision"], "files_workers": workers,
           "memory_images_per_s": round(ips["memory"], 2), "files_images_per_s": round(ips["files"], 2),
           "speedup": round(ips["memory"] / ips["files"], 2),
           "memory_ratio_to_pca": round(res["memory"]["mse_ratio_ae_to_pca"], 4),
           "files_ratio_to_pca": round(res["files"]["mse_ratio_ae_to_pca"], 4),
           "busy": busy,
           "memory_seconds": round(turns.held["memory"], 1), "files_seconds": round(turns.held["files"], 1),
           "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_cli(main)
