"""Training speed and accuracy: the fastai course recipe against this project's trainer, on the same data.

    python benchmarks/train_speed.py --data ../shared/data/catsdogs
    python benchmarks/train_speed.py --data DIR --size 224 --epochs 3 --arch resnet34
    python benchmarks/train_speed.py --data ../shared/data/catsdogs --device cuda --size 224 --bs 64 --epochs 8

Every run gets the same decodable images, the same train/valid split, architecture, input size,
batch size, epochs, learning rate and seed. The course recipe is `ImageDataLoaders.from_folder` +
`RandomResizedCrop(size, min_scale=0.3)` + `aug_transforms()` + `vision_learner` + `fit_one_cycle`;
ours is `imagelab.train.train` of the classifier with its defaults (progressive resizing included, and
batches cut from the images decoded in memory), `fixed` is the same trainer at the full size throughout
(`--start-size` = `--size`), to show what progressive resizing adds, and `files` is ours reading the
presized files batch by batch (`--workers`: the path taken when the images do not fit in memory). When
ours trains in mixed precision (`--precision`; auto picks it where the device computes bf16 natively), `fp32`
is the same trainer in fp32, to show what the precision adds and whether it costs accuracy. The
runs train at the same time in threads that take turns batch by batch (epoch by epoch on a GPU: `Turns`
says why), so a busy machine slows them alike, and each is timed only while it holds its turn (the
recipe's loader processes are paused outside its turns); each thread augments as its own run does, the recipe
with fastai's as it ships (imagelab/augment.py). Our held-out accuracy is measured by the
exported pipeline on the original files, as the app sees them. Then the `scratch` preset trains for
as long as the recipe took. The last line printed is one JSON object; "busy" is the share of each run's
turns that the device computed (the GPU's utilisation, or the CPU time over the cores). On a GPU, one untimed
step at every input size the runs train at comes first: CUDA's and cuDNN's one-time set-up (libraries, kernels, a
plan per shape) would otherwise fall in whichever run trains first. Each run's timing starts once every run is
ready to train. A run that fails leaves the others' numbers: the JSON line is printed with `errors`, then the
first failure is raised.
"""
import argparse
import json
import os
import random
import signal
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import psutil
from PIL import Image

from imagelab import ArgumentParser, UserError, run_cli, standard_error
from imagelab.config import ClassifierConfig

# torch and fastai are imported where they are used: --help answers at once, and run_cli's setup() (OpenMP's
# wait policy, read once) comes before PyTorch loads.

EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def parse(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", metavar="DIR", required=True, help="image folder, one sub-folder per class")
    p.add_argument("--arch", default="resnet18", help="timm architecture for both runs")
    p.add_argument("--size", type=int, default=128, help="input size in pixels")
    p.add_argument("--epochs", type=int, default=4, help="both runs; from scratch, fewer leave accuracies mostly noise")
    p.add_argument("--bs", type=int, default=32, help="batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="one-cycle peak learning rate for both runs")
    p.add_argument("--min-scale", type=float, default=0.3, help="RandomResizedCrop's smallest crop area, both runs")
    p.add_argument("--valid-pct", type=float, default=0.2, help="share held out")
    p.add_argument("--seed", type=int, default=42, help="split, augmentation and initialisation")
    p.add_argument("--device", default="auto", help="where every run trains: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", help="our trainer's --precision (the recipe trains in fp32, "
                   "as the course does)")
    p.add_argument("--workers", type=int, default=None, help="loader processes of the file path (the recipe's "
                   "and `files`; default: fastai's for the recipe, the trainer's choice for `files`)")
    p.add_argument("--preset", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the scratch preset for as long as the recipe took")
    p.add_argument("--cache", metavar="DIR", help="presized-image cache (default: the trainer's)")
    p.add_argument("--workdir", metavar="DIR", help="where the split and the models go (default: a temporary folder)")
    return p.parse_args(argv)


def split_folder(data, dest, valid_pct, seed):
    """The decodable images of `data` as links in `dest/{train,valid}/<class>/`, a seeded random split.

    The links carry the extension of their real format, so fastai's `get_image_files` (which goes by
    extension) and our trainer (which goes by content) see exactly the same images.
    """
    from imagelab.data import detect_labels, find_images, parent_label
    files, _ = find_images(data)
    if detect_labels(data, files) != "folder":
        raise UserError(f"{data}: the benchmark needs one sub-folder per class")
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    n_valid = round(len(files) * valid_pct)
    for rank, i in enumerate(order):
        with Image.open(files[i]) as im:
            ext = EXTENSIONS.get(im.format, ".jpg")
        link = dest / ("valid" if rank < n_valid else "train") / parent_label(files[i]) / f"{i:06d}{ext}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(files[i].resolve())
    return len(files) - n_valid, n_valid


class Turns:
    """Runs in threads that take turns batch by batch, or epoch by epoch; each run's clock only runs while it
    holds the turn.

    Batch by batch, a machine that other jobs share slows every run alike. On a GPU, epoch by epoch: a turn
    ends by waiting for the GPU to finish the run's queued work, and that wait after every batch would stop
    each run's CPU from preparing its next batch while the GPU computes, which a run on its own does.
    """

    def __init__(self, names, per="batch"):
        self.cond, self.names, self.active, self.ready = threading.Condition(), list(names), set(names), set()
        self.turn, self.held, self.per, self.errors = self.names[0], dict.fromkeys(names, 0.0), per, {}

    def wait_for_all(self, name):
        """Wait until every run still going is ready to train: one run's set-up (decoding its images, say) must not
        share the machine with another's timed turn."""
        with self.cond:
            self.ready.add(name)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.active <= self.ready)

    def take(self, name):
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)
        self.since = time.perf_counter()

    def give(self, name, done=False, timed=True):
        import torch
        if torch.cuda.is_available():  # a run's queued GPU work is its own time, not the next run's
            torch.cuda.synchronize()
        if timed:
            self.held[name] += time.perf_counter() - self.since
        with self.cond:
            if done:
                self.active.discard(name)
            waiting = [n for n in self.names if n in self.active and n != name]
            i = self.names.index(name)
            later = [n for n in self.names[i + 1:] + self.names[:i] if n in waiting]
            self.turn = later[0] if later else name
            self.cond.notify_all()

    def callback(self, name, workers=False):
        """The callback that makes a run take turns; `workers`: this run's loader processes pause between turns.

        The recipe's loader processes would otherwise go on decoding while the other run holds the turn,
        taking its cores and saving the recipe time: each run gets the machine only during its turns.
        """
        from fastai.callback.core import Callback
        turns = self

        def signal_workers(sig):
            me = psutil.Process()
            for child in me.children() if workers else []:  # our trainer starts no processes
                try:
                    if child.cmdline() == me.cmdline():  # forked loader processes, not multiprocessing's helpers
                        child.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass

        def pass_turn():
            signal_workers(signal.SIGSTOP)
            turns.give(name)
            turns.take(name)
            signal_workers(signal.SIGCONT)

        class TakeTurns(Callback):
            order = 100  # after every other callback of the batch (or the epoch) has run

            def before_fit(self):
                turns.wait_for_all(name)
                turns.take(name)

            def after_batch(self):
                if turns.per == "batch":
                    pass_turn()

            def after_epoch(self):
                if turns.per == "epoch":
                    pass_turn()

            def after_fit(self):
                # The report and the export run in turn too, untimed: PyTorch's ONNX export is not thread-safe.
                turns.give(name)
                turns.take(name)
        return TakeTurns()

    def run(self, jobs):
        """Run {name: function} in threads: {name: result} of the runs that finished. A failed run gives up its turns
        so the others can finish; its exception is in `errors`."""
        results = {}

        def work(name, fn):
            try:
                results[name] = fn()
                self.give(name, done=True, timed=False)
            except BaseException as e:  # reported after every thread ends
                self.errors[name] = e
                with self.cond:
                    self.active.discard(name)
                    if self.turn == name:
                        self.turn = next(iter(self.active), name)
                    self.cond.notify_all()
        threads = [threading.Thread(target=work, args=(n, fn)) for n, fn in jobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


def course_recipe(split, args, device, cbs):
    """The fastai course's recipe, as in the book and the course notebooks (from scratch: no weights offline)."""
    from fastai.vision.all import ImageDataLoaders, RandomResizedCrop, accuracy, aug_transforms, vision_learner
    workers = {} if args.workers is None else {"num_workers": args.workers}
    dls = ImageDataLoaders.from_folder(split, train="train", valid="valid", seed=args.seed, bs=args.bs,
                                       item_tfms=RandomResizedCrop(args.size, min_scale=args.min_scale),
                                       batch_tfms=aug_transforms(), device=device, **workers)
    learn = vision_learner(dls, args.arch, pretrained=False, metrics=accuracy)
    learn.fit_one_cycle(args.epochs, args.lr, cbs=cbs)
    # in this process, no more forking once the turns are over (the other thread may be busy)
    return {"accuracy": float(learn.validate(dl=dls.valid.new(num_workers=0))[1]), "train_images": len(dls.train_ds)}


def trainer_config(args, workdir, name, **settings):
    return ClassifierConfig(**{"data": str(workdir / "split"), "arch": args.arch, "seed": args.seed,
                               "pretrained": False, "cache": args.cache, "out": str(workdir / f"{name}.pkl"),
                               "device": args.device, "precision": args.precision, **settings})


class Busy(threading.Thread):
    """Samples how busy the device is, several times a second, and files each sample under the run whose turn it is."""

    def __init__(self, turns, device):
        super().__init__(daemon=True)
        self.turns, self.device, self.samples, self.done = turns, device, {}, threading.Event()
        self.process = psutil.Process()
        self.process.cpu_percent()

    def sample(self):
        import torch
        if self.device.type == "cuda":
            try:
                return torch.cuda.utilization(self.device) / 100
            except Exception:  # no NVML on this machine
                return None
        return self.process.cpu_percent() / 100 / (psutil.cpu_count() or 1)

    def run(self):
        while not self.done.wait(0.2):
            value = self.sample()
            if value is not None:
                self.samples.setdefault(self.turns.turn, []).append(value)

    def share(self, name):
        values = self.samples.get(name)
        return round(sum(values) / len(values), 3) if values else None


def warm_up(arch, sizes, bs, precision, device, seed):
    """One training step of `arch` at each of `sizes`, in fp32 and in `precision`, channels-last (our trainer) and
    not (the recipe), and one validation batch: what CUDA and cuDNN set up once per process and shape."""
    import torch
    from fastai.torch_core import set_seed
    from fastai.vision.learner import create_timm_model
    set_seed(seed, reproducible=True)  # cuDNN's plans depend on its deterministic setting: the runs'
    model = create_timm_model(arch, 2, pretrained=False)[0].to(device)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for layout in (torch.channels_last, torch.contiguous_format):
        model.to(memory_format=layout)
        for size in sorted(sizes):
            x = torch.rand(bs, 3, size, size, device=device).contiguous(memory_format=layout)
            for dtype in {mixed, None}:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = model(x).float().logsumexp(1).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
            with torch.no_grad():
                model.eval()(x)
            model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(turns, jobs, device, seed):
    """Run {name: function} in `turns` from one seed, sampling how busy the device is: (results, each run's busy
    share, the load average before)."""
    from fastai.torch_core import set_seed
    load_before = os.getloadavg()[0]
    busy = Busy(turns, device)
    busy.start()
    set_seed(seed, reproducible=True)
    res = turns.run(jobs)
    busy.done.set()
    return res, {name: busy.share(name) for name in turns.names}, load_before


def main(argv=None):
    args = parse(argv)
    from fastai.callback.progress import ProgressCallback
    from fastai.vision.all import defaults
    from imagelab.callbacks import progressive_size
    from imagelab.classifier import Classifier
    from imagelab.data import find_images, presize
    from imagelab.device import pick_device, pick_precision
    from imagelab.train import loader_workers, train
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        split = workdir / "split"
        n_train, n_valid = split_folder(Path(args.data), split, args.valid_pct, args.seed)
        print(f"{n_train} training and {n_valid} held-out images in {split}")
        defaults.callbacks = [cb for cb in defaults.callbacks if cb is not ProgressCallback]  # two runs, one terminal

        common = {"size": args.size, "epochs": args.epochs, "bs": args.bs, "lr": args.lr, "min_scale": args.min_scale}
        ours = trainer_config(args, workdir, "ours", **common)
        # The trainer without progressive resizing: what the rest of the trainer gains at one size throughout.
        fixed = trainer_config(args, workdir, "fixed", **common, start_size=args.size)
        # The file path: what the trainer does when the decoded images would not fit in memory.
        files = trainer_config(args, workdir, "files", **common, workers=args.workers if args.workers is not None
                               else loader_workers(ours, device))
        configs = {"ours": ours, "fixed": fixed, "files": files}
        if precision != "fp32":  # the same trainer without mixed precision: what the precision adds
            configs["fp32"] = trainer_config(args, workdir, "fp32", **common, precision="fp32")
        start = time.perf_counter()
        presize(find_images(split)[0], args.size, args.cache)  # built once per dataset and size, then reused
        cache_seconds = time.perf_counter() - start
        if device.type == "cuda":
            sizes = {progressive_size(e / args.epochs, args.epochs, ours.first_size(), args.size)
                     for e in range(args.epochs)}
            warm_up(args.arch, sizes | {args.size}, args.bs, precision, device, args.seed)

        # Ours takes the first turn: the recipe forks its loader processes only while our threads wait,
        # never while it imports or holds a lock that a forked child would inherit locked.
        turns = Turns(["ours", "recipe", *(n for n in configs if n != "ours")], per="epoch" if device.type == "cuda" else "batch")
        jobs = {name: partial(train, Classifier(), cfg, cbs=[turns.callback(name, workers=name == "files")])
                for name, cfg in configs.items()}
        jobs["recipe"] = lambda: course_recipe(split, args, device, [turns.callback("recipe", workers=True)])
        res, busy, load_before = side_by_side(turns, jobs, device, args.seed)
        images = res["recipe"]["train_images"] if "recipe" in res else n_train
        ips = {name: images * args.epochs / turns.held[name] for name in res}
        out = {"data": str(args.data), "train_images": n_train, "valid_images": n_valid, "arch": args.arch,
               "size": args.size, "ours_start_size": ours.first_size(), "epochs": args.epochs,
               "bs": args.bs, "turns": turns.per, "lr": args.lr, "device": str(device), "precision": precision,
               "recipe_precision": "fp32"}
        key = {"recipe": "recipe", "ours": "ours", "fixed": "fixed_size", "files": "files", "fp32": "fp32"}
        for name in turns.names:
            if name in res:
                out.update({f"{key[name]}_images_per_s": round(ips[name], 2),
                            f"{key[name]}_accuracy": round(res[name]["accuracy"], 4),
                            f"{key[name]}_seconds": round(turns.held[name], 1)})
        for speedup, (a, b) in {"speedup": ("ours", "recipe"), "fixed_size_speedup": ("fixed", "recipe"),
                                "files_speedup": ("files", "recipe"), "precision_speedup": ("ours", "fp32")}.items():
            if a in ips and b in ips:
                out[speedup] = round(ips[a] / ips[b], 2)
        if "recipe" in res:  # one standard error of an accuracy near the recipe's on this many held-out images
            out["accuracy_standard_error"] = round(standard_error(res["recipe"]["accuracy"], n_valid), 4)
        out.update(busy=busy, ours_cache_build_seconds=round(cache_seconds, 1),
                   load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)])
        if turns.errors:  # the runs that finished are measured; the first failure is raised after the line
            out["errors"] = {name: f"{type(e).__name__}: {e}" for name, e in turns.errors.items()}
            print(json.dumps(out))
            raise next(iter(turns.errors.values()))

        if args.preset:
            preset = ClassifierConfig.PRESETS["scratch"]
            start = time.perf_counter()
            presize(find_images(split)[0], preset["size"], args.cache)
            out["preset_cache_build_seconds"] = round(time.perf_counter() - start, 1)
            # the preset's own size, batch size and loss; --epochs is only a cap: the time budget ends the run
            preset_cfg = trainer_config(args, workdir, "preset", **{
                **preset, "epochs": 1000, "time_budget": turns.held["recipe"],
                "bs": min(preset["bs"], n_train)})  # tiny data: smaller batches
            m = train(Classifier(), preset_cfg)
            out.update(preset_accuracy=round(m["accuracy"], 4), preset_seconds=round(m["train_seconds"], 1),
                       preset_epochs=round(m["images_trained"] / n_train, 1), preset_size=preset["size"],
                       preset_bs=preset_cfg.bs,
                       preset_images_per_s=m["images_per_second"])
            out["load_average"].append(round(os.getloadavg()[0], 2))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_cli(main)
