"""Training on any torch device, in any precision: what can be checked on a CPU (device_check.py runs on a GPU too)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from imagelab import UserError
from imagelab.device import pick_device, pick_precision
from imagelab.loading import load_trusted_learner
from conftest import make_folder_dataset, run, train_tiny


def test_device_check_passes_every_step_on_the_cpu():
    res = run(["benchmarks/device_check.py", "--device", "cpu"], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert line["device"] == "cpu" and line["precision"] == "fp32"
    assert line["steps"] == dict.fromkeys(["classifier", "classifier_on_cpu", "autoencoder", "autoencoder_on_cpu",
                                           "killed_after_a_checkpoint", "resumed", "torchrun_1_process"], "pass")
    assert line["passed"] is True


@pytest.mark.parametrize("device, precision, says", [
    ("tpu", "auto", "unknown --device 'tpu'"),
    ("cuda:99", "auto", "--device cuda:99: "),  # no such GPU on any machine
    ("cpu", "fp16", "--precision fp16 needs a CUDA GPU"),
    ("cpu", "int8", "unknown --precision 'int8'"),
])
def test_devices_and_precisions_that_cannot_work_are_refused(device, precision, says):
    with pytest.raises(UserError, match=says.replace("(", r"\(")):
        pick_precision(precision, pick_device(device))


def test_auto_trains_in_fp32_on_a_cpu():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_precision("auto", torch.device("cpu")) == "fp32"


def test_bf16_autocast_trains_and_everything_exported_is_fp32_on_the_cpu(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n=8)
    out = tmp_path / "m" / "pets.pkl"
    train_tiny(data, out, "--precision", "bf16", "--device", "cpu")
    m = json.loads((out.with_name("pets.report") / "metrics.json").read_text())
    assert (m["device"], m["precision"]) == ("cpu", "bf16")
    learn = load_trusted_learner(out)
    assert {(p.dtype, p.device.type) for p in learn.model.parameters()} == {(torch.float32, "cpu")}
    assert not [cb for cb in learn.cbs if type(cb).__name__ in ("Autocast", "MixedPrecision")]
    assert {v.dtype for k, v in load_file(out.with_name("pets.safetensors")).items()
            if v.is_floating_point()} == {torch.float32}
