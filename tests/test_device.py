"""Training on any torch device, in any precision: what can be checked on a CPU (device_check.py runs on a GPU too)."""
import json
import random
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from imagelab import UserError
from imagelab.device import cpu_has_bf16, pick_device, pick_precision
from imagelab.loading import load_trusted_learner
from conftest import make_folder_dataset, run, train_tiny


def test_device_check_passes_every_step_on_the_cpu():
    res = run(["benchmarks/device_check.py", "--device", "cpu"], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert line["device"] == "cpu" and line["precision"] == pick_precision("auto", torch.device("cpu"))
    assert line["steps"] == dict.fromkeys(["classifier", "classifier_on_cpu", "autoencoder", "autoencoder_on_cpu",
                                           "killed_after_a_checkpoint", "resumed", "torchrun_1_process"], "pass")
    assert line["passed"] is True


def test_model_step_benchmark_times_each_precision_on_the_cpu():
    res = run(["benchmarks/model_step.py", "--size", "32", "--bs", "4", "--steps", "1"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert line["device"] == "cpu" and line["native_bf16"] == cpu_has_bf16()
    assert line["fp32_images_per_s"] > 0 and line["bf16_images_per_s"] > 0
    assert "cudnn_benchmark_images_per_s" not in line  # cuDNN's choices are a CUDA GPU's


@pytest.mark.parametrize("device, precision, says", [
    ("tpu", "auto", "unknown --device 'tpu'"),
    ("cuda:99", "auto", "--device cuda:99: "),  # no such GPU on any machine
    ("cpu", "fp16", "--precision fp16 needs a CUDA GPU"),
    ("cpu", "int8", "unknown --precision 'int8'"),
])
def test_devices_and_precisions_that_cannot_work_are_refused(device, precision, says):
    with pytest.raises(UserError, match=says.replace("(", r"\(")):
        pick_precision(precision, pick_device(device))


def test_auto_trains_in_fp32_on_a_cpu_and_bf16_is_there_to_ask_for():
    """bf16 on a CPU is fast alone and slow beside another busy program (benchmarks/README.md): opt-in."""
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_precision("auto", torch.device("cpu")) == "fp32"
    assert pick_precision("bf16", torch.device("cpu")) == "bf16"
    assert pick_precision("auto", torch.device("mps")) == "fp32"
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    assert cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})  # what the kernel says the CPU computes


def test_bf16_autocast_trains_and_everything_exported_is_fp32_on_the_cpu(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n=8)
    out = tmp_path / "m" / "pets.pkl"
    res = train_tiny(data, out, "--precision", "bf16", "--device", "cpu")
    assert "Warning" not in res.stderr, res.stderr[-3000:]
    m = json.loads((out.with_name("pets.report") / "metrics.json").read_text())
    assert (m["device"], m["precision"]) == ("cpu", "bf16")
    learn = load_trusted_learner(out)
    assert {(p.dtype, p.device.type) for p in learn.model.parameters()} == {(torch.float32, "cpu")}
    assert not [cb for cb in learn.cbs if isinstance(cb, MixedPrecision)]
    assert {v.dtype for k, v in load_file(out.with_name("pets.safetensors")).items()
            if v.is_floating_point()} == {torch.float32}


def test_cpu_bf16_leaves_batches_that_give_a_strided_convolution_one_pixel_in_fp32(capsys):
    """PyTorch's CPU bf16 backward leaves part of the weight gradient of a strided convolution that sees a one-pixel
    map uninitialised (garbage, often NaN): the batches that give one such a map train in fp32, the rest in bf16;
    validation is fp32, as the report judges the exported model."""
    import timm
    from fastai.vision.all import CrossEntropyLossFlat, DataLoaders, Learner, nn
    from imagelab.device import AnyDeviceMixedPrecision, one_pixel_strided_conv

    resnet = timm.create_model("resnet18", num_classes=2)
    resnet.layer1.eval()  # a part frozen in eval mode stays so
    assert one_pixel_strided_conv(resnet, torch.zeros(1, 3, 16, 16)) == "layer4.0.conv1"  # 16 px: 1 x 1 there
    assert one_pixel_strided_conv(resnet, torch.zeros(1, 3, 32, 32)) is None
    assert resnet.training and not resnet.layer1.training and resnet.layer2.training

    class Record(Callback):
        def before_fit(self):
            self.seen = []

        def after_pred(self):  # inside the autocast region, when there is one
            self.seen.append((self.training, self.xb[0].shape[-1], torch.is_autocast_enabled("cpu")))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    for side, casts in ((2, False), (4, True)):  # 2 px: the second convolution sees 1 x 1
        x = torch.randn(64, 3, side, side)
        y = (x[:, 0].mean((1, 2)) > 0).long()
        dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:16], y[:16])), bs=16, device="cpu")
        record = Record()
        learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(),
                        cbs=[AnyDeviceMixedPrecision("bf16", "cpu"), record])
        learn.fit(1, 1e-3)
        assert record.seen[:4] == [(True, side, casts)] * 4
        assert record.seen[4:] and {cast for _, _, cast in record.seen[4:]} == {False}  # validation: fp32
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert not torch.is_autocast_enabled("cpu")  # every region entered was left
    out = capsys.readouterr().out
    assert out.count("note: batches of 2 x 2 px train in fp32, not bf16: there 2 (a strided convolution)") == 1
    assert "batches of 4 x 4" not in out


def small_learner(*cbs):
    """A learner with the trainer's optimizer on a small learnable problem: 6 training batches an epoch."""
    from fastai.vision.all import CrossEntropyLossFlat, DataLoaders, Learner, nn
    from imagelab.models import adamw

    random.seed(0)  # fastai's loaders draw their shuffling from it
    torch.manual_seed(0)
    x = torch.randn(256, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    dls = DataLoaders.from_dsets(list(zip(x[:192], y[:192])), list(zip(x[192:], y[192:])), bs=32, device="cpu")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 2))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=adamw, wd=0.1, cbs=[*cbs])


def test_fp16_loss_scaling_steps_fastais_adam_and_skips_a_step_that_overflows_without_reading_the_device():
    """fp16 with a GradScaler (what `--precision auto` picks on a T4 or P100), checked on the CPU, which autocasts
    to fp16 too: the trainer's optimizer steps on unscaled gradients, a step whose gradients overflow changes
    nothing (not the weights, not Adam's moments, not the weight decay) and halves the scale, the run learns
    as fp32 does, and no step reads whether it overflowed (which on a GPU would make the CPU wait for it)."""
    from imagelab.device import AnyDeviceMixedPrecision

    overflowing = 7  # the training batch whose gradients are made infinite

    class Watch(Callback):
        order = 20  # after the mixed precision callback's after_step (10), which updates the scale

        def before_fit(self):
            self.batch, self.seen, self.grads, self.cancelled = 0, [], [], 0

        def before_step(self):  # after the mixed precision callback's: gradient clipping would come here
            self.grads.append(max(float(p.grad.abs().max()) for p in self.model.parameters()))

        def after_cancel_step(self):
            self.cancelled += 1

        def before_batch(self):
            if self.training:
                self.before = ([p.clone() for p in self.model.parameters()], self.moments(),
                               self.learn.scaler.get_scale() if hasattr(self.learn, "scaler") else None)

        def moments(self):
            return [s["exp_avg"].clone() for s in self.opt.opt.state.values()]

        def after_backward(self):
            if self.batch == overflowing:
                next(self.model.parameters()).grad[0] = float("inf")

        def after_batch(self):
            if not self.training:
                return
            weights, then, scale = self.before
            unchanged = all(torch.equal(a, b) for a, b in zip(weights, self.model.parameters()))
            now = self.learn.scaler.get_scale() if scale is not None else None
            moments = self.moments()
            same_moments = len(moments) == len(then) and all(torch.equal(a, b) for a, b in zip(moments, then))
            self.seen.append((unchanged, same_moments, scale, now))
            self.batch += 1

    fp32 = small_learner()
    fp32.fit_one_cycle(4, 5e-2)  # a rate at which it learns clearly in 24 steps, one of them skipped
    watch = Watch()
    fp16 = small_learner(AnyDeviceMixedPrecision("fp16", "cpu"), watch)
    fp16.fit_one_cycle(4, 5e-2)
    assert len(watch.seen) == 4 * 6
    # every step reaches the callbacks after this one, with the gradients unscaled (scaled, they are 65536 times
    # larger), and none is reported cancelled, not even the one that overflowed and was skipped
    assert len(watch.grads) == 4 * 6 and watch.cancelled == 0
    assert all(g < 100 for i, g in enumerate(watch.grads) if i != overflowing), watch.grads
    unchanged, same_moments, scale, now = watch.seen[overflowing]
    assert unchanged and same_moments and now == scale / 2, watch.seen[overflowing]
    assert scale == 2.0 ** 16  # GradScaler's first scale: nothing overflowed before
    assert not any(w or m for i, (w, m, _, _) in enumerate(watch.seen) if i not in (0, overflowing))
    assert all(torch.isfinite(p).all() for p in fp16.model.parameters())
    assert {p.dtype for p in fp16.model.parameters()} == {torch.float32}
    losses = [learn.validate()[0] for learn in (fp32, fp16)]
    assert abs(losses[0] - losses[1]) < 0.05 and max(losses) < 0.6, losses  # chance: ln 2 = 0.69

    reads, learn = HostReads(), small_learner(AnyDeviceMixedPrecision("fp16", "cpu"))
    with learn.no_bar(), reads:
        learn.fit(1, 1e-2)
    # fastai's Recorder reads its losses (the trainer keeps them on the device); nothing else does
    assert [r for r in reads.reads if r[1] not in CPU_ONLY and not r[1].startswith("Recorder.")] == []


def test_fp16_loss_scale_lasts_the_whole_run_and_a_resumed_run_goes_on_with_it(tmp_path):
    """The loss scale found in one fit carries into the next (fine_tune's two fits) and into a resumed run,
    rather than starting again at GradScaler's first scale and skipping steps to find it once more; lr_find's
    overflows (it raises the rate until the loss diverges) are not carried into the run."""
    from imagelab.checkpoint import Checkpoint, Writer, load_checkpoint, restore
    from imagelab.device import AnyDeviceMixedPrecision
    from imagelab.train import resolve_lr

    class Overflow(Callback):  # the first step of each fit overflows: the scale halves
        def before_fit(self):
            self.first = True

        def after_backward(self):
            if self.first:
                next(self.model.parameters()).grad[0] = float("inf")
                self.first = False

    mixed, writer, path = AnyDeviceMixedPrecision("fp16", "cpu"), Writer(), tmp_path / "run.pth"
    learn = small_learner(mixed, Overflow())
    learn.fit(1, 1e-3)
    learn.fit(1, 1e-3, cbs=[Checkpoint(path, {}, dict, writer)])
    writer.wait()
    assert mixed.grad_scaler.get_scale() == 2.0 ** 14  # halved in each fit
    state = load_checkpoint(path, {})
    assert state["scaler"]["scale"] == 2.0 ** 14

    resumed = AnyDeviceMixedPrecision("fp16", "cpu")
    learn = small_learner(resumed)
    restore(learn, state)
    learn.fit(1, 1e-3)
    assert resumed.grad_scaler.get_scale() == 2.0 ** 14  # nothing overflowed: where the run had left it

    finding = AnyDeviceMixedPrecision("fp16", "cpu")
    resolve_lr(small_learner(finding, Overflow()), "find", None)  # an overflow while lr_find climbs
    assert finding.grad_scaler.get_scale() == 2.0 ** 16  # is lr_find's, not the run's
    fp32 = small_learner()
    restore(fp32, state)  # a run resumed without loss scaling (on a CPU, or in bf16) has no scale to take


class HostReads(TorchFunctionMode):
    """Every call that reads a tensor's value into Python, or needs the CPU to learn one (a CUDA GPU makes the CPU
    wait for all its queued work then), with its reader: the fastai callback whose method asked, else the
    function."""
    READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__",
             "nonzero", "masked_select", "unique", "linalg_solve", "linalg_inv"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads.append((func.__name__, self.reader()))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def reader():
        frame = sys._getframe(2)
        while frame:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Callback):
                return f"{type(owner).__name__}.{frame.f_code.co_name}"
            frame = frame.f_back
        caller = sys._getframe(2)
        return f"{caller.f_globals.get('__name__')}.{caller.f_code.co_name}"


# Reads of tensors that never leave the CPU, whatever the device: they make nothing wait.
CPU_ONLY = {"ParamScheduler._update_val",  # fastai's one-cycle schedule, computed on tensors of its own
            "torch.utils.data.dataloader.__init__"}  # PyTorch's loader seeds itself from the CPU's generator


def test_training_steps_never_wait_for_the_device(tmp_path):
    """On a GPU, the CPU prepares the next batch while the GPU computes this one, unless Python needs a value
    the GPU computes. Checked here on the CPU, device-independently: the training and validation phases of each
    epoch (their batches, augmentation, steps, losses, metrics and callbacks) read none, but the progress bar's loss,
    at most once a second and at each bar's end."""
    from imagelab.classifier import Classifier
    from imagelab.config import ClassifierConfig
    from imagelab.callbacks import Progress
    from imagelab.train import train

    reads = HostReads()

    class Audit(Callback):
        order = -1000  # before every other callback's before_train, and before every other's after_train

        def before_fit(self):
            self.started = time.perf_counter()

        def before_train(self):
            reads.__enter__()

        def after_train(self):
            reads.__exit__(None, None, None)

        before_validate, after_validate = before_train, after_train

    audit = Audit()
    data = make_folder_dataset(tmp_path / "data", n=16)
    cfg = ClassifierConfig(data=str(data), out=str(tmp_path / "m.pkl"), pretrained=False, arch="resnet18", epochs=2,
                           size=32, bs=8)
    m = train(Classifier(), cfg, cbs=[audit])
    seconds = time.perf_counter() - audit.started
    assert m["images_trained"] == 2 * 3 * 8 and len(m["valid_loss_per_epoch"]) == 2
    assert [r for r in reads.reads if r[1] not in CPU_ONLY | {"Progress.after_batch"}] == []
    shown = [r for r in reads.reads if r[1] == "Progress.after_batch"]
    assert 4 <= len(shown) <= 4 + seconds / Progress.every + 1, shown  # two bars an epoch


@pytest.mark.parametrize("name", ["MixUp", "CutMix"])
@pytest.mark.parametrize("stack_y", [True, False])  # integer labels (the trainer's), or one-hot ones blended too
def test_mixing_gives_what_fastais_own_gives_and_reads_nothing_from_the_device(name, stack_y):
    """`--mix`'s callbacks blend the same images with the same partners and shares as fastai's, draw for draw,
    and read nothing from the device: they also run on PyTorch's meta device, whose tensors have no values to
    read (fastai's CutMix does not: it slices with corners it computed there)."""
    from fastai.callback import mixup
    from imagelab import augment

    x = torch.rand(8, 3, 16, 12)
    y = torch.arange(8) % 3
    y = y if stack_y else torch.nn.functional.one_hot(y, 3).float()

    def mixed(cls, x, y):
        learn, cb = small_learner(), cls()
        learn.xb, learn.yb = (x.clone(),), (y,)
        cb.learn, cb.stack_y = learn, stack_y
        torch.manual_seed(3)
        cb.before_batch()
        return learn.xb[0], learn.yb[0], cb.yb1[0], torch.as_tensor(cb.lam).flatten()

    ours, fastais = mixed(getattr(augment, name), x, y), mixed(getattr(mixup, name), x, y)
    for a, b in zip(ours, fastais):
        assert torch.allclose(a, b.to(a.dtype)), (a, b)
    assert not torch.equal(ours[0], x)  # something was mixed
    meta = mixed(getattr(augment, name), x.to("meta"), y.to("meta"))
    assert meta[0].is_meta and meta[0].shape == x.shape
    if name == "CutMix":
        with pytest.raises(Exception, match="meta"):
            mixed(mixup.CutMix, x.to("meta"), y.to("meta"))


def test_augmentation_gives_what_fastais_own_gives_draw_for_draw():
    from fastai.vision.all import IntToFloatTensor, Normalize, Pipeline, TensorCategory, TensorImage, imagenet_stats
    from fastai.vision.all import aug_transforms
    from imagelab.augment import fastais_own, faster_augmentation

    torch.manual_seed(0)
    batch = (TensorImage(torch.randint(0, 256, (16, 3, 40, 48), dtype=torch.uint8)), TensorCategory(torch.arange(16)))
    pipeline = Pipeline([IntToFloatTensor(), *aug_transforms(), Normalize.from_stats(*imagenet_stats, cuda=False)])
    for split in (0, 1):  # training, validation
        pipeline.split_idx = split
        outputs = []
        for own in (faster_augmentation(), fastais_own()):
            with own:
                torch.manual_seed(split)
                outputs.append(pipeline(batch))
        (ours, y), (theirs, their_y) = outputs
        assert type(ours) is TensorImage and torch.equal(y, their_y)
        assert torch.equal(ours, theirs), (ours - theirs).abs().max()
        unaugmented = pipeline[-1](pipeline[0](batch[0]))
        assert torch.allclose(ours, unaugmented, atol=1e-3) == (split == 1)  # augmented in training only


def test_each_thread_trains_with_the_augmentation_its_own_run_asked_for():
    """train_speed trains the course recipe beside our runs in one process: the recipe must get fastai's as it
    ships while ours run, a run must keep ours when another ends, and fastai is as it ships once all have ended."""
    from fastai.vision import augment
    from imagelab.augment import ORIGINALS, fastais_own, faster_augmentation

    def ours():  # fastai's solve refuses a singular system; ours does not read LAPACK's status
        try:
            augment.solve(torch.zeros(1, 8, 8), torch.zeros(1, 8, 1))
            return True
        except RuntimeError:
            return False

    seen, a_in, checked, b_in, a_out = {}, *(threading.Event() for _ in range(4))

    def run_a():
        with faster_augmentation():
            a_in.set()
            b_in.wait(30)
            seen["a"] = ours()
        a_out.set()

    def run_b():
        checked.wait(30)
        with faster_augmentation():
            b_in.set()
            a_out.wait(30)
            seen["b after a ended"] = ours()

    threads = [threading.Thread(target=f) for f in (run_a, run_b)]
    for t in threads:
        t.start()
    a_in.wait(30)
    seen["beside a"] = ours()
    checked.set()
    for t in threads:
        t.join(60)
    assert seen == {"a": True, "beside a": False, "b after a ended": True}
    assert all(getattr(owner, name) is f for (owner, name), f in ORIGINALS.items())  # fastai's outside a run
    with faster_augmentation():
        assert ours()
        with fastais_own():
            assert not ours()
        assert ours()
    assert not ours()


def test_fastais_augmentation_functions_compute_what_they_did_without_reading_the_device():
    from fastai.vision import augment
    from imagelab.augment import ORIGINALS, apply_perspective, find_coeffs, solve, _grid_sample

    fastai = {name: f for (owner, name), f in ORIGINALS.items() if owner is augment}
    torch.manual_seed(0)
    for size, zoom in [(32, 1.0), (32, 0.7), (128, 1.3), (128, 0.2)]:  # 128 -> 32: over twice the output's size
        x = torch.rand(4, 3, size, size)
        theta = torch.tensor([[zoom, 0.1, 0.05], [-0.1, zoom, 0.0]]).expand(4, 2, 3)
        coords = torch.nn.functional.affine_grid(theta, (4, 3, 32, 32), align_corners=True)
        assert torch.equal(_grid_sample(x, coords), fastai["_grid_sample"](x, coords))
    coords = torch.rand(4, 32, 32, 2) * 2 - 1
    coeffs = torch.randn(4, 8, 1) * 0.1 + torch.tensor([1., 0, 0, 0, 1, 0, 0, 0])[:, None]
    assert torch.equal(apply_perspective(coords, coeffs), fastai["apply_perspective"](coords, coeffs))
    flat = coeffs.clone()
    flat[0, 6:, 0], coords[0, 0, 0] = -1.0, torch.tensor([0.5, 0.5])  # a divisor 1 - 0.5 - 0.5 = 0
    assert torch.equal(apply_perspective(coords, flat), fastai["apply_perspective"](coords, flat))
    assert torch.equal(apply_perspective(coords, flat), coords)  # fastai's fallback: the batch unwarped
    A, B = torch.randn(4, 8, 8) + 8 * torch.eye(8), torch.randn(4, 8, 1)
    assert torch.allclose(solve(A, B), fastai["solve"](A, B))
    corners = torch.tensor([[-1., -1], [-1, 1], [1, -1], [1, 1]]).expand(4, 4, 2)  # as the warp expands them
    moved = corners + torch.rand(4, 4, 2) * 0.4 - 0.2
    for p1, p2 in [(corners, moved), (moved, corners)]:  # the warp and its inverse
        assert torch.equal(find_coeffs(p1, p2), fastai["find_coeffs"](p1, p2))
