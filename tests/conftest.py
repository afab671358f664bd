"""Shared test helpers: generated image folders, a tiny trained model, apps run as real servers."""
import atexit
import codecs
import importlib.util
import io
import os
import pickle
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import gradio_client
import numpy as np
import pytest
from filelock import FileLock
from PIL import Image

# Under pytest-xdist the workers share the cores: each gets its share of math threads, so two trainings do
# not fight over them. A test that spawns a training passes this on with the environment.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# What the tests write outside their tmp_path (presized copies, the servers' logs and uploads) goes in one
# folder per test process, removed when it exits: not the user's ~/.cache/imagelab, nor left behind in /tmp.
# xdist starts its workers after this runs, so they share the first process's cache, which outlives them.
SCRATCH = Path(tempfile.mkdtemp(prefix="imagelab-tests-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
os.environ.setdefault("IMAGELAB_CACHE", str(SCRATCH / "cache"))
os.environ.setdefault("GRADIO_TEMP_DIR", str(SCRATCH / "gradio"))
(SCRATCH / "tmp").mkdir()
os.environ["TMPDIR"] = str(SCRATCH / "tmp")  # for the processes the tests start (torchrun's leave folders there)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SHARED = ROOT.parent / "shared" / "data"


def write_image(path, color, size=(48, 40), seed=0, fmt=None):
    """A noisy image around `color`: two colours make classes a tiny model can tell apart."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def shapes(path, seed):
    """A picture with shapes at every scale, as a photo has (a perceptual hash reads them; noise alone has none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), np.uint8)
    Image.fromarray(grid).resize((128, 96), Image.Resampling.BICUBIC).save(path)
    return path


@pytest.fixture
def decodes(monkeypatch):
    """What PIL opens while a test runs, through PIL's own `Image.open`: making a fingerprint opens its file once."""
    opened, pil_open = [], Image.open

    def counted(fp, *args, **kwargs):
        opened.append(fp)
        return pil_open(fp, *args, **kwargs)
    monkeypatch.setattr(Image, "open", counted)
    return opened


def make_folder_dataset(root, n=12, classes=(("cats", (220, 60, 60)), ("dogs", (60, 60, 220))), seed=0):
    """`n` images of each class; `seed`: the first image's noise (another for a valid/ folder: the same seeds would
    make copies of train/'s images, which do not train)."""
    for label, color in classes:
        for i in range(n):
            write_image(root / label / f"{label}_{i}.jpg", color, seed=seed + i)
    return root


def interruptible():
    """`preexec_fn` of a child the test stops with SIGINT: a job started in the background by a shell (nohup,
    `&`) inherits SIGINT ignored, and then Python never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_until(stream, pattern, timeout):
    """What a child's pipe `stream` gives until the regular expression `pattern` matches (at a line's start with
    `^`, after a newline or a progress bar's carriage return), the child closes it, or `timeout` seconds pass:
    bounded, however little the child writes. A file read waits for its next character, or line, as long as it takes."""
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(errors="replace"), translate=True)
    seen, deadline = "", time.monotonic() + timeout
    while not re.search(pattern, seen, re.MULTILINE) and (left := deadline - time.monotonic()) > 0:
        if select.select([stream], [], [], left)[0]:
            chunk = os.read(stream.fileno(), 1 << 16)
            if not chunk:
                break
            seen += decoder.decode(chunk)
    return seen


def run(args, timeout=300, **kwargs):
    """A project command as a subprocess, like a user would run it; output captured as text."""
    return subprocess.run([PY, *map(str, args)], cwd=kwargs.pop("cwd", ROOT), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def fails_with_one_line(res, *fragments):
    """A command that stopped on a user error: exit status 2 and one line on stderr that names every fragment."""
    assert res.returncode == 2, res.stderr[-3000:]
    # progress bars (tqdm's "3/6 [00:01<...") are redrawn in place on a terminal and vanish when done
    lines = [line for line in res.stderr.splitlines() if line.strip() and not re.search(r"\d+/\d+ \[", line)]
    assert len(lines) == 1, res.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def epoch_table(stdout):
    """The epoch table a training run printed: {the row's epoch number: (train loss, valid loss)}."""
    rows = [re.match(r"(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s", line) for line in stdout.splitlines()]
    return {int(m[1]): (float(m[2]), float(m[3])) for m in rows if m}


def in_fresh_process(code, *args, cwd, env=None, timeout=180):
    """Run Python `code` in a new interpreter started in `cwd` (not this repository); returns its last stdout line."""
    res = subprocess.run([PY, "-c", code, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1]


def script_main(name):
    """`main` of training/<name>.py, to call in this process: for what a run decides before it trains (a refusal is
    the UserError whose line run_cli prints), without a process start and a training stack's import each."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def train_tiny(data, out, *extra, timeout=300, cwd=ROOT, script="train_pets.py"):
    res = run([ROOT / "training" / script, "--data", data, "--no-pretrained", "--arch", "resnet18",
               "--epochs", "1", "--size", "32", "--bs", "8", "--workers", "0", "--out", out, *extra],
              timeout=timeout, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def once_per_run(tmp_path_factory, name, build):
    """`build(folder)`'s result, built once per test run: the pytest-xdist processes share it (the first to
    ask builds it, the others wait for it). What it returns must pickle; tests copy what they change."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each process's own
    folder, result = root / name, root / f"{name}.pickle"
    with FileLock(root / f"{name}.lock"):
        if not result.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            result.write_bytes(pickle.dumps(build(folder)))
        return pickle.loads(result.read_bytes())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A resnet18 trained for one epoch on 32-px generated images, exported with its report."""
    def build(tmp):
        out = tmp / "models" / "pets.pkl"
        train_tiny(make_folder_dataset(tmp / "data"), out)
        return out
    return once_per_run(tmp_path_factory, "tiny", build)


def hub_cache_with_weights(home, arch="resnet18"):
    """A Hugging Face cache (HF_HOME) holding `arch`'s timm checkpoint file, with random weights.

    The pretrained code path (Hub cache lookup, timm loading, fine_tune) then runs for real offline;
    only the numbers in the file are not ImageNet's.
    """
    import timm
    from safetensors.torch import save_file
    cfg = timm.models.get_pretrained_cfg(arch)
    repo = Path(home) / "hub" / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    model = timm.create_model(arch, pretrained=False)
    save_file(model.state_dict(), snapshot / (cfg.hf_hub_filename or "model.safetensors"))
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


AE_TINY = ["--size", "16", "--depth", "2", "--width", "8", "--code-size", "8", "--bs", "8", "--workers", "0"]


@pytest.fixture(scope="session")
def tiny_autoencoder(tmp_path_factory):
    """A tiny autoencoder trained for two epochs through the real CLI, on generated images plus one corrupt file.

    `--keep last`: the trained model, whether or not two epochs beat PCA (with `--keep best` a model that did not is
    exported as PCA, and the apps would show PCA's picture twice)."""
    def build(tmp):
        data = make_folder_dataset(tmp / "data")
        (data / "cats" / "broken.jpg").write_text("not an image")
        out = tmp / "models" / "ae.pkl"
        res = run(["training/train_autoencoder.py", "--data", data, "--epochs", "2", "--lr", "1e-2", *AE_TINY,
                   "--keep", "last", "--out", out])
        assert res.returncode == 0, res.stderr[-3000:]
        assert "broken.jpg" in res.stdout and "PCA" in res.stdout
        return out
    return once_per_run(tmp_path_factory, "ae", build)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client(gradio_client.Client):
    """gradio_client's client, whose `predict` fails after `timeout` seconds: its own wait has no end (it reads the
    server's event stream without a timeout), and an event the server never finishes would hold the test."""

    def __init__(self, *args, timeout=120, **kwargs):
        super().__init__(*args, **kwargs)
        self.call_timeout = timeout

    def predict(self, *args, **kwargs):
        return self.submit(*args, **kwargs).result(timeout=self.call_timeout)


def answers_as_the_model(out, model, image):
    """`out`, an app's Label answer for `image` (over HTTP), names the classes and confidences the model's
    `Predictor` gives it: the app ran this model on this image, not only that it answered something."""
    from imagelab.inference import Predictor
    want = Predictor(model).predict(image, k=len(out["confidences"]))
    assert out["label"] == max(want, key=want.get), (out, want)
    assert {c["label"]: c["confidence"] for c in out["confidences"]} == pytest.approx(want, abs=1e-5)


def same_picture(path, want):
    """The picture an app sent (a file `path`) has exactly the pixels of the PIL image `want`."""
    with Image.open(path) as im:
        got = np.asarray(im.convert("RGB"), int)
    assert got.shape == np.asarray(want).shape and np.abs(got - np.asarray(want, int)).max() == 0


class AppURL(str):
    """The URL of a served app; `.proc` is its server process, `.log` the file of what it printed."""


@contextmanager
def served(args, env=None, timeout=120, cwd=ROOT):
    """Start an app as a real server on 127.0.0.1 and yield its URL (an `AppURL`) once it answers; stop it after.

    `env` adds to this process's environment; a value of None removes that variable.
    """
    port = free_port()
    log = open(SCRATCH / f"app-{port}.log", "w+")
    # GRADIO_SERVER_PORT too: an app that takes no options (the fastai course's Space app) listens there
    env = {k: v for k, v in {**os.environ, "GRADIO_SERVER_PORT": str(port), **(env or {})}.items() if v is not None}
    proc = subprocess.Popen([PY, *map(str, args), "--port", str(port)], cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    url = AppURL(f"http://127.0.0.1:{port}/")
    url.proc, url.log = proc, Path(log.name)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"app exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"app did not answer on {url} within {timeout}s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


BEARS = (("black", (40, 40, 40)), ("grizzly", (150, 100, 50)), ("teddy", (230, 200, 120)))


@pytest.fixture(scope="session")
def pets_app(tiny_model):
    """The pets app serving the tiny model on 127.0.0.1, shared by the tests that call it (`.proc`: its process)."""
    with served(["apps/pets/app.py", "--model", tiny_model]) as url:
        yield url


def make_messy_bears(root, n=8):
    """A folder like a real scrape: JPEG, PNG with alpha, palette PNG, WEBP, names with `?` and `&`,
    and in every class one truncated JPEG, one empty file and one text file named .jpg."""
    for label, color in BEARS:
        for i in range(n):
            kind = i % 4
            name = [f"{i:08d}.jpg", f"{i:08d}.png", f"{i:08d}.jpeg?width=3200&height=1680&fit=crop",
                    f"{i:08d}.webp"][kind]
            path = write_image(root / label / name, color, seed=i, fmt="JPEG" if kind == 2 else None)
            if kind == 1 and i % 8 == 1:  # RGBA with a transparent corner
                im = Image.open(path).convert("RGBA")
                im.paste((0, 0, 0, 0), (0, 0, 12, 12))
                im.save(path)
            elif kind == 1:  # a palette image whose index 0 is transparent
                Image.open(path).convert("P").save(path, transparency=0)
        good = (root / label / "00000000.jpg").read_bytes()
        (root / label / "truncated.jpg").write_bytes(good[: len(good) // 2])
        (root / label / "empty.jpg").write_bytes(b"")
        (root / label / "notes.jpg").write_text("<html>not an image</html>")
    return root


@pytest.fixture(scope="session")
def tiny_bears(tmp_path_factory):
    """(model, data): a resnet18 trained one epoch on a messy generated bears folder through train_bears.py."""
    def build(tmp):
        data = make_messy_bears(tmp / "data")
        # What the dataset tools leave beside the classes: never training images.
        write_image(data / "quarantine" / "grizzly" / "q.jpg", (0, 255, 0))
        write_image(data / "removed" / "black" / "r.jpg", (0, 255, 0))
        (data / "download-summary.json").write_text("{}")
        out = tmp / "models" / "bears.pkl"
        return out, data, train_tiny(data, out, script="train_bears.py")
    return once_per_run(tmp_path_factory, "bears", build)


@pytest.fixture
def missing_pictures(tmp_path):
    """An image URL that cannot be fetched: a file server on 127.0.0.1 that answers 404 to every path (Gradio
    refuses to fetch from a private address anyway, before it asks)."""
    (tmp_path / "empty").mkdir()
    server = subprocess.Popen([PY, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
                               tmp_path / "empty"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = re.search(r"port (\d+)", read_until(server.stdout, r"port \d+", timeout=60))[1]
        yield f"http://127.0.0.1:{port}/cat.jpg"
    finally:
        server.terminate()
        server.wait(timeout=20)
