"""Interrupted training: checkpoints after epochs, --resume to the same result, the model replaced only at the end."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from fastai.learner import load_learner

from conftest import (PY, ROOT, epoch_table, hub_cache_with_weights, interruptible, make_folder_dataset, read_until,
                      run, script_main)
from imagelab import UserError

EPOCHS = 4


def command(data, out, *extra):
    return ["training/train_pets.py", "--data", data, "--no-pretrained", "--arch", "resnet18", "--epochs", EPOCHS,
            "--size", "32", "--bs", "4", "--workers", "0", "--seed", "3", "--out", out, *extra]


def saved_epoch(ckpt):
    try:
        return torch.load(ckpt, weights_only=False, mmap=True)["epoch"]  # mmap: the epoch without reading the weights
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


def interrupt_after_an_epoch(args, ckpt, sig, timeout=180, env=None, epoch=None, log=None):
    """Start a real run that saves every epoch and send `sig` once it has saved one of its own (or `epoch`), but is
    not done. `log`: a file for its standard output, unbuffered (the epoch table's row is printed before the
    checkpoint is saved)."""
    before = saved_epoch(ckpt) if epoch is None else epoch - 1
    with open(log or "/dev/null", "w") as stdout:
        proc = subprocess.Popen([PY, *map(str, args), "--checkpoint-every", "0"], cwd=ROOT, stdout=stdout,
                                stderr=subprocess.PIPE, text=True, env={**(env or os.environ), "PYTHONUNBUFFERED": "1"},
                                preexec_fn=interruptible)
        deadline = time.monotonic() + timeout
        while saved_epoch(ckpt) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    return proc.returncode, err, saved_epoch(ckpt)


def ended_pid():
    """The process ID of a process that has ended."""
    proc = subprocess.Popen([PY, "-c", ""])
    proc.wait()
    return proc.pid


def test_only_staging_paths_of_ended_processes_are_removed(tmp_path):
    from imagelab.writes import remove_abandoned_staging, staging_path

    model = tmp_path / "m[1].pkl"  # a name with glob characters matches itself only
    mine, ended = staging_path(model), model.with_name(f".m[1].pkl.{ended_pid()}.7.tmp")
    other = tmp_path / f".m1.pkl.{ended_pid()}.7.tmp"  # another model's, which m[1] read as a pattern would match
    for p in (mine, ended, other, model.with_name(".m[1].pkl.notes.tmp")):
        p.write_text("x")
    remove_abandoned_staging(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name, ".m[1].pkl.notes.tmp"])


def weights(model):
    return load_learner(model).model.state_dict()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("resume") / "data", n=16)


def test_sigkill_then_ctrl_c_then_resume_ends_like_an_uninterrupted_run(data, tmp_path):
    whole = tmp_path / "whole" / "pets.pkl"
    uninterrupted = run(command(data, whole))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    out = tmp_path / "resumed" / "pets.pkl"
    ckpt = out.with_name("pets.ckpt")
    out.parent.mkdir()
    out.write_bytes(b"previous model")

    code, _, killed_at = interrupt_after_an_epoch(command(data, out), ckpt, signal.SIGKILL)
    assert code == -signal.SIGKILL and 1 <= killed_at < EPOCHS
    assert out.read_bytes() == b"previous model"  # nothing exported yet
    code, err, stopped_at = interrupt_after_an_epoch(command(data, out, "--resume"), ckpt, signal.SIGINT)
    assert code == 130, err[-2000:]
    assert "Traceback" not in err and "--resume" in err and killed_at < stopped_at < EPOCHS
    assert f"holds the run after epoch {stopped_at}" in err
    assert out.read_bytes() == b"previous model"

    # what a run killed mid-write would have left: a checkpoint's staging file and an export's staging folder
    leftovers = [out.with_name(f".pets.ckpt.{ended_pid()}.1.tmp"), out.with_name(f".pets.pkl.{ended_pid()}.1.tmp")]
    leftovers[0].write_bytes(b"half a checkpoint")
    leftovers[1].mkdir()
    (leftovers[1] / "pets.pkl").write_bytes(b"half a model")
    res = run(command(data, out, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming after epoch {stopped_at} of {EPOCHS}" in res.stdout
    assert not ckpt.exists(), "a finished run leaves no checkpoint"
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "pets.config.json", "pets.onnx", "pets.pkl", "pets.report", "pets.safetensors"]

    a = json.loads(whole.with_name("pets.report").joinpath("metrics.json").read_text())
    b = json.loads(out.with_name("pets.report").joinpath("metrics.json").read_text())
    assert b["resumed_after_epoch"] == stopped_at
    assert b["accuracy"] == a["accuracy"]
    assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-3)
    wa, wb = weights(whole), weights(out)
    for name, t in wa.items():
        if t.is_floating_point():
            assert torch.allclose(t, wb[name], rtol=1e-3, atol=1e-4), name
    # the loss curve covers the whole run: one validation point per epoch
    assert len(b["valid_loss_per_epoch"]) == len(a["valid_loss_per_epoch"]) == EPOCHS
    # the epoch table's rows too, the smoothed train_loss going on from where the killed run left it
    rows = epoch_table(res.stdout)
    assert list(rows) == list(range(stopped_at + 1, EPOCHS + 1))
    for epoch, losses in rows.items():
        assert losses == pytest.approx(epoch_table(uninterrupted.stdout)[epoch], rel=1e-3), epoch


def fine_tuning(data, tmp_path, epochs):
    """(env, args(out, *extra)): a fine-tuning run of `epochs` after the frozen one, its weights in an offline Hub
    cache."""
    pretrained = [a for a in command(data, "X") if a != "--no-pretrained"] + ["--epochs", str(epochs)]

    def args(out, *extra):
        return [str(out) if a == "X" else a for a in pretrained] + list(extra)
    return hub_cache_with_weights(tmp_path / "hf"), args


def test_fine_tuning_resumes_between_its_fits_and_inside_its_unfrozen_fit(data, tmp_path):
    """fine_tune is two fits. Killed after the frozen epoch, the resumed run goes straight into the second; killed
    again after the unfrozen fit's first epoch, the next goes on with that fit's optimizer moments (fastai's unfreeze,
    at the fit's start, clears them: the resumed fit must not start them afresh). It ends as the whole run."""
    env, args = fine_tuning(data, tmp_path, epochs=2)
    whole, out, log = tmp_path / "whole.pkl", tmp_path / "resumed.pkl", tmp_path / "between.log"
    ckpt = out.with_name("resumed.ckpt")
    uninterrupted = run(args(whole), env=env)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    whole_table = epoch_table(uninterrupted.stdout)
    assert list(whole_table) == [1, 2, 3]  # numbered over both fits, as the run's last line counts them
    code, _, killed_at = interrupt_after_an_epoch(args(out), ckpt, signal.SIGKILL, env=env)
    assert code == -signal.SIGKILL and killed_at == 1  # the frozen epoch, of 1 + 2

    code, err, killed_at = interrupt_after_an_epoch(args(out, "--resume"), ckpt, signal.SIGKILL, env=env, epoch=2,
                                                    log=log)
    assert code == -signal.SIGKILL and killed_at == 2, err[-3000:]  # the unfrozen fit's first epoch
    assert "resuming after epoch 1 of 3" in log.read_text()
    # the unfrozen fit smooths its train_loss afresh, as fastai's Recorder does at each fit, resumed or not
    assert epoch_table(log.read_text())[2] == pytest.approx(whole_table[2], rel=1e-3)

    res = run(args(out, "--resume"), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming after epoch 2 of 3" in res.stdout and list(epoch_table(res.stdout)) == [3]
    assert epoch_table(res.stdout)[3] == pytest.approx(whole_table[3], rel=1e-3)
    a = json.loads((tmp_path / "whole.report" / "metrics.json").read_text())
    b = json.loads((tmp_path / "resumed.report" / "metrics.json").read_text())
    assert a["pretrained"] and b["accuracy"] == a["accuracy"]
    assert b["valid_loss_per_epoch"] == pytest.approx(a["valid_loss_per_epoch"], rel=1e-3)
    wa, wb = weights(whole), weights(out)
    for name, t in wa.items():
        if t.is_floating_point():
            assert torch.allclose(t, wb[name], rtol=1e-3, atol=1e-4), name


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line(data, tmp_path):
    out = tmp_path / "pets.pkl"
    out.with_name("pets.ckpt").mkdir()  # where the checkpoint would go: its rename fails
    res = run(command(data, out, "--epochs", "2", "--checkpoint-every", "0"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "Warning" not in res.stderr, res.stderr[-3000:]
    # the system's reason alone: a folder in the way is no full disk, whose free space the line would name
    assert res.stderr.strip().splitlines()[-1] == f"error: cannot write the checkpoint {out.with_name('pets.ckpt')}: " \
        "Is a directory"
    assert not out.exists()


def test_resume_refuses_other_settings_other_images_and_missing_checkpoints(data, tmp_path, capsys, monkeypatch):
    """The refusals that come before any training are train_pets.py's main in this process (the line is the
    UserError's); those that need the images read, or a run, are real runs."""
    main = script_main("train_pets")

    def refused(args, says):
        with pytest.raises(UserError) as e:
            main(list(map(str, args[1:])))
        assert says in str(e.value), str(e.value)
        return capsys.readouterr()

    data, out = shutil.copytree(data, tmp_path / "data"), tmp_path / "pets.pkl"
    res = run(command(data, out, "--resume"))
    assert res.returncode == 2 and res.stderr.strip() == f"error: nothing to resume: no checkpoint at {out.with_name('pets.ckpt')}"
    code, _, _ = interrupt_after_an_epoch(command(data, out), out.with_name("pets.ckpt"), signal.SIGKILL)
    assert code == -signal.SIGKILL
    said = refused(command(data, out, "--resume", "--size", "48"), "other settings: --size 32 (now 48)")
    assert " images (" not in said.out  # refused before the images were read (a large folder takes minutes)
    elsewhere = shutil.copytree(data, tmp_path / "elsewhere")  # the same images in another folder: other data
    said = refused(command(elsewhere, out, "--resume"), f"--data {str(data)!r} (now {str(elsewhere)!r})")
    assert "checking images" not in said.err and " images (" not in said.out
    said = refused(command(data, out, "--arch", "no_such_net"), "no_such_net")  # an error, not a note about it
    assert "note:" not in said.out
    # the same folder spelled from another working folder is the same data: only --epochs differs
    monkeypatch.chdir(tmp_path)
    refused(command(data.relative_to(tmp_path), out, "--resume", "--epochs", "1"),
            "other settings: --epochs 4 (now 1); rerun")
    monkeypatch.chdir(ROOT)
    ckpt = out.with_name("pets.ckpt")  # one another version wrote: refused in one line, not half read
    state = torch.load(ckpt, weights_only=False)
    torch.save({**state, "format": "imagelab-checkpoint/1"}, ckpt)
    refused(command(data, out, "--resume"), f"the checkpoint {ckpt} was written by another version of imagelab: run "
                                            "without --resume to start afresh")
    torch.save(state, ckpt)

    next(data.glob("*/*.jpg")).unlink()  # one image fewer reshuffles the seeded split: the run cannot go on
    res = run(command(data, out, "--resume"))
    assert res.returncode == 2 and "other settings: images " in res.stderr and "same options and images" in res.stderr
    res = run(command(data, out, "--time-budget", "0.001"))  # a fresh run is told about the checkpoint
    assert "holds an interrupted run" in res.stdout and res.returncode == 2 and "before the first batch" in res.stderr


def test_ctrl_c_before_the_first_checkpoint_says_a_rerun_starts_afresh(data, tmp_path):
    out = tmp_path / "pets.pkl"
    args = command(data, out, "--checkpoint-every", "3600", "--epochs", "40")
    proc = subprocess.Popen([PY, *map(str, args)], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=interruptible)
    read_until(proc.stdout, "^epoch", timeout=180)  # the epoch table's header: training has begun
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-2:] == [
        "no checkpoint yet (one is saved after an epoch once 3600 s have passed, --checkpoint-every): a rerun starts "
        "afresh", "interrupted: nothing was exported"]
    assert not out.with_name("pets.ckpt").exists() and not out.exists()


@pytest.mark.parametrize("every, saved", [(0, [1, 2, 3]), (3600, [0, 0, 3])])
def test_checkpoints_are_written_every_so_often_and_after_a_fits_last_epoch(tmp_path, every, saved):
    from fastai.callback.core import Callback
    from fastai.test_utils import synth_learner
    from imagelab.checkpoint import Checkpoint, Writer

    ckpt, seen, writer = tmp_path / "m.ckpt", [], Writer()

    class Look(Callback):
        order = Checkpoint.order + 1

        def after_epoch(self):
            writer.wait()
            seen.append(saved_epoch(ckpt))  # 0: none written
            ckpt.unlink(missing_ok=True)

    synth_learner().fit(3, cbs=[Checkpoint(ckpt, {}, dict, writer, every=every), Look()])
    assert seen == saved


def test_a_checkpoint_written_while_training_goes_on_holds_its_epochs_state(tmp_path):
    """The disk is written in the background: what lands there is the epoch's state, not what training made
    of it since."""
    import threading

    from fastai.test_utils import synth_learner
    from imagelab import UserError
    from imagelab.checkpoint import Checkpoint, Writer

    class SlowDisk(Writer):
        released = threading.Event()

        def _write(self, *args):
            self.released.wait(timeout=60)
            super()._write(*args)

    ckpt, writer, learn, history = tmp_path / "m.ckpt", SlowDisk(), synth_learner(), [1.0]
    learn.fit(1, cbs=[Checkpoint(ckpt, {}, lambda: {"history": history}, writer)], lr=0.1)
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    moments = [{k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
               for s in learn.opt.state_dict()["state"]]
    learn.fit(2, lr=0.1)  # in place: the weights and the optimizer's moments change under the pending write
    history.append(0.5)
    assert not torch.equal(learn.model.a, weights["a"]) and not ckpt.exists()
    SlowDisk.released.set()
    writer.wait()
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 1 and state["history"] == [1.0]
    assert state["model"].keys() == weights.keys()
    assert all(torch.equal(state["model"][k], v) for k, v in weights.items())
    assert hasattr(state["model"], "_metadata")  # layers' versions, which load_state_dict reads
    for saved, then in zip(state["opt"]["state"], moments):
        assert all(torch.equal(saved[k], v) for k, v in then.items())
    assert [p.name for p in tmp_path.iterdir()] == ["m.ckpt"]  # no temporary file left

    writer.write({"epoch": 1}, tmp_path / "m.ckpt" / "inside_a_file")
    with pytest.raises(UserError, match="cannot write the checkpoint"):
        writer.wait()
