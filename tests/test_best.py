"""Better models from the same run, and why: the best epoch kept, early stopping, both through --resume."""
import json
import signal

import pytest
import torch
from fastai.learner import load_learner
from safetensors.torch import load_file

from conftest import make_folder_dataset, run
from test_resume import interrupt_after_an_epoch

# At this rate the second epoch of these tiny runs validates worse than the first (asserted below, not assumed).
WORSE_LAST = ["--no-pretrained", "--arch", "resnet18", "--epochs", "3", "--size", "32", "--bs", "4", "--workers", "0",
              "--seed", "3", "--no-presize", "--lr", "0.01", "--patience", "1"]


def metrics(out):
    return json.loads(out.with_name(out.stem + ".report").joinpath("metrics.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("best") / "data", n=16)


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped") / "pets.pkl"
    res = run(["training/train_pets.py", "--data", data, *WORSE_LAST, "--out", out])
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_early_stopping_exports_the_best_epoch_not_the_worse_last(stopped):
    out, res = stopped
    m = metrics(out)
    first, second = m["valid_loss_per_epoch"]  # patience 1: the worse second epoch ends a run of 3
    assert second > first
    assert (m["kept"], m["kept_epoch"], m["epochs_trained"], m["stopped_early"]) == ("best", 1, 2, True)
    assert m["valid_loss"] == pytest.approx(first, rel=1e-3)  # the report judges the kept weights
    assert "early stopping" in res.stdout
    assert "with the weights of epoch 1 of 2 (lowest validation loss), stopped early" in res.stdout.splitlines()[-1]
    learner = load_learner(out).model.state_dict()  # the weights-only copy is the same kept model
    for name, t in load_file(out.with_suffix(".safetensors")).items():
        assert torch.equal(t, learner[name]), name


def test_keep_last_exports_the_last_epoch(data, tmp_path):
    out = tmp_path / "pets.pkl"
    res = run(["training/train_pets.py", "--data", data, *WORSE_LAST, "--keep", "last", "--out", out])
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(out)
    assert (m["kept"], m["kept_epoch"], m["epochs_trained"]) == ("last", 2, 2)
    assert m["valid_loss"] == pytest.approx(m["valid_loss_per_epoch"][1], rel=1e-3)
    assert "with the weights of epoch 2 of 2, stopped early" in res.stdout.splitlines()[-1]


def test_best_epoch_and_patience_survive_a_kill_and_resume(data, stopped, tmp_path):
    out = tmp_path / "pets.pkl"
    args = ["training/train_pets.py", "--data", data, *WORSE_LAST, "--out", out]
    code, _, killed_at = interrupt_after_an_epoch(args, out.with_name("pets.ckpt"), signal.SIGKILL)
    assert code == -signal.SIGKILL and killed_at == 1
    res = run([*args, "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(out)
    assert (m["kept_epoch"], m["epochs_trained"], m["stopped_early"]) == (1, 2, True)
    resumed, whole = load_learner(out).model.state_dict(), load_learner(stopped[0]).model.state_dict()
    for name, t in whole.items():
        if t.is_floating_point():
            assert torch.allclose(t, resumed[name], rtol=1e-3, atol=1e-4), name

