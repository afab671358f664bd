"""The unchanged training script under `accelerate launch`: two CPU processes (gloo), one report, one model."""
import json
import subprocess

from conftest import PY, ROOT, free_port, make_folder_dataset, write_image

# accelerate's --cpu launches one process unless MPI is set up; --multi_gpu starts torchrun's processes,
# which use the CPU and gloo when there is no GPU (imagelab.distributed). Mixed precision as a user's `accelerate
# config` may set it: the trainer's --precision decides, and Accelerate's own must not wrap the exported model.
def launch():
    """`accelerate launch` of two processes, on a free port: two launches at once (test workers) on the default one
    would join each other's process group."""
    return [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def test_two_cpu_processes_train_and_only_the_main_one_writes(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n=10)
    out = tmp_path / "models" / "pets.pkl"
    res = subprocess.run([*launch(), "training/train_pets.py", "--data", data, "--no-pretrained", "--arch", "resnet18",
                          "--epochs", "2", "--size", "32", "--bs", "4", "--out", out],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1, res.stdout[-2000:]  # one process reports and exports
    assert res.stdout.count(" to train, ") == 1, res.stdout[-2000:]  # and says what it found
    assert sorted(p.name for p in out.parent.iterdir()) == [  # no checkpoint, no temporaries
        "pets.config.json", "pets.onnx", "pets.pkl", "pets.report", "pets.safetensors"]
    m = json.loads((out.with_name("pets.report") / "metrics.json").read_text())
    assert m["processes"] == 2
    assert sum(m["counts"]["valid"].values()) == sum(map(sum, m["confusion_matrix"])) == 4  # every held-out image once
    assert len(m["valid_loss_per_epoch"]) == 2

    img = write_image(tmp_path / "big.jpg", (220, 60, 60), size=(1200, 900))
    code = ("import json, sys; from imagelab.inference import Predictor\n"
            "print(json.dumps(Predictor(sys.argv[1]).predict(sys.argv[2], k=2)))")
    res = subprocess.run([PY, "-c", code, str(out), str(img)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    probs = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(probs) == {"cats", "dogs"} and abs(sum(probs.values()) - 1) < 1e-4
