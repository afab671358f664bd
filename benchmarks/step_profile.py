"""Where a training step's time goes, phase by phase, on any device: data, forward, loss, backward, optimizer, the rest.

    python benchmarks/step_profile.py --device cuda                       # generated images, resnet18 at 224 px
    python benchmarks/step_profile.py --data ../shared/data/catsdogs --size 64 --bs 16

Trains the classifier with the trainer's defaults (`imagelab.train.train`) and times each phase of every
training step, waiting for the device at each boundary so that its queued work counts where it was
issued. Those waits cost a little overlap: the phases add up to slightly more than an untimed step.
Each epoch's validation and its end (checkpoint, best weights, metrics) are timed too. The first epoch
is left out (warm-up). On a CUDA GPU it also counts the training phases' implicit waits for the GPU
(PyTorch's sync debug mode) and names the lines that caused them. The last line printed is one JSON
object, milliseconds per step or per epoch.
"""
import json
import tempfile
import time
import warnings
from pathlib import Path

from imagelab import ArgumentParser, run_cli
from imagelab.config import ClassifierConfig

from device_check import make_images

# torch and fastai are imported where they are used: --help answers at once, and run_cli's setup() (OpenMP's
# wait policy, read once) comes before PyTorch loads.

# (phase, the event that ends it); each phase starts where the one before it ended
STEP = [("forward", "after_pred"), ("loss", "after_loss"), ("backward", "after_backward"), ("optimizer", "after_step"),
        ("rest", "after_batch")]


def parse(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", metavar="DIR", help="image folder, one sub-folder per class (default: generated images)")
    p.add_argument("--images", type=int, default=320, help="generated images per class, without --data")
    p.add_argument("--arch", default="resnet18", help="timm architecture")
    p.add_argument("--size", type=int, default=224, help="input size in pixels")
    p.add_argument("--bs", type=int, default=64, help="batch size")
    p.add_argument("--epochs", type=int, default=3, help="the first is left out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (as training's --precision)")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="the trainer's; 0 writes a checkpoint after every epoch, to time its cost in epoch_end")
    return p.parse_args(argv)


def clock():
    """The time once the device has finished what was asked of it."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.synchronize()
    return time.perf_counter()


class Phases:
    """Two callbacks that time a fit: one before every other callback of each event, one after them all."""

    def __init__(self):
        import torch
        from fastai.callback.core import Callback
        self.step = {name: [] for name, _ in STEP} | {"data": []}
        self.epoch = {"validation": [], "epoch_end": []}
        phases = self

        class First(Callback):
            order = -1000

            def before_batch(self):
                if self.training and phases.mark is None:  # the epoch's first batch: its loader was just made
                    phases.mark = clock()
                else:
                    phases.lap("data", self.training)

            def before_train(self):
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.set_sync_debug_mode("warn")  # each implicit wait for the GPU warns: `syncs` counts them

            def before_validate(self):
                phases.mark = clock()

            def before_epoch(self):
                phases.mark, phases.counting = None, self.epoch > 0

        for name, event in STEP[:-1]:
            setattr(First, event, lambda cb, name=name: self.lap(name, cb.training))

        class Last(Callback):
            order = 1000

            def after_batch(self):
                phases.lap("rest", self.training)

            def after_train(self):
                if torch.cuda.is_available():
                    torch.cuda.set_sync_debug_mode("default")

            def after_validate(self):
                phases.lap("validation", True, phases.epoch)

            def after_epoch(self):
                phases.lap("epoch_end", True, phases.epoch)

        self.callbacks, self.mark, self.counting = [First(), Last()], None, False

    def lap(self, name, training, into=None):
        if not training or self.mark is None:
            return
        now = clock()
        if self.counting:
            (into or self.step)[name].append(now - self.mark)
        self.mark = now

    def summary(self):
        mean = {name: 1000 * sum(v) / len(v) for name, v in {**self.step, **self.epoch}.items() if v}
        return {k: round(v, 2) for k, v in mean.items()}


def main(argv=None):
    args = parse(argv)
    import torch
    from imagelab.classifier import Classifier
    from imagelab.train import train
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else make_images(Path(tmp) / "data", args.images)
        cfg = ClassifierConfig(data=str(data), arch=args.arch, pretrained=False, size=args.size, start_size=args.size,
                               bs=args.bs, epochs=args.epochs, device=args.device, precision=args.precision,
                               checkpoint_every=args.checkpoint_every, out=str(Path(tmp) / "model" / "pets.pkl"))
        phases = Phases()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = train(Classifier(), cfg, cbs=phases.callbacks)
        syncs = [w for w in caught if "synchronizing" in str(w.message)]
    ms = phases.summary()
    out = {"device": m["device"], "precision": m["precision"], "arch": args.arch, "size": args.size, "bs": args.bs,
           "ms_per_step": {name: ms.get(name) for name in ["data", *(n for n, _ in STEP)]},
           "step_ms": round(sum(ms.get(n, 0) for n in ["data", *(n for n, _ in STEP)]), 2),
           "ms_per_epoch": {name: ms.get(name) for name in phases.epoch},
           "train_images_per_s_timed": m["images_per_second"],
           # implicit waits for a CUDA GPU in the training phases (the progress bar's loss reads it once a second)
           "gpu_syncs_in_training": len(syncs) if torch.cuda.is_available() else None,
           "gpu_sync_sources": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_cli(main)
