"""The CPU's work for each training batch before the model sees it, side by side: how the trainer does it now
against how fastai (or the trainer before) did it.

    python benchmarks/batch_overhead.py                       # generated images, 16 px, batches of 64, this CPU
    python benchmarks/batch_overhead.py --device cuda --size 224

On a GPU the model's step takes a few milliseconds and the CPU's part of a batch is what limits training:
every PyTorch operation costs the CPU the same whatever the image size, and fastai's tensor types add
Python to each. At a tiny size on a CPU the computing is negligible, so what is left is that part. Two
pairs, each in interleaved turns: cutting a batch from the decoded images image by image (as on a CPU)
or in one batched cut (as on a GPU), and fastai's `aug_transforms` pipeline as fastai ships it or as
imagelab/augment.py runs it (the same draws). Each row: milliseconds per batch (the best of the turns)
and the PyTorch operations dispatched per batch. The last line printed is one JSON object.
"""
import json
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from imagelab import ArgumentParser, run_cli

from device_check import make_images

# torch and fastai are imported where they are used: --help answers at once, and run_cli's setup() (OpenMP's
# wait policy, read once) comes before PyTorch loads.


def parse(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", metavar="DIR", help="image folder (default: generated images)")
    p.add_argument("--size", type=int, default=16, help="batch image size; tiny leaves the CPU's per-operation work")
    p.add_argument("--bs", type=int, default=64, help="batch size")
    p.add_argument("--turns", type=int, default=5, help="times each way is timed, taking turns")
    p.add_argument("--reps", type=int, default=20, help="batches timed per turn")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N, mps")
    return p.parse_args(argv)


def count_ops(setting, fn):
    """The PyTorch operations that one call of `fn` dispatches, in `setting`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    with setting(), Ops() as counted:
        fn()
    return counted.count


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    args = parse(argv)
    import torch
    from fastai.vision.all import IntToFloatTensor, Normalize, Pipeline, TensorImage, aug_transforms, imagenet_stats
    from imagelab.augment import fastais_own, faster_augmentation
    from imagelab.data import find_images, presize
    from imagelab.device import pick_device
    from imagelab.store import ImageStore, crop_box, pixels, resized
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else make_images(Path(tmp) / "data", args.bs)
        files = find_images(data)[0][:4 * args.bs]
        copies = presize(files, args.size, Path(tmp) / "cache")
        store = ImageStore([copies[f] for f in files], device)
    size = (args.size, args.size)
    rng = random.Random(0)
    boxes = [(i, *crop_box(*store.shapes[i][::-1], 0.35, (3 / 4, 4 / 3), rng)) for i in range(args.bs)]
    batch = TensorImage(pixels(store.cut(boxes, size, (0, 0), size)))
    normalize = Normalize.from_stats(*imagenet_stats, cuda=False)
    normalize.mean, normalize.std = normalize.mean.to(device), normalize.std.to(device)
    aug = Pipeline([IntToFloatTensor(), *aug_transforms(), normalize])
    aug.split_idx = 0
    runs = {  # name: (the setting it runs in, one batch)
        "cut_per_image": (nullcontext, lambda: pixels(torch.cat([resized(store.image(i)[:, t:t + h, l:l + w], size)
                                                                 for i, l, t, w, h in boxes]))),
        "cut_batched": (nullcontext, lambda: pixels(store.cut(boxes, size, (0, 0), size))),
        "augment_fastai": (fastais_own, lambda: aug(batch)),
        "augment_ours": (faster_augmentation, lambda: aug(batch)),
    }
    ms = {name: [] for name in runs}
    for _ in range(args.turns):
        for name, (setting, fn) in runs.items():
            with setting():
                fn()
                sync(device)
                start = time.perf_counter()
                for _ in range(args.reps):
                    fn()
                sync(device)
            ms[name].append((time.perf_counter() - start) / args.reps * 1000)
    ops = {name: count_ops(setting, fn) for name, (setting, fn) in runs.items()}
    best = {name: min(v) for name, v in ms.items()}
    out = {"device": str(device), "size": args.size, "bs": args.bs,
           "ms_per_batch": {name: round(v, 2) for name, v in best.items()}, "ops_per_batch": ops,
           "cut_speedup": round(best["cut_per_image"] / best["cut_batched"], 2),
           "augment_speedup": round(best["augment_fastai"] / best["augment_ours"], 2)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_cli(main)
