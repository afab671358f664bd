"""The export's promise under interruption: Ctrl-C or `kill -9` at any point leaves the previous model whole, never
a mix of two; and what cannot be exported is refused before training, not after it."""
import signal

from conftest import ROOT, make_folder_dataset, run

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


def previous_model(folder):
    """A previous model's files in `folder` (not a real model: only whether each is kept byte for byte matters)."""
    files = {name: f"previous {name}".encode() for name in ("m.pkl", "m.onnx", "m.safetensors", "m.config.json",
                                                           "m.report/metrics.json", "m.report/examples/cats_0.jpg")}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def model_files(folder):
    """Every file of the model `m.pkl` in `folder`, and what it holds: its checkpoint, data and hidden files apart."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
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
