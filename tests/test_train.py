"""The training script end to end: CLI, report files, export, loading elsewhere, interruption, offline."""
import json
import os
import signal
import subprocess
import time

import pytest
from PIL import Image

from conftest import (PY, ROOT, fails_with_one_line, in_fresh_process, interruptible, make_folder_dataset,
                      read_until, run, shapes, train_tiny, write_image)
from imagelab import UserError
from imagelab.export import staged_export
from imagelab.inference import Predictor

REPORT_FILES = ["confusion_matrix.png", "top_losses.png", "loss_curve.png", "metrics.json"]


def test_report_beside_the_model(tiny_model):
    report = tiny_model.with_name("pets.report")
    for name in REPORT_FILES:
        assert (report / name).stat().st_size > 0, name
    for png in report.glob("*.png"):
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) > 100
    m = json.loads((report / "metrics.json").read_text())
    assert m["vocab"] == ["cats", "dogs"] and m["arch"] == "resnet18" and m["pretrained"] is False
    assert (m["size"], m["epochs"], m["seed"]) == (32, 1, 42)
    n_valid = sum(m["counts"]["valid"].values())
    assert n_valid + sum(m["counts"]["train"].values()) == 24
    assert sum(map(sum, m["confusion_matrix"])) == n_valid
    assert m["accuracy"] == pytest.approx(1 - m["error_rate"])
    assert m["accuracy"] == pytest.approx(sum(m["confusion_matrix"][i][i] for i in range(2)) / n_valid)
    assert set(m["per_class"]) == {"cats", "dogs"} and m["train_seconds"] > 0 and m["images_per_second"] > 0
    examples = sorted(p.name for p in (report / "examples").iterdir())
    assert examples and all(n.endswith(".jpg") for n in examples)
    assert not [p for p in tiny_model.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"
    from imagelab.train import made_on
    assert made_on(tiny_model) == f" (trained on {m['created'][:10]})" and made_on(report / "none.pkl") == ""
    modes = {p.suffix: p.stat().st_mode & 0o777 for p in tiny_model.parent.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # each as the user's umask has it (safetensors' own: owner only)


def test_model_loads_in_a_fresh_process_elsewhere(tiny_model, tmp_path):
    img = write_image(tmp_path / "red.png", (220, 60, 60))
    code = ("import sys; from fastai.learner import load_learner\n"
            "learn = load_learner(sys.argv[1])\n"
            "with learn.no_bar(): label, _, probs = learn.predict(sys.argv[2])\n"
            "print(list(learn.dls.vocab), label, round(float(probs.sum()), 4))")
    vocab, label, total = in_fresh_process(code, tiny_model, img, cwd=tmp_path).rsplit(" ", 2)
    assert vocab == "['cats', 'dogs']"
    assert label in ("cats", "dogs")
    assert total == "1.0"


def test_model_trained_on_presized_copies_predicts_raw_large_photos(tiny_model, tmp_path):
    """Training reads small cached copies; the exported model must still take any upload as it is."""
    m = json.loads((tiny_model.with_name("pets.report") / "metrics.json").read_text())
    assert m["presize"] is True
    from fastai.learner import load_learner
    for source in (tiny_model, tiny_model.with_suffix(".onnx")):
        predictor = Predictor(source)
        for name, color, size in [("red.jpg", (220, 60, 60), (1600, 1200)), ("blue.png", (60, 60, 220), (900, 1400))]:
            probs = predictor.predict(write_image(tmp_path / name, color, size=size), k=2)
            assert set(probs) == {"cats", "dogs"} and sum(probs.values()) == pytest.approx(1, abs=1e-4)
    learn = load_learner(tiny_model, cpu=True)
    steps = learn.dls.valid_ds.tls[0].tfms.fs  # the exported pipeline keeps no link to the training cache
    assert all(not getattr(t, "copies", None) for t in steps)


def test_export_is_all_or_nothing(tmp_path):
    model = tmp_path / "m.pkl"
    model.write_bytes(b"good old model")
    with pytest.raises(RuntimeError):
        with staged_export(model) as (tmp_model, tmp_report):
            tmp_model.write_bytes(b"half")
            (tmp_report / "metrics.json").write_text("{}")
            raise RuntimeError("crash while exporting")
    assert model.read_bytes() == b"good old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pkl"]
    with staged_export(model) as (tmp_model, tmp_report):
        tmp_model.write_bytes(b"new")
        (tmp_report / "metrics.json").write_text("{}")
    assert model.read_bytes() == b"new" and (tmp_path / "m.report" / "metrics.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pkl", "m.report"]
    (tmp_path / "m.onnx").mkdir()  # where the graph would go: nothing moves, not even the report
    with pytest.raises(UserError, match="m.onnx is a folder"):
        with staged_export(model) as (tmp_model, tmp_report):
            tmp_model.write_bytes(b"newer")
            tmp_model.with_suffix(".onnx").write_bytes(b"graph")
            (tmp_report / "metrics.json").write_text('{"newer": 1}')
    assert model.read_bytes() == b"new" and (tmp_path / "m.report" / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pkl", "m.report"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_an_export_that_fails_while_moving_in_puts_every_previous_file_back(tmp_path, monkeypatch, failure):
    """A disk that fills, or Ctrl-C, after some files have moved in: the previous model, artifacts and report
    are there as they were (the failure is injected: a disk cannot be made to fail on the third rename)."""
    model = tmp_path / "m.pkl"
    before = {"m.pkl": b"old learner", "m.onnx": b"old graph", "m.report/metrics.json": b"{}"}
    for name, data in before.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    replace, calls = os.replace, []

    def fails_on_the_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise failure
        replace(src, dst)
    monkeypatch.setattr(os, "replace", fails_on_the_third)
    with pytest.raises(UserError if isinstance(failure, OSError) else KeyboardInterrupt):
        with staged_export(model) as (tmp_model, tmp_report):
            for path, data in [(tmp_model, b"new"), (tmp_model.with_suffix(".onnx"), b"new graph"),
                               (tmp_model.with_suffix(".safetensors"), b"weights"),
                               (tmp_report / "metrics.json", b"[]")]:
                path.write_bytes(data)
    monkeypatch.undo()
    assert len(calls) >= 3
    assert {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_output_that_cannot_be_written_is_refused_before_training(tmp_path):
    (tmp_path / "folder.pkl").mkdir()
    (tmp_path / "file").write_text("not a folder")
    long = "a" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 10) + ".pkl"  # fits, but its export's staging name does not
    for out, says in [(tmp_path / "m.onnx", "--out must name a .pkl file"), (tmp_path / "folder.pkl", "is a folder"),
                      (tmp_path / "file" / "m.pkl", "file is a file"), (tmp_path / long, "File name too long"),
                      (tmp_path / "new" / long, f"File name too long ({tmp_path})"),  # its folder is made later
                      ("/proc/m.pkl", "cannot write /proc/m.pkl: ")]:
        fails_with_one_line(run(["training/train_pets.py", "--data", tmp_path, "--out", out], timeout=60), says)
    data = make_folder_dataset(tmp_path / "data", n=3)  # a model in its dataset: its report's images would train
    res = run(["training/train_autoencoder.py", "--data", data, "--out", data / "models" / "ae.pkl"], timeout=60)
    fails_with_one_line(res, f"--out {data / 'models' / 'ae.pkl'} is inside --data {data}: the next run would train")


def test_a_write_that_fails_says_why_and_the_free_space_only_where_the_disk_may_be_full(tmp_path):
    """PyTorch's writer, out of room (here a file-size limit, as a full disk would stop it), says "unexpected pos":
    the message says the file was not written whole, with the disk's free space; a name too long says just that."""
    code = f"""
import resource, signal, sys, torch
from imagelab.writes import torch_write_failed, write_failure
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
for write in (lambda: torch.save(torch.zeros(1 << 20), {str(tmp_path / "big.pt")!r}),
              lambda: open({str(tmp_path / ("n" * 300))!r}, "wb"),
              lambda: torch.save(lambda: None, {str(tmp_path / "code.pt")!r})):  # no disk's fault: its own words
    try:
        write()
    except Exception as e:
        print(torch_write_failed(e), write_failure(e, {str(tmp_path)!r}))
"""
    res = run(["-c", code])
    assert res.returncode == 0, res.stderr[-2000:]
    full, long, unpicklable = res.stdout.splitlines()
    assert full.startswith("True the file could not be written whole (") and full.endswith(
        " MB free on its disk without the unfinished files)")
    assert long == "False File name too long"
    assert unpicklable.startswith("False AttributeError: Can't ") and "MB free" not in unpicklable


# SIGTERM: `kill`, `timeout`, `docker stop`, a notebook's stop button: the same orderly end as a Ctrl-C
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_during_training_keeps_the_previous_model_which_no_other_run_may_write_meanwhile(tmp_path, sig):
    data = make_folder_dataset(tmp_path / "data", n=40)
    out = tmp_path / "pets.pkl"
    out.write_bytes(b"previous model")
    proc = subprocess.Popen([PY, "training/train_pets.py", "--data", data, "--no-pretrained", "--arch", "resnet18",
                             "--epochs", "50", "--size", "32", "--bs", "4", "--workers", "0", "--out", out],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    seen = read_until(proc.stdout, "^epoch", timeout=120)  # the table header: training has begun
    assert f"note: this run replaces {out} as it ends (--out elsewhere keeps it)" in seen  # said while Ctrl-C keeps it
    other = run(["training/train_pets.py", "--data", data, "--no-pretrained", "--arch", "resnet18", "--out", out])
    fails_with_one_line(other, f"another run (process {proc.pid}) is training into {out}: wait for it to end")
    assert proc.poll() is None  # the other run was refused, and this one goes on
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err
    assert out.read_bytes() == b"previous model"
    # nothing half-written; a checkpoint if an epoch had finished (tests/test_resume.py)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "pets.ckpt") == ["data", "pets.pkl"]


def test_offline_default_run_fails_fast_with_one_line(tmp_path):
    env = {**os.environ, "FASTAI_HOME": str(tmp_path / "fastai")}  # a cold dataset cache
    start = time.monotonic()
    res = run(["training/train_pets.py"], env=env, timeout=120)
    assert time.monotonic() - start < 60
    fails_with_one_line(res, "could not download Oxford-IIIT Pet", "--data")


def test_pretrained_offline_fails_fast_with_a_hint(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n=3)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # a cold Hub cache
    start = time.monotonic()
    res = run(["training/train_pets.py", "--data", data, "--arch", "resnet18", "--out", tmp_path / "m.pkl"],
              env=env, timeout=120)
    assert time.monotonic() - start < 60
    fails_with_one_line(res, "pretrained weights", "--no-pretrained")
    assert "checking images" not in res.stderr and " images (" not in res.stdout  # said before any image was read
    assert not (tmp_path / "m.pkl").exists()


def test_bad_arguments_are_one_line_errors(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n=3)
    res = run(["training/train_pets.py", "--data", tmp_path / "missing"])
    assert fails_with_one_line(res) == f"error: no such folder: {tmp_path / 'missing'}"
    res = run(["training/train_pets.py", "--data", data / "cats" / "cats_0.jpg"])  # a photo given for its folder
    assert fails_with_one_line(res) == f"error: not a folder: {data / 'cats' / 'cats_0.jpg'}"
    # an empty name is not the working folder
    res = run(["training/train_pets.py", "--data", ""])
    assert fails_with_one_line(res) == "error: no folder given (an empty name): name the dataset folder"
    out = tmp_path / "new" / "models" / "m.pkl"  # a run refused after it took --out leaves no folders it made
    res = run(["training/train_pets.py", "--data", data, "--arch", "no_such_net", "--no-pretrained", "--out", out])
    fails_with_one_line(res, "unknown timm architecture 'no_such_net'")
    assert not (tmp_path / "new").exists()
    res = run(["training/train_pets.py", "--data", data, "--size", "64", "--start-size", "96"])
    assert fails_with_one_line(res) == "error: --start-size must be between 8 and --size (64), not 96"
    res = run(["training/train_pets.py", "--data", data, "--checkpoint-every", "-1"])
    assert fails_with_one_line(res) == "error: --checkpoint-every must be 0 or more, not -1.0"
    for script, args, says in [("train_pets", ["--lr", "-1"], "--lr must be more than 0 (or find), not -1.0"),
                               ("train_pets", ["--min-scale", "2"], "--min-scale must be more than 0 and at most 1"),
                               ("train_pets", ["--label-smoothing", "1.5"], "--label-smoothing must be at least 0"),
                               ("train_pets", ["--workers", "-2"], "--workers must be 0 or more, not -2"),
                               ("train_pets", ["--bs", "1"], "--bs must be at least 2 (batch norm"),
                               # numbers no machine's memory or NumPy's seeding takes
                               ("train_pets", ["--size", "100000"], "--size must be between 8 and 2048, not 100000"),
                               ("train_pets", ["--seed", str(2**64)], "--seed must be between 0 and 2**32 - 1"),
                               ("train_autoencoder", ["--blocks", "100000"], "--blocks must be between 0 and 16"),
                               # a code longer than the image would be gigabytes of layers, and compress nothing
                               ("train_autoencoder", ["--code-size", "100000"], "less than the image's 12,288 numbers"),
                               ("train_autoencoder", ["--width", "0"], "--width must be at least 1, not 0"),
                               # where the channels stop doubling: a wider first level would build the same model
                               ("train_autoencoder", ["--width", "600"], "--width must be at most 512 (where"),
                               ("train_autoencoder", ["--sparsity", "inf"], "--sparsity must be 0 or more, not inf")]:
        fails_with_one_line(run([f"training/{script}.py", "--data", data, *args]), says)
    # argparse's own mistakes too, a mistyped option or value: one line, not its usage block
    for script, args, says in [("train_bears", ["--mix", "cutmx"], "error: argument --mix: invalid choice: 'cutmx'"),
                               ("train_pets", ["--bogus"], "error: unrecognized arguments: --bogus"),
                               ("train_pets", ["--preset", "scrach"], "error: argument --preset: invalid choice"),
                               ("train_autoencoder", ["--loss", "l2"], "error: argument --loss: invalid choice")]:
        fails_with_one_line(run([f"training/{script}.py", "--data", data, *args]), says, "(--help lists the options)")
    fails_with_one_line(run(["apps/pets/app.py", "--port", "x"]), "error: argument --port: not a port number")
    fails_with_one_line(run(["-m", "imagelab.predict"]), "error: the following arguments are required")
    # settings are checked before PyTorch loads: a typo costs no wait
    for args, says in [(["--data", tmp_path / "typo", "--resume"], f"no such folder: {tmp_path / 'typo'}"),
                       (["--data", data, "--device", "gpu"], "unknown --device 'gpu': use auto, cpu, cuda, cuda:N or mps")]:
        res = run(["-X", "importtime", "training/train_pets.py", *args])
        imported = [line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")]
        assert res.returncode == 2 and "imagelab.config" in imported and "torch" not in imported, res.stderr[-3000:]
        assert res.stderr.splitlines()[-1] == f"error: {says}"


def test_a_folder_with_one_class_is_told_so(tmp_path):
    one = make_folder_dataset(tmp_path / "one", classes=(("cats", (220, 60, 60)),), n=6)
    res = run(["training/train_pets.py", "--data", one, "--no-pretrained", "--arch", "resnet18"])
    fails_with_one_line(res, "only one class", "cats", "at least two")
    # names that --labels filename cannot read (Kaggle's cat.1.jpg): one line, not a traceback from inside fastai
    kaggle = tmp_path / "kaggle"
    for i in range(10):
        shapes(kaggle / f"{('cat', 'dog')[i % 2]}.{i}.jpg", seed=i)
    for task in ("breed", "is_cat"):
        res = run(["training/train_pets.py", "--data", kaggle, "--labels", "filename", "--task", task,
                   "--no-pretrained", "--arch", "resnet18"])
        fails_with_one_line(res, "--labels filename reads Oxford-style names", "10 of 10 are not (such as cat.0.jpg)")


def test_lr_find_says_which_rate_it_chose_and_writes_nothing_where_it_runs(tmp_path):
    data, work = make_folder_dataset(tmp_path / "data", n=8), tmp_path / "work"
    work.mkdir()
    # timm's smallest ResNet: lr_find's 100 steps at resnet18's cost would make this the suite's slowest test
    res = train_tiny(data, tmp_path / "m.pkl", "--lr", "find", "--arch", "test_resnet", cwd=work)
    assert list(work.iterdir()) == []  # fastai's lr_find keeps the weights in ./models meanwhile: not here
    chosen = [line for line in res.stdout.splitlines() if line.startswith("lr_find chose ")]
    assert len(chosen) == 1, res.stdout[-2000:]
    lr = float(chosen[0].split()[-1])
    m = json.loads((tmp_path / "m.report" / "metrics.json").read_text())
    assert m["lr"] == pytest.approx(lr, rel=1e-2) and m["lr_find"]["lr"] == m["lr"]
    assert len(m["lr_find"]["lrs"]) == len(m["lr_find"]["losses"]) > 50  # what lr_find saw, plotted beside it:
    with Image.open(tmp_path / "m.report" / "lr_find.png") as im:
        assert im.format == "PNG" and min(im.size) > 100
    assert "/101" not in res.stdout + res.stderr  # lr_find's own 100 steps show no epoch bars


def test_help_lists_the_knobs():
    res = run(["training/train_pets.py", "--help"])
    assert res.returncode == 0
    for flag in ["--data", "--labels", "--task", "--arch", "--no-pretrained", "--epochs", "--size", "--bs",
                 "--lr", "--valid-pct", "--seed", "--min-scale", "--out", "--resume", "--preset", "--presize",
                 "--time-budget", "--wd", "--label-smoothing", "--start-size", "--checkpoint-every"]:
        assert flag in res.stdout, flag


def test_progressive_resizing_trains_small_first_and_exports_the_full_size(tmp_path):
    from fastai.callback.core import Callback
    from fastai.learner import load_learner
    from fastai.vision.all import RandomResizedCrop
    from imagelab.classifier import Classifier
    from imagelab.config import ClassifierConfig
    from imagelab.train import train

    class Sizes(Callback):
        def before_fit(self):
            self.seen = []

        def after_pred(self):
            self.seen.append((self.learn.epoch, self.training, self.x.shape[-1]))
    sizes = Sizes()
    data = make_folder_dataset(tmp_path / "data", n=16)
    cfg = ClassifierConfig(data=str(data), out=str(tmp_path / "m.pkl"), pretrained=False, arch="resnet18", epochs=4,
                           size=32, start_size=16, bs=8)
    m = train(Classifier(), cfg, cbs=[sizes])
    train = {e: {s for e2, t, s in sizes.seen if t and e2 == e} for e in range(4)}
    assert train == {0: {16}, 1: {24}, 2: {32}, 3: {32}}  # grows over the first half, full size after
    assert {s for _, t, s in sizes.seen if not t} == {32}  # validation always at the full size
    assert m["start_size"] == 16 and m["size"] == 32
    crop = next(t for t in load_learner(tmp_path / "m.pkl").dls.after_item.fs if isinstance(t, RandomResizedCrop))
    assert tuple(crop.size) == (32, 32)
