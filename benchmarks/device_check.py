"""Does every path work on this machine's accelerator? Train, export, load on a CPU, predict, kill and resume.

    python benchmarks/device_check.py                    # the best device there is (a CUDA GPU, MPS, the CPU)
    python benchmarks/device_check.py --device cpu

On generated images (two classes of coloured noise, so any working model learns them), each step runs
as a user would run it, in its own process: both trainers for 2 epochs on the device, the exported
learner and ONNX model loaded and used on the CPU in a fresh process that sees no GPU, a run killed
after its first checkpoint and resumed on the device (and on the CPU when it trained on a GPU: checkpoints move
between devices), on an accelerator also a run killed on the CPU and resumed there, on a CUDA GPU the classifier
in fp16 with loss scaling, and the classifier under `torchrun --nproc_per_node 1`. Those chains (each trainer with its loading, each kill and resume, torchrun) run
side by side. The last line printed is one JSON object:
the device, the precision the trainer chose, and "pass" or the failure for each step.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imagelab import ArgumentParser, run_cli
from imagelab.paths import checkpoint_path, metrics_path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CLASSES = {"red": (220, 60, 60), "blue": (60, 60, 220)}

# In a fresh process on the CPU: the learner through fastai, the ONNX model through the apps' Predictor.
LOAD_ON_CPU = """
import sys
import torch
from imagelab.loading import load_trusted_learner, open_model
from imagelab.paths import artifact_paths
assert not torch.cuda.is_available()
model, image, label = sys.argv[1:]
pkl = str(load_trusted_learner(model).predict(image)[0])
probs = open_model(artifact_paths(model)["onnx"], "classifier").predict(image, k=2)
assert pkl == max(probs, key=probs.get) == label, (pkl, probs, label)
print("pass")
"""

# The autoencoder's app serves the learner and the weights-only export; both must reconstruct on the CPU.
AE_ON_CPU = """
import sys
import numpy as np
import torch
from imagelab.loading import open_model
from imagelab.paths import artifact_paths
assert not torch.cuda.is_available()
model, image = sys.argv[1:]
for path in (model, artifact_paths(model)["weights"]):
    reconstruction = open_model(path, "autoencoder").reconstruct(image).reconstruction
    assert np.asarray(reconstruction).std() > 0, path
print("pass")
"""


def parse(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="where to train: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", help="the trainers' --precision")
    p.add_argument("--size", type=int, default=32, help="training size of both models")
    p.add_argument("--images", type=int, default=24, help="generated images per class")
    p.add_argument("--workdir", metavar="DIR", help="where data and models go (default: a temporary folder)")
    return p.parse_args(argv)


def make_images(root, n):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for name, color in CLASSES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = rng.integers(48, 96, size=2)
            pixels = np.clip(np.array(color) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.jpg")
    return root


def command(script, data, out, args, *extra):
    size = ["--size", str(args.size), "--bs", "8"]
    model = ["--no-pretrained", "--arch", "resnet18"] if script == "train_pets.py" else ["--code-size", "16"]
    return [f"training/{script}", "--data", str(data), "--epochs", "2", *model, *size, "--out", str(out),
            "--precision", args.precision, *extra]


def run(cmd, env=None, launcher=(PY,), timeout=900):
    """A step's process; returns 'pass' or the last line of what it said on failing."""
    res = subprocess.run([*launcher, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    if res.returncode == 0:
        return "pass", res.stdout
    lines = [line for line in (res.stderr or res.stdout).splitlines() if line.strip()]
    head = f"--- {' '.join(map(str, cmd))[:200]}: exit status {res.returncode}"
    print("\n".join([head, *lines[-60:]]), file=sys.stderr)  # one write: the steps run side by side
    # the error itself, not a launcher's closing banner
    errors = [line for line in lines if re.search(r"\w(Error|Exception): ", line)]
    return f"fail: {(errors or lines or [f'exit status {res.returncode}'])[-1]}", res.stdout


def trained(cmd, out, **kw):
    verdict, _ = run(cmd, **kw)
    if verdict == "pass" and not out.exists():
        return "fail: no model written"
    return verdict


def kill_after_first_checkpoint(cmd, ckpt, env=None, timeout=600):
    """Start a run and SIGKILL it once it has written a checkpoint: 'pass' if it did, else why not."""
    proc = subprocess.Popen([PY, *cmd], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "pass" if ckpt.exists() else "fail: no checkpoint before the run ended"


def device_type(name):
    """What `--device name` trains on: 'cuda', 'mps' or 'cpu'."""
    from imagelab.device import pick_device
    return pick_device(name).type


def metrics(model):
    return json.loads(metrics_path(model).read_text())


def main(argv=None):
    args = parse(argv)
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        data = make_images(work / "data", args.images)
        image = str(next((data / "red").iterdir()))

        def train_and_load(kind, script, out, load, *load_args):
            """A trainer's run on the device, then its exports used on the CPU in a fresh process."""
            steps = {kind: trained(command(script, data, out, args, "--device", args.device), out)}
            if steps[kind] == "pass":
                steps[f"{kind}_on_cpu"] = run(["-c", load, str(out), image, *load_args], env=no_gpu)[0]
            return steps

        def kill_and_resume():
            resumed = work / "resumed" / "pets.pkl"
            ckpt = checkpoint_path(resumed)
            cmd = command("train_pets.py", data, resumed, args, "--device", args.device, "--checkpoint-every", "0")
            steps = {"killed_after_a_checkpoint": kill_after_first_checkpoint(cmd, ckpt)}
            if steps["killed_after_a_checkpoint"] != "pass":
                return steps
            kept = shutil.copy(ckpt, work / "killed.ckpt")  # resuming removes it
            steps["resumed"] = trained(command("train_pets.py", data, resumed, args, "--resume", "--device",
                                               args.device), resumed)
            if steps["resumed"] == "pass" and not metrics(resumed)["device"].startswith("cpu"):
                # a run interrupted on a GPU goes on on the CPU too: a checkpoint does not tie a run to its device
                on_cpu = work / "resumed_on_cpu" / "pets.pkl"
                on_cpu.parent.mkdir()
                shutil.copy(kept, checkpoint_path(on_cpu))
                steps["resumed_on_cpu"] = trained(command("train_pets.py", data, on_cpu, args, "--resume", "--device",
                                                          "cpu"), on_cpu, env=no_gpu)
            return steps

        def from_cpu_to_device():
            """A run killed on the CPU after its first checkpoint goes on on the device (the other way round from
            `kill_and_resume`'s resume on the CPU)."""
            moved = work / "from_cpu" / "pets.pkl"
            cmd = command("train_pets.py", data, moved, args, "--device", "cpu", "--checkpoint-every", "0")
            steps = {"killed_on_cpu": kill_after_first_checkpoint(cmd, checkpoint_path(moved), env=no_gpu)}
            if steps["killed_on_cpu"] == "pass":
                steps["resumed_on_device_from_cpu"] = trained(command("train_pets.py", data, moved, args, "--resume",
                                                                      "--device", args.device), moved)
            return steps

        def torchrun():
            one = work / "torchrun" / "pets.pkl"
            return {"torchrun_1_process": trained(
                command("train_pets.py", data, one, args, "--device", args.device), one,
                # --standalone: a free port, not torchrun's fixed 29500, which another launch may hold
                launcher=(PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"))}

        def fp16():
            """fp16 with loss scaling, what `--precision auto` picks on GPUs without bf16 (Colab's and Kaggle's T4),
            on whatever GPU this is."""
            half = work / "fp16" / "pets.pkl"
            step = trained(command("train_pets.py", data, half, args, "--device", args.device, "--precision", "fp16"),
                           half)
            if step == "pass" and metrics(half)["precision"] != "fp16":
                step = f"fail: trained in {metrics(half)['precision']}"
            return {"classifier_fp16": step}

        # The chains are independent: side by side, each in its own processes (a machine with a GPU has the cores)
        chains = [lambda: train_and_load("classifier", "train_pets.py", work / "pets" / "pets.pkl", LOAD_ON_CPU, "red"),
                  lambda: train_and_load("autoencoder", "train_autoencoder.py", work / "ae" / "ae.pkl", AE_ON_CPU),
                  kill_and_resume, torchrun]
        kind = device_type(args.device)
        if kind != "cpu":
            chains.append(from_cpu_to_device)
        if kind == "cuda":
            chains.append(fp16)
        with ThreadPoolExecutor(len(chains)) as pool:
            steps = {k: v for done in pool.map(lambda chain: chain(), chains) for k, v in done.items()}
        pets = work / "pets" / "pets.pkl"
        # what the trainer chose; its speed here, beside three other runs, says nothing (train_speed.py does)
        facts = {k: metrics(pets)[k] for k in ("device", "precision")} if pets.exists() else {}
    out = {**facts, "steps": steps, "passed": all(v == "pass" for v in steps.values())}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_cli(main)
