"""The one training loop, for every kind of model: time budget, resume, distributed launch, light imports."""
import json
import re
import signal
import subprocess
import time

import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import load_learner

from conftest import AE_TINY, PY, ROOT, fails_with_one_line, make_folder_dataset, run
from imagelab.callbacks import ProgressiveResize, TimeBudget
from test_distributed import launch
from test_resume import interrupt_after_an_epoch

EPOCHS = 4
SCRIPTS = {"classifier": ["training/train_pets.py", "--no-pretrained", "--arch", "resnet18", "--size", "32",
                          "--bs", "4", "--workers", "0"],
           "autoencoder": ["training/train_autoencoder.py", "--lr", "1e-2", *AE_TINY]}


def command(kind, data, out, *extra):
    return [*SCRIPTS[kind], "--data", data, "--seed", "3", "--out", out, *extra]


def metrics(model):
    return json.loads(model.with_name(model.stem + ".report").joinpath("metrics.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("loop") / "data", n=16)


@pytest.mark.parametrize("kind", ["classifier", "autoencoder"])
def test_time_budget_stops_near_it_with_a_complete_model(kind, data, tmp_path):
    out = tmp_path / "m.pkl"
    res = run(command(kind, data, out, "--epochs", "1000", "--time-budget", "6"))
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(out)
    assert 6 <= m["train_seconds"] < 9, m["train_seconds"]
    assert m["time_budget"] == 6
    assert len(m["valid_loss_per_epoch"]) < 1000
    assert "\r" not in res.stdout and "█" not in res.stdout  # to a pipe: the epoch table, no bars redrawn
    # an epoch the clock ended part way has no row in the table: its one validation, which decides whether it is
    # kept, gets a line of its own, and the report counts it as every other epoch
    epochs = m["epochs_trained"]
    rows = [int(line.split()[0]) for line in res.stdout.splitlines() if re.match(r"\s*\d+\s+\d", line)]
    cut_short = f"epoch {epochs}, cut short by the time budget: valid_loss " in res.stdout
    assert rows[-1] == epochs - cut_short, res.stdout
    assert len(m["valid_loss_per_epoch"]) == epochs
    assert f"with the weights of epoch {m['kept_epoch']} of {epochs}" in res.stdout.splitlines()[-1]  # either kind
    if kind == "autoencoder":
        assert [e for e, _ in m["mse_ratio_per_epoch"]] == list(range(1, epochs + 1))
    decoder = ["m.decoder.onnx"] if kind == "autoencoder" else []  # its static page decodes codes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.config.json", *decoder, "m.onnx", "m.pkl", "m.report",
                                                          "m.safetensors"]


def test_a_budget_that_ends_before_the_first_batch_exports_nothing(data, tmp_path):
    out = tmp_path / "m.pkl"
    res = run(command("classifier", data, out, "--epochs", "3", "--time-budget", "0.001"))
    fails_with_one_line(res, "--time-budget 0.001 ended before the first batch: nothing was trained or exported")
    assert "note: --time-budget was spent before this fit of 3 epochs trained" in res.stdout
    assert list(tmp_path.iterdir()) == []


def tiny_learner(*cbs):
    from fastai.vision.all import DataLoaders, Learner  # with fastai's schedules (fit_one_cycle)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x, y)), bs=16, num_workers=0)
    return Learner(dls, torch.nn.Linear(4, 1), loss_func=torch.nn.functional.mse_loss, cbs=list(cbs))


class Rates(Callback):
    def before_fit(self):
        self.seen = []

    def after_batch(self):
        if self.training:
            self.seen.append(self.opt.hypers[0]["lr"])


def test_a_budget_the_epochs_beat_still_runs_the_whole_schedule():
    """On a fast machine the epochs end before the clock: the rate must still rise to its peak and come down."""
    plain, budgeted = Rates(), Rates()
    tiny_learner(plain).fit_one_cycle(3, 1e-2)
    tiny_learner(budgeted).fit_one_cycle(3, 1e-2, cbs=[TimeBudget(3600)])
    assert budgeted.seen == pytest.approx(plain.seen, rel=1e-3)
    assert max(plain.seen) == pytest.approx(1e-2, rel=0.05) and plain.seen[-1] < 1e-3


class SlowValidation(Callback):
    def __init__(self, seconds):
        self.seconds = seconds

    def before_validate(self):
        time.sleep(self.seconds)


def test_an_epoch_whose_validation_ends_past_the_budget_is_recorded():
    learn = tiny_learner(SlowValidation(1.5))
    learn.fit_one_cycle(5, 1e-2, cbs=[TimeBudget(1.0)])
    assert len(learn.recorder.values) == 1  # epoch 1, validated; no epoch 2 begun


class SlowTraining(Callback):
    def __init__(self, seconds):
        self.seconds = seconds

    def before_batch(self):
        if self.training:
            time.sleep(self.seconds)


class InputSize:  # what ProgressiveResize resizes: a transform's size
    size = None


class Sizes(Callback):
    order = ProgressiveResize.order + 1

    def before_fit(self):
        self.seen = []

    def before_train(self):
        self.seen.append(self.resizer.transform.size[0])


def test_a_budget_the_clock_ends_still_trains_its_second_half_at_the_full_size():
    """Progressive resizing follows the clock as the schedule does: a run the time budget ends at a fraction of its
    epochs trains its second half of the time at the size it is validated, exported and served at."""
    resizer, sizes = ProgressiveResize(InputSize(), size=64, start=32), Sizes()
    sizes.resizer = resizer
    tiny_learner(SlowTraining(0.05)).fit_one_cycle(200, 1e-2, cbs=[TimeBudget(3.0), resizer, sizes])
    assert 4 <= len(sizes.seen) < 100, sizes.seen  # a few epochs of 200
    assert sizes.seen[0] == 32 and sizes.seen == sorted(sizes.seen)
    assert sizes.seen[len(sizes.seen) // 2 + 1:] == [64] * (len(sizes.seen) - len(sizes.seen) // 2 - 1), sizes.seen


def test_fine_tunings_fits_share_the_budget_and_each_runs_its_whole_schedule(data, tmp_path):
    """fine_tune's frozen epoch gets its epochs' share of --time-budget, and the unfrozen fit all the rest, with its
    own warm-up from its low first rate: its clock starts when it does, not with the run."""
    from dataclasses import replace

    from imagelab.classifier import Classifier
    from imagelab.config import ClassifierConfig
    from imagelab.train import train

    class FineTuning(Classifier):  # fine_tune's two fits, on a model from scratch: no pretrained weights offline
        def fits(self, cfg, lr):
            return super().fits(replace(cfg, pretrained=True), lr)

    class FitRates(Callback):
        def before_fit(self):
            fits.append([])

        def after_batch(self):
            if self.training:
                fits[-1].append(self.opt.hypers[-1]["lr"])

    fits = []
    cfg = ClassifierConfig(data=str(data), out=str(tmp_path / "m.pkl"), arch="resnet18", pretrained=False, epochs=100,
                           size=32, bs=8, time_budget=12, presize=False)
    m = train(FineTuning(), cfg, cbs=[FitRates(), SlowTraining(0.1)])
    frozen, unfrozen = fits
    # the frozen fit stops at its share, 1/101 of the time, before its epoch's 3 batches, however loaded the machine
    assert len(frozen) < 3 and unfrozen, (len(frozen), len(unfrozen))
    peak = m["lr"] / 2  # fine_tune's unfrozen rate (the head's)
    assert unfrozen[0] < peak / 3, (unfrozen[0], peak)  # its one-cycle begins at a fifth of its peak (div=5)
    # the clock ends it (how near the budget a run stops: test_time_budget_stops_near_it_with_a_complete_model)
    assert m["epochs_trained"] < 100 and m["train_seconds"] < 2 * 12


def test_a_failure_in_the_report_that_is_no_failed_write_is_not_called_one(data, tmp_path):
    """Only the disk's refusals become "cannot write ... and its report": a held-out photo deleted before the report
    read it (the cleaner moves files while a run trains) keeps its own error."""
    from imagelab.classifier import Classifier
    from imagelab.config import ClassifierConfig
    from imagelab.train import train

    class PhotoGone(Classifier):
        def report(self, learn, history, folder):
            return open(tmp_path / "moved-away.jpg", "rb")

    cfg = ClassifierConfig(data=str(data), out=str(tmp_path / "m.pkl"), arch="resnet18", pretrained=False, epochs=1,
                           size=32, bs=8)
    with pytest.raises(FileNotFoundError, match="moved-away.jpg"):
        train(PhotoGone(), cfg)
    assert not (tmp_path / "m.pkl").exists()


AGREEING = """
import json, sys, time
import torch
from fastai.callback.core import Callback
sys.path.insert(0, sys.argv[1])
torch.distributed.init_process_group("gloo")
from test_loop import Rates, tiny_learner
from imagelab.distributed import OwnRandomness
from imagelab.callbacks import TimeBudget

class Draws(Callback):
    def before_fit(self):
        self.seen = []

    def before_batch(self):
        if self.training:
            self.seen.append(torch.rand(1).item())

rank = torch.distributed.get_rank()
time.sleep(2 * rank)  # the second process starts late, as one that decoded its images slower would
rates, draws = Rates(), Draws()
tiny_learner(rates, draws).fit_one_cycle(100_000, 1e-2, cbs=[TimeBudget(10), OwnRandomness(seed=1)])
print(json.dumps({"rank": rank, "rates": rates.seen, "draws": draws.seen}))
"""


def test_processes_under_a_time_budget_agree_on_the_clock_and_draw_their_own_augmentation(tmp_path):
    (tmp_path / "agreeing.py").write_text(AGREEING)
    res = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--log-dir", tmp_path / "logs", "--tee", "1", tmp_path / "agreeing.py", ROOT / "tests"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    # each line as torchrun tees it ("[default0]:..."), maybe after the progress bars' redrawn text
    runs = sorted((json.loads(line[line.index('{"rank"'):]) for line in res.stdout.splitlines() if '{"rank"' in line),
                  key=lambda r: r["rank"])
    assert len(runs) == 2
    first, second = runs
    assert len(first["rates"]) > 8  # both stopped at the same batch, having stepped at the same rates
    assert first["rates"] == second["rates"]
    assert first["draws"] != second["draws"]


def test_autoencoder_killed_then_resumed_ends_like_an_uninterrupted_run(data, tmp_path):
    """Its report too: the ratio to PCA per epoch (metrics.json, ratio_curve.png) covers the epochs before the
    resume."""
    whole, out = tmp_path / "whole" / "ae.pkl", tmp_path / "resumed" / "ae.pkl"
    res = run(command("autoencoder", data, whole, "--epochs", EPOCHS))
    assert res.returncode == 0, res.stderr[-3000:]
    code, _, killed_at = interrupt_after_an_epoch(command("autoencoder", data, out, "--epochs", EPOCHS),
                                                  out.with_name("ae.ckpt"), signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert 1 <= killed_at < EPOCHS
    res = run(command("autoencoder", data, out, "--epochs", EPOCHS, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming after epoch {killed_at} of {EPOCHS}" in res.stdout
    a, b = metrics(whole), metrics(out)
    assert b["resumed_after_epoch"] == killed_at
    assert b["ae_mse"] == pytest.approx(a["ae_mse"], rel=1e-3)
    assert b["valid_loss_per_epoch"] == pytest.approx(a["valid_loss_per_epoch"], rel=1e-3)
    assert [e for e, _ in b["mse_ratio_per_epoch"]] == [e for e, _ in a["mse_ratio_per_epoch"]] \
        == list(range(1, EPOCHS + 1))
    assert [r for _, r in b["mse_ratio_per_epoch"]] == pytest.approx([r for _, r in a["mse_ratio_per_epoch"]],
                                                                     rel=1e-3)
    wa, wb = (load_learner(m).model.state_dict() for m in (whole, out))
    for name, t in wa.items():
        if t.is_floating_point():
            assert torch.allclose(t, wb[name], rtol=1e-3, atol=1e-4), name
    assert not out.with_name("ae.ckpt").exists() and out.with_name("ae.report").joinpath("ratio_curve.png").is_file()


def test_autoencoder_refuses_progressive_resizing_in_one_line(data, tmp_path):
    res = run(command("autoencoder", data, tmp_path / "m.pkl", "--start-size", "8"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip() == "error: this model trains at one size (its layers are sized for --size): " \
        "drop --start-size or set it to --size (16)"


def test_autoencoder_under_accelerate_launch_writes_one_model(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n=10)
    out = tmp_path / "models" / "ae.pkl"
    res = subprocess.run([*launch(), *command("autoencoder", data, out, "--epochs", "2")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1, res.stdout[-2000:]
    m = metrics(out)
    assert m["processes"] == 2
    assert m["counts"]["valid"] == 4


@pytest.mark.parametrize("module", ["imagelab.download", "imagelab.lookalikes", "imagelab.paths", "imagelab.metadata",
                                    "imagelab.config"])
def test_light_modules_import_no_training_stack(module):
    code = (f"import sys, {module}\n"
            "print(sorted(m for m in ('fastai', 'torch', 'matplotlib', 'timm') if m in sys.modules))")
    res = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_importing_imagelab_changes_nothing():
    code = "import os, imagelab, warnings; print(os.environ.get('OMP_WAIT_POLICY'), len(warnings.filters))"
    plain = subprocess.run([PY, "-c", "import os, warnings; print(os.environ.get('OMP_WAIT_POLICY'), "
                            "len(warnings.filters))"], cwd=ROOT, capture_output=True, text=True, env={"PATH": ""},
                           timeout=60)
    res = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, env={"PATH": ""}, timeout=60)
    assert res.stdout == plain.stdout


def test_help_answers_without_loading_the_training_stack():
    for script in ("training/train_pets.py", "training/train_bears.py", "training/train_autoencoder.py"):
        code = (f"import runpy, sys; sys.argv = ['{script}', '--help']\n"
                f"try:\n    runpy.run_path('{script}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                "print('torch' in sys.modules, file=sys.stderr)")
        res = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.stderr.strip().splitlines()[-1] == "False", (script, res.stderr[-2000:])


def test_presets_set_defaults_that_the_options_given_override(capsys):
    from imagelab.config import AutoencoderConfig, ClassifierConfig, ConfigParser
    parser = ConfigParser(ClassifierConfig, "test", out="m.pkl")
    cfg = parser.config_from(parser.parse_args(["--preset", "scratch", "--size", "96", "--lr", "find"]))
    assert cfg == ClassifierConfig(out="m.pkl", pretrained=False, arch="resnet10t", size=96, bs=64, epochs=40,
                                   label_smoothing=0.1, lr="find")
    assert parser.config_from(parser.parse_args(["--lr", "2e-3"])).lr == 2e-3
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr", "fast"])
    assert "a number or 'find', not 'fast'" in capsys.readouterr().err
    parser = ConfigParser(AutoencoderConfig, "test")
    assert parser.config_from(parser.parse_args(["--preset", "long"])).epochs == 12


def test_the_trainers_adamw_computes_fastais_adam_sparing_batch_norm_and_biases():
    """PyTorch's fused AdamW behind fastai's schedule (imagelab.models.adamw) trains as fastai's Adam does:
    decoupled weight decay on the weights but, as fastai's default `wd_bn_bias=False` says, not on batch
    norm's parameters or the biases."""
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.optimizer import Adam
    from fastai.torch_core import set_seed
    from torch import nn
    from torch.utils.data import TensorDataset
    from imagelab.models import adamw

    def fit(opt_func, wd):
        set_seed(0)
        x = torch.randn(256, 8)
        ds = TensorDataset(x, x[:, :1] * 3 + x[:, 1:2] ** 2)
        model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
        learn = Learner(DataLoaders.from_dsets(ds, ds, bs=32, shuffle=False), model, loss_func=nn.MSELoss(),
                        opt_func=opt_func, wd=wd)
        with learn.no_logging(), learn.no_bar():
            learn.fit_one_cycle(3, 0.05)
        return model.state_dict()

    start = fit(Adam, 0.0)
    theirs, ours = fit(Adam, 0.5), fit(adamw, 0.5)
    assert not torch.allclose(theirs["0.weight"], start["0.weight"], atol=1e-3)  # the decay mattered
    for name, t in theirs.items():
        assert torch.allclose(ours[name].float(), t.float(), rtol=1e-5, atol=1e-6), name
