"""The speed benchmark end to end on tiny generated data: every run finishes and the JSON has every number.

No speedup is asserted here: the suite's machine is shared and noisy; README.md has a real run's numbers.
"""
import json

from conftest import make_folder_dataset, run

KEYS = {"recipe_images_per_s", "ours_images_per_s", "speedup", "recipe_accuracy", "ours_accuracy",
        "recipe_seconds", "ours_seconds", "preset_accuracy", "preset_seconds", "preset_epochs",
        "fixed_size_images_per_s", "fixed_size_speedup", "fixed_size_accuracy", "fixed_size_seconds",
        "accuracy_standard_error", "ours_start_size", "files_images_per_s", "files_speedup", "files_accuracy",
        "files_seconds", "busy", "device", "precision", "fp32_images_per_s", "precision_speedup", "fp32_accuracy",
        "fp32_seconds"}


def test_benchmark_prints_one_json_object_last(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n=10)
    res = run(["benchmarks/train_speed.py", "--data", data, "--size", "32", "--epochs", "1", "--bs", "4",
               "--device", "cpu", "--precision", "bf16", "--workdir", tmp_path / "work"])
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert KEYS <= set(out), KEYS - set(out)
    assert out["train_images"] + out["valid_images"] == 20 and out["valid_images"] == 4
    for key in ("recipe_images_per_s", "ours_images_per_s", "fixed_size_images_per_s", "files_images_per_s",
                "fp32_images_per_s", "recipe_seconds", "ours_seconds", "fixed_size_seconds", "files_seconds",
                "fp32_seconds", "preset_seconds"):
        assert out[key] > 0, key
    for key in ("recipe_accuracy", "ours_accuracy", "fixed_size_accuracy", "files_accuracy", "fp32_accuracy",
                "preset_accuracy"):
        assert 0 <= out[key] <= 1, key
    assert out["speedup"] == round(out["ours_images_per_s"] / out["recipe_images_per_s"], 2) or \
        abs(out["speedup"] - out["ours_images_per_s"] / out["recipe_images_per_s"]) < 0.02
    assert out["ours_start_size"] == 16  # the trainer's default: half of --size
    # ours in bf16, and beside it the same trainer in fp32
    assert (out["device"], out["precision"]) == ("cpu", "bf16")
    assert set(out["busy"]) == {"recipe", "ours", "fixed", "files", "fp32"}
    # the recipe and ours saw the same split: the links in work/split, train/ and valid/
    assert len(list((tmp_path / "work" / "split" / "valid").rglob("*.jpg"))) == 4


def test_autoencoder_benchmark_times_both_data_paths(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n=10)
    res = run(["benchmarks/autoencoder_speed.py", "--data", data, "--size", "16", "--epochs", "1", "--bs", "4",
               "--code-size", "8", "--device", "cpu", "--precision", "fp32"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "decoded 20 images into memory" in res.stdout  # `memory` did, and only it
    assert res.stdout.count("images into memory") == 1
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["train_images"] == 16 and out["valid_images"] == 4 and out["files_workers"] == 0
    for key in ("memory_images_per_s", "files_images_per_s", "memory_seconds", "files_seconds", "speedup"):
        assert out[key] > 0, key
    for key in ("memory_ratio_to_pca", "files_ratio_to_pca"):
        assert 0 < out[key] < 2, key
    assert set(out["busy"]) == {"memory", "files"}


def test_a_run_that_fails_before_training_neither_stops_nor_holds_up_the_others():
    """Every run waits for the others to be ready to train (their set-up out of its timed turns); one that fails
    first is not waited for, and the runs that finish are measured (the benchmark prints them with `errors`)."""
    import sys
    import threading
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_speed import Turns
    turns, order = Turns(["ours", "recipe", "files"]), []

    def trains(name):
        def run():
            order.append(("ready", name))
            turns.wait_for_all(name)
            for _ in range(3):
                turns.take(name)
                order.append(name)
                turns.give(name)
            return name
        return run

    def fails():
        raise RuntimeError("set-up failed")
    result = {}
    main = threading.Thread(target=lambda: result.update(turns.run(
        {"ours": trains("ours"), "recipe": fails, "files": trains("files")})), daemon=True)
    main.start()
    main.join(30)
    assert not main.is_alive() and result == {"ours": "ours", "files": "files"}
    assert list(turns.errors) == ["recipe"] and str(turns.errors["recipe"]) == "set-up failed"
    assert {e for e in order[:2]} == {("ready", "ours"), ("ready", "files")}  # nobody trained before both were ready
    assert order[2:] == ["ours", "files"] * 3  # then turn by turn


def test_the_warm_up_before_timed_gpu_runs_runs_on_any_device():
    """train_speed's untimed warm-up (on a GPU) is a few plain steps: here on the CPU, at tiny sizes."""
    import sys
    import torch
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_speed import warm_up
    warm_up("resnet18", {16, 24}, 2, "bf16", torch.device("cpu"), seed=0)
