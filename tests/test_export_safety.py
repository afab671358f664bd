"""The export's promise under interruption: Ctrl-C or `kill -9` at any point leaves the previous model whole, never
a mix of two; and what cannot be exported is refused before training, not after it."""
import hashlib
import json
import shutil
import signal

import pytest

from conftest import ROOT, fails_with_one_line, make_folder_dataset, run

TRAIN = ["--no-pretrained", "--arch", "resnet18", "--epochs", "1", "--size", "32", "--bs", "8", "--workers", "0"]


def training_with(prelude, data, out, *extra):
    """A real training run into `out` in a process that first runs the Python `prelude` (which patches what the
    export calls, to interrupt it at a chosen point), then the training script as `python train_pets.py` would."""
    code = (f"{prelude}\nimport runpy, sys\nsys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return run(["-c", code, ROOT / "training" / "train_pets.py", "--data", data, "--out", out, *TRAIN, *extra])


# A Ctrl-C that arrives while Python runs a finalizer (`__del__`, a weakref callback: the garbage collector runs them
# anywhere) raises KeyboardInterrupt there, and Python prints it and drops it ("Exception ignored in ...").
SWALLOWED_CTRL_C = """
import signal, torch
class Collected:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)
export = torch.onnx.export
def exports_while_ctrl_c_is_dropped(*args, **kwargs):
    Collected()
    return export(*args, **kwargs)
torch.onnx.export = exports_while_ctrl_c_is_dropped
"""


def test_a_ctrl_c_that_python_drops_during_the_export_still_keeps_the_previous_model(tmp_path):
    data, out = make_folder_dataset(tmp_path / "data"), tmp_path / "m.pkl"
    out.write_bytes(b"previous model")
    res = training_with(SWALLOWED_CTRL_C, data, out)
    assert "KeyboardInterrupt" in res.stderr, res.stderr[-3000:]  # the premise: Python reported it and went on
    assert res.returncode == 128 + signal.SIGINT, res.stderr[-3000:]
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "m.ckpt", "m.pkl"]
    *_, resume, interrupted = res.stderr.strip().splitlines()
    assert resume == f"{tmp_path / 'm.ckpt'} holds the run after epoch 1: rerun with --resume to continue from there"
    assert interrupted == "interrupted: nothing was exported"


# A Ctrl-C dropped so in the second batch of training, which would go on to its last epoch and export
DROPPED_WHILE_TRAINING = """
import signal
from fastai.learner import Learner
class Collected:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)
one_batch, batches = Learner._do_one_batch, []
def one_batch_then_a_dropped_ctrl_c(self):
    batches.append(self.training)
    if len(batches) == 2:
        Collected()
    return one_batch(self)
Learner._do_one_batch = one_batch_then_a_dropped_ctrl_c
"""


def test_a_ctrl_c_that_python_drops_during_training_stops_it_after_that_batch(tmp_path):
    data, out = make_folder_dataset(tmp_path / "data"), tmp_path / "m.pkl"
    out.write_bytes(b"previous model")
    res = training_with(DROPPED_WHILE_TRAINING, data, out, "--epochs", "3", "--lr", "1e-3")
    assert "KeyboardInterrupt" in res.stderr, res.stderr[-3000:]  # the premise: Python reported it and went on
    assert res.returncode == 128 + signal.SIGINT, res.stderr[-3000:]
    assert "epoch" in res.stdout and "\n1 " not in res.stdout  # stopped in the first epoch: no row of the table
    assert out.read_bytes() == b"previous model" and sorted(p.name for p in tmp_path.iterdir()) == ["data", "m.pkl"]
    assert res.stderr.strip().splitlines()[-1] == "interrupted: nothing was exported"


def previous_model(folder):
    """A previous model's files in `folder` (not a real model: only whether each is kept byte for byte matters), as
    `model_files` has them."""
    files = {name: f"previous {name}".encode() for name in ("m.pkl", "m.onnx", "m.safetensors", "m.config.json",
                                                           "m.report/metrics.json", "m.report/examples/cats_0.jpg")}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return model_files(folder)


def model_files(folder):
    """Every file of the model `m.pkl` in `folder`, and a digest of what it holds (a failed comparison of the bytes
    themselves would take pytest minutes to show): its checkpoint, data and hidden files apart."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file() and p.relative_to(folder).parts[0].startswith("m.") and p.suffix != ".ckpt"}


# Ctrl-C pressed again and again once the export has begun to move its files in: from the second move on, each move
# into the model's folder (the checkpoint's apart) comes with one, and so does each move that puts a file back.
CTRL_C_AT_EVERY_MOVE = """
import os, signal
replace = os.replace
moves = []
def replace_while_ctrl_c_is_pressed(src, dst, *args, **kwargs):
    name = os.path.basename(dst)
    if name.startswith("m.") and not name.endswith(".ckpt") and os.path.dirname(dst) == os.path.dirname(OUT):
        moves.append(dst)
        if len(moves) >= 2:
            signal.raise_signal(signal.SIGINT)
    return replace(src, dst, *args, **kwargs)
os.replace = replace_while_ctrl_c_is_pressed
"""


def test_ctrl_c_again_and_again_while_the_export_moves_in_keeps_every_previous_file(tmp_path):
    data, out = make_folder_dataset(tmp_path / "data"), tmp_path / "m.pkl"
    before = previous_model(tmp_path)
    res = training_with(f"OUT = {str(out)!r}\n{CTRL_C_AT_EVERY_MOVE}", data, out)
    assert res.returncode == 128 + signal.SIGINT, res.stderr[-3000:]
    assert model_files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "m.ckpt", *sorted({n.split("/")[0] for n in before})]
    assert res.stderr.strip().splitlines()[-1] == "interrupted: nothing was exported"


# `kill -9` as the export moves its report in: the graph and config before it have moved in, the learner after it not.
KILLED_AS_THE_REPORT_MOVES_IN = """
import os, signal
replace = os.replace
def replace_until_the_report(src, dst, *args, **kwargs):
    if os.fspath(dst) == os.path.join(os.path.dirname(OUT), "m.report"):
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *args, **kwargs)
os.replace = replace_until_the_report
"""


def test_kill_9_while_the_export_moves_in_is_undone_by_the_next_app_or_run(tmp_path):
    work, copy = tmp_path / "work", tmp_path / "copy"
    data, out = make_folder_dataset(work / "data"), work / "m.pkl"
    three = make_folder_dataset(tmp_path / "three", classes=(("cats", (220, 60, 60)), ("dogs", (60, 60, 220)),
                                                             ("frogs", (60, 220, 60))))
    res = training_with("", data, out)
    assert res.returncode == 0, res.stderr[-3000:]
    before = model_files(work)
    res = training_with(f"OUT = {str(out)!r}\n{KILLED_AS_THE_REPORT_MOVES_IN}", three, out)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    mixed = model_files(work)  # the premise: a config of three classes beside a graph of two
    assert mixed["m.config.json"] != before["m.config.json"] and mixed["m.pkl"] == before["m.pkl"]
    assert not (work / "m.report").exists()  # stepped aside for the new one
    shutil.copytree(work, copy, symlinks=True)
    shutil.copytree(work, tmp_path / "to-deploy", symlinks=True)

    # an app (here the batch CLI) opening the model puts the previous one back, whole, before it loads it
    res = run(["-m", "imagelab.predict", out, data / "cats" / "cats_0.jpg"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert model_files(work) == before and not [p for p in work.iterdir() if p.name.endswith(".tmp")]
    assert "frogs" not in res.stdout

    # so does the next run into --out, as it starts (this one then stops: a folder of one class trains nothing)
    one = make_folder_dataset(tmp_path / "one", classes=(("cats", (220, 60, 60)),), n=6)
    res = run([ROOT / "training" / "train_pets.py", "--data", one, "--out", copy / "m.pkl", *TRAIN])
    fails_with_one_line(res, "only one class")
    assert model_files(copy) == before and not [p for p in copy.iterdir() if p.name.endswith(".tmp")]

    # and so does deploy, before it builds a Space of that model (it had built one of a config of three classes)
    space, deployed = tmp_path / "space", tmp_path / "to-deploy"
    res = run(["-m", "imagelab.deploy", "pets", "--model", deployed / "m.pkl", "--out", space])
    assert res.returncode == 0, res.stderr[-3000:]
    assert model_files(deployed) == before and not [p for p in deployed.iterdir() if p.name.endswith(".tmp")]
    assert json.loads(next(space.rglob("*.config.json")).read_text())["vocab"] == ["cats", "dogs"]


# An export of new files over `previous_model`'s, by a process that kills itself as it makes its KILL_AT-th move
# (counted over the install and its undoing), after a move that fails with a full disk at the FAIL_AT-th.
KILLED_AT_A_MOVE = """
import os, signal, sys
from pathlib import Path
from imagelab.export import staged_export
out, kill_at, fail_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
replace, moves = os.replace, []
def replace_or_die(src, dst):
    moves.append(dst)
    if len(moves) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if len(moves) == fail_at:
        raise OSError(28, "No space left on device")
    return replace(src, dst)
os.replace = replace_or_die
with staged_export(out) as (model, report):
    for path in (model, model.with_suffix(".onnx"), model.with_suffix(".safetensors"),
                 model.with_name("m.config.json"), report / "metrics.json", report / "examples" / "cats_0.jpg"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"new")
"""


# The install's moves: m.config.json, m.onnx, m.report stepping aside, m.report, m.safetensors, m.pkl; failing at the
# fourth, its undoing puts back m.config.json, m.onnx and m.report: the fifth to seventh.
@pytest.mark.parametrize("kill_at, fail_at", [*((k, 0) for k in range(1, 7)), *((k, 4) for k in range(5, 8))])
def test_kill_9_at_any_move_of_an_export_or_of_its_undoing_leaves_what_the_next_run_makes_whole(tmp_path, kill_at,
                                                                                                  fail_at):
    from imagelab.writes import remove_abandoned_staging
    out = tmp_path / "m.pkl"
    before = previous_model(tmp_path)
    res = run(["-c", KILLED_AT_A_MOVE, out, kill_at, fail_at])
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    remove_abandoned_staging(out)
    assert model_files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({n.split("/")[0] for n in before})


def test_a_graph_and_a_config_of_two_exports_are_refused_in_one_line(tiny_model, tmp_path):
    graph, config = tmp_path / "m.onnx", tmp_path / "m.config.json"
    shutil.copy(tiny_model.with_suffix(".onnx"), graph)  # two classes: cats, dogs
    settings = json.loads(tiny_model.with_name("pets.config.json").read_text())
    image = tiny_model.parent.parent / "data" / "cats" / "cats_0.jpg"
    for vocab in (["cats", "dogs", "frogs"], ["cats"]):  # before: labels of another model, or an IndexError
        config.write_text(json.dumps({**settings, "vocab": vocab}))
        res = run(["-m", "imagelab.predict", graph, image])
        fails_with_one_line(res, f"{graph} gives 2 class scores, but {config} names {len(vocab)} classes")


def test_a_file_or_folder_where_the_export_goes_is_refused_before_training(tmp_path):
    data = make_folder_dataset(tmp_path / "data")  # enough to train on: the old code trained, then refused
    for name, make in [("m.report", "touch"), ("m.onnx", "mkdir"), ("m.config.json", "mkdir")]:
        out = tmp_path / name.replace(".", "_") / "m.pkl"  # a folder of its own each
        out.parent.mkdir()
        getattr(out.with_name(name), make)()
        res = run([ROOT / "training" / "train_pets.py", "--data", data, "--out", out, *TRAIN])
        kind = "file" if make == "touch" else "folder"
        fails_with_one_line(res, f"cannot export to {out}: {out.with_name(name)} is a {kind}; move it away")
        assert "epoch" not in res.stdout and sorted(p.name for p in out.parent.iterdir()) == [name]
