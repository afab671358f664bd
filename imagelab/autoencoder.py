"""The autoencoder that starts as PCA: the model, its data, the sparsity penalty, its report against PCA, its export.

The model lives here, not in a script, so an exported `.pkl` loads from any script, server or Space; the apps
serve its ONNX graphs (imagelab.inference.Reconstructor).
"""
import math
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import torch
from fastai.callback.core import Callback
from fastai.callback.hook import hook_output
from fastai.learner import Learner
from fastai.losses import L1LossFlat, MSELossFlat
from fastai.metrics import mse
from fastai.torch_core import get_model
from fastai.vision.all import DataBlock, FlipItem, Resize
from torch import nn

from . import UserError
from .config import MAX_WIDTH, check_autoencoder_shape
from .data import RGBImageBlock, dataset_split, pets_images
from .export import export_weights_only, save_examples, to_onnx
from .inference import AUTOENCODER_OUTPUTS, DECODER_OUTPUTS, psnr
from .loading import AUTOENCODER, FORMAT
from .models import DeviceAvgMetric, adamw
from .paths import artifact_paths
from .reports import plot_loss_curve, save_fig
from .train import Task, kept_weights

LOSSES = {"mse": MSELossFlat, "l1": L1LossFlat}
# The one-cycle peak: at the default batch of 8, as low an error as batch 4 at 1e-3, in less time
# (benchmarks/README.md, "Autoencoder against PCA").
LR = 2e-3
EVAL_BS = 64  # images a batch outside training: preprocessing them for PCA and the report, running the model over them
SHOWN = 8  # held-out images in the report's reconstruction grid (all of them, if fewer)


def channels(depth, width):
    """Channels after each encoder block: `width`, doubling with depth (the decoder mirrors them)."""
    return [min(width * 2 ** i, MAX_WIDTH) for i in range(depth)]


class ResBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))): a pre-activation residual block, its last conv zeroed at init.

    Zeroed, every block starts as the identity: the convolutional paths start as plain (linear) convolutions
    and add the nonlinear part as they train; a plain conv stack (ReLU after every layer) trained far worse
    in the same steps (benchmarks/README.md, "Autoencoder against PCA").
    """

    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.BatchNorm2d(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x):
        return x + self.body(x)


class Shrink(nn.Module):
    """sign(z) * max(|z| - |t|, 0) per code number, t learned: the identity at init (to float precision), exact
    zeros once the sparsity penalty raises t (a ReLU would throw away the negative half of PCA's coefficients)."""

    def __init__(self, n):
        super().__init__()
        self.threshold = nn.Parameter(torch.full((n,), 1e-6))  # |t| has no gradient at exactly 0

    def forward(self, z):
        return z.sign() * (z.abs() - self.threshold.abs()).clamp_min(0)


def down_blocks(ch, blocks):
    """Stride-2 conv then `blocks` residual blocks per level, from RGB to `ch[-1]` channels."""
    return [nn.Sequential(nn.Conv2d(ci, co, 3, stride=2, padding=1), *[ResBlock(co) for _ in range(blocks)])
            for ci, co in zip([3] + ch, ch)]


class ConvAutoencoder(nn.Module):
    """Undercomplete autoencoder that starts as PCA and learns what PCA misses: a code of `code_size` numbers.

    The linear path is PCA of the training images (`set_pca`; buffers, so it follows the model's device and
    is saved with its weights): the code is the whitened PCA coefficients plus what a convolutional encoder
    adds to them, and the reconstruction is PCA's decoding of the code plus what a convolutional decoder
    adds on top. Both convolutional outputs are zero at init, so before the first step the model is PCA,
    exactly ("PCA-boosted autoencoders", arXiv 2205.11673). Nothing crosses the code but its `code_size`
    numbers: the conv decoder reads the code, not the image.

    Each encoder level is a stride-2 conv then `blocks` residual blocks; the decoder runs the same levels
    down over PCA's decoding, adds the code (a linear layer) at the bottom, and comes back up (residual
    blocks, nearest upsampling and a conv per level, with the down path's features added). `sparse`
    shrinks the code towards zero (`Shrink`) so that an L1 penalty on it (`CodeSparsity`) gives exact zeros.
    """

    def __init__(self, size=64, code_size=64, depth=2, width=32, sparse=False, blocks=1):
        super().__init__()
        check_autoencoder_shape(size, code_size, depth, width, blocks)
        self.size, self.code_size, self.depth, self.width, self.sparse = size, code_size, depth, width, sparse
        self.blocks = blocks
        ch = channels(depth, width)
        side = size // 2 ** depth
        self.grid = (ch[-1], side, side)  # the encoder's output, and the decoder's input, before the code
        pixels = 3 * size * size
        # Until `set_pca`: a path that decodes every code to mid-grey.
        self.register_buffer("pca_mean", torch.full((pixels,), 0.5))
        self.register_buffer("pca_axes", torch.zeros(code_size, pixels))  # rows: unit axes (zero rows unused)
        self.register_buffer("code_scale", torch.ones(code_size))  # std of each PCA coefficient on the training images
        self.encoder = nn.Sequential(*down_blocks(ch, blocks), nn.Flatten())
        self.to_code = nn.Linear(math.prod(self.grid), code_size)
        self.shrink = Shrink(code_size) if sparse else nn.Identity()
        # The decoder refines PCA's decoding of the code (a function of the code alone): a U-Net over it,
        # the code itself joining at the bottom.
        self.refine = nn.ModuleList(down_blocks(ch, blocks))
        self.from_code = nn.Linear(code_size, math.prod(self.grid))
        up = ch[::-1] + ch[:1]  # e.g. 64 32 32: mirrors the encoder, ending at `width` channels
        self.decoder = nn.ModuleList([nn.Sequential(*[ResBlock(ci) for _ in range(blocks)],
                                                    nn.Upsample(scale_factor=2), nn.Conv2d(ci, co, 3, padding=1))
                                      for ci, co in zip(up, up[1:])])
        self.head = nn.Conv2d(ch[0], 3, 3, padding=1)
        for layer in (self.to_code, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def set_pca(self, x):
        """Make the linear path PCA of the images `x` (N x 3 x size x size in [0, 1], N > 1), on the model's device."""
        x = x.to(self.pca_mean.device)
        mean, axes = fit_pca(x.flatten(1), self.code_size)
        k = len(axes)
        scale = ((x.flatten(1) - mean) @ axes.T).std(0).clamp_min(1e-6)
        self.pca_mean.copy_(mean)
        self.pca_axes.zero_()[:k] = axes
        self.code_scale.fill_(1)[:k] = scale
        return self

    def pca_code(self, x):
        return (x.flatten(1) - self.pca_mean) @ self.pca_axes.T / self.code_scale

    def pca_decode(self, code):
        return ((code * self.code_scale) @ self.pca_axes + self.pca_mean).view(-1, 3, self.size, self.size)

    def pca(self, x):
        """PCA's reconstruction of `x`: the linear path alone (its unused zero axes add nothing)."""
        return pca_reconstruct(x.flatten(1), self.pca_mean, self.pca_axes).view_as(x)

    def encode(self, x):
        # Adam moves each of to_code's weights by about the learning rate a step, which moves the code by
        # about sqrt(fan-in) times as much as a small layer's output: scaled back, the conv encoder nudges
        # PCA's coefficients instead of throwing them around in the first epoch.
        gain = self.to_code.in_features ** -0.5
        return self.shrink(self.pca_code(x) + gain * self.to_code(self.encoder(x - 0.5)))  # conv input centred on 0

    def decode(self, code):
        pca = self.pca_decode(code)
        h, skips = pca - 0.5, []
        for block in self.refine:
            h = block(h)
            skips.append(h)
        h = h + self.from_code(code).view(-1, *self.grid)
        for block, skip in zip(self.decoder, skips[-2::-1] + [None]):
            h = block(h) if skip is None else block(h) + skip
        # Clamped to valid pixels, like PCA's reconstructions (the report scores both as they are).
        return (pca + self.head(h)).clamp(0, 1)

    def forward(self, x):
        return self.decode(self.encode(x))


class FromImage(nn.Module):
    """The exported graph of an image: its reconstruction, PCA's from the model's own linear path, and its code
    (what the static Space's page shows, and walks between)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        code = self.model.encode(x)
        return self.model.decode(code), self.model.pca(x), code


class FromCode(nn.Module):
    """The exported graph of a code: the image it decodes to."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, code):
        return self.model.decode(code)


class CodeSparsity(Callback):
    """The sparse autoencoder: `lam * mean |code|` joins the loss, in training and in validation.

    The loss is the objective being minimised, so `--keep best` and `--patience` judge epochs by it; judged by
    reconstruction alone they would pick the least sparse epoch (the first, or PCA's). The `mse` and
    `ratio_to_pca` metrics stay pure reconstruction, comparable with plain runs. The soft threshold is spared
    weight decay, which would pull it back towards zero against the penalty.
    """

    def __init__(self, lam):
        self.lam = lam

    def before_fit(self):  # also where fastai's validate() begins
        shrink = get_model(self.learn.model).shrink
        self.hook = hook_output(shrink, detach=False)
        if self.learn.opt is not None:
            self.learn.opt.state[shrink.threshold]["do_wd"] = False

    def after_loss(self):
        penalty = self.lam * self.hook.stored.abs().mean()
        if self.training:
            self.learn.loss_grad = self.learn.loss_grad + penalty
        self.learn.loss = self.learn.loss + penalty.detach()

    def after_fit(self):
        self.hook.remove()


class RatioToPCA(DeviceAvgMetric):
    """Held-out MSE over PCA's on the same held-out images (`pca_mse`): below 1, the autoencoder is better."""

    def __init__(self, pca_mse):
        super().__init__(mse)
        self.pca_mse = pca_mse

    @property
    def value(self):
        return None if self.count == 0 else float(self.total / self.count) / self.pca_mse

    @property
    def name(self):
        return "ratio_to_pca"


def autoencoder_dls(files, *, splitter, size, bs, workers=None, get_x=None):
    """DataLoaders whose target is the input: the same random crop and flip on both.

    fastai draws a transform's random parameters once per (input, target) pair, so both stay identical.
    Training sees a random square along each image's long side, flipped half the time: what is scored
    (below) plus mirror images. Warps and lighting changes are left out: they make the task harder than
    what is scored, and three epochs have no steps to spare (benchmarks/README.md).
    Validation (and inference, and PCA) sees the centre square of each image, unaugmented.
    `splitter`: `dataset_split`'s; `get_x` maps a file to what is decoded (`Presized`), the target decoded the same
    way; `workers`: loader processes (None: fastai's default). The loaders shuffle by the global seed (fastai's take
    none of their own).
    """
    if len(files) < 2:  # no --valid-pct helps: one image cannot both train and be held out
        raise UserError(f"only {len(files)} image: the autoencoder needs at least 2, one to train on and one to hold "
                        "out; add images")
    block = DataBlock(blocks=(RGBImageBlock(), RGBImageBlock()), get_x=get_x, get_y=get_x, splitter=splitter,
                      item_tfms=[Resize(size), FlipItem(0.5)])
    dls = block.dataloaders(list(files), bs=bs, num_workers=workers)
    if len(dls.train_ds) == 0 or len(dls.valid_ds) == 0:
        raise UserError(f"need images for training and validation: {len(dls.train_ds)} and {len(dls.valid_ds)} of "
                        f"{len(files)} images; {'lower' if len(dls.valid_ds) else 'raise'} --valid-pct")
    return dls


def autoencoder_learner(dls, model, loss="mse", wd=None):
    """The learner of `model`, its linear path made PCA of the training images as the model sees them.

    PCA is fitted on the centre squares, the held-out view, and their mirror images: the model trains on mirror
    images too, and a baseline fitted on half of what the model learns from would flatter the model. The
    `ratio_to_pca` metric divides each epoch's held-out MSE by PCA's on the same held-out images.
    """
    train_x, valid_x = preprocessed(dls, dls.train_ds.items), preprocessed(dls, dls.valid_ds.items)
    model.set_pca(torch.cat([train_x, train_x.flip(-1)]))
    pca_mse = float(((pca(model, valid_x) - valid_x) ** 2).mean())
    return Learner(dls, model, loss_func=LOSSES[loss](), metrics=[DeviceAvgMetric(mse), RatioToPCA(pca_mse)],
                   opt_func=adamw, wd=wd)


def preprocessed(dls, items):
    """`items` resized and centre-cropped exactly as the model sees held-out images: a float tensor in [0, 1]."""
    dl = dls.test_dl(items, bs=EVAL_BS, num_workers=0)
    return torch.cat([b[0].as_subclass(torch.Tensor).cpu() for b in dl])


@torch.no_grad()
def batched(fn, model, x):
    """`fn(model, batch)` over `x` in batches on the model's device (a GPU after training there), back on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([fn(model, x[i:i + EVAL_BS].to(device)).float().cpu() for i in range(0, len(x), EVAL_BS)])


def reconstruct(model, x):
    return batched(lambda m, b: m(b), model, x)


def encode(model, x):
    return batched(lambda m, b: m.encode(b), model, x)


def pca(model, x):
    """PCA's reconstruction of `x`: the model's own linear path."""
    return batched(lambda m, b: m.pca(b), model, x)


def fit_pca(x, k):
    """Mean and top principal axes of the rows of `x`: the best linear code of size `k`, or of len(x) - 1, all
    that n centred rows span, if fewer.

    Exact, in float64, from the eigenvectors of the smaller of the Gram and covariance matrices: with fewer
    images than pixels, an eigendecomposition of n x n instead of an SVD of n x pixels.
    """
    k = min(k, len(x) - 1)
    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    if len(xc) <= xc.shape[1]:
        values, u = torch.linalg.eigh(xc @ xc.T)  # ascending
        axes = (xc.T @ u[:, -k:] / values[-k:].sqrt()).T
    else:
        axes = torch.linalg.eigh(xc.T @ xc)[1][:, -k:].T
    return mean.float(), axes.flip(0).float()


def pca_reconstruct(x, mean, axes):
    # Clamped to valid pixels like the autoencoder's output: this can only lower PCA's error.
    return (((x - mean) @ axes.T) @ axes + mean).clamp(0, 1)


def plot_reconstructions(rows, path):
    """A grid: held-out originals on top, each method's reconstruction below, per-image PSNR in the titles."""
    n = min(SHOWN, len(rows["original"]))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.8 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r:
                ax.set_title(f"{psnr(float(((images[c] - rows['original'][c]) ** 2).mean())):.1f} dB", fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.suptitle("Held-out images and their reconstructions (PSNR)", fontsize=10)
    save_fig(fig, path)


def plot_ratio_curve(points, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        ax.plot(*zip(*points), "o-", label="autoencoder / PCA")
    else:  # the time budget ended the only epoch before its validation, or an earlier version's checkpoint resumed
        ax.text(0.5, 0.75, "no epoch's ratio was recorded", ha="center", transform=ax.transAxes)
        ax.set_ylim(0, 2)
    ax.axhline(1, color="grey", linestyle="--", label="PCA")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="held-out MSE ratio (presized copies)",
           title="Autoencoder against PCA, epoch by epoch")
    ax.legend()
    save_fig(fig, path)


def autoencoder_report(learn, history, report_dir):
    """Score the autoencoder and PCA with as many components on the same held-out images; write the plots.

    PCA is the model's own linear path, fitted before training on the training images as it saw them at validation
    (resized, centre crop) and their mirror images (`autoencoder_learner`): the PCA its app shows, and exactly the
    model before its first step, so a model no epoch improved scores a ratio of 1. Both are scored on the same
    held-out tensors.
    """
    dls, model = learn.dls, learn.model
    valid_x = preprocessed(dls, dls.valid_ds.items)
    k = int(model.pca_axes.any(1).sum())  # fewer than code_size with fewer training images (fit_pca)
    pca_x = pca(model, valid_x)
    ae_x, codes = reconstruct(model, valid_x), encode(model, valid_x)
    curve = [(epoch, round(m["ratio_to_pca"], 5)) for epoch, m in enumerate(history.valid_metrics, 1)
             if m.get("ratio_to_pca") is not None]
    ae_mse, pca_mse = float(((ae_x - valid_x) ** 2).mean()), float(((pca_x - valid_x) ** 2).mean())

    plot_reconstructions({"original": valid_x, "autoencoder": ae_x, f"PCA ({k})": pca_x},
                         report_dir / "reconstructions.png")
    plot_loss_curve(history, report_dir / "loss_curve.png")
    plot_ratio_curve(curve, report_dir / "ratio_curve.png")
    return {"ae_mse": ae_mse, "ae_psnr": psnr(ae_mse), "pca_mse": pca_mse, "pca_psnr": psnr(pca_mse),
            "mse_ratio_per_epoch": [list(p) for p in curve],
            "mse_ratio_ae_to_pca": ae_mse / pca_mse, "psnr_gain_db": psnr(ae_mse) - psnr(pca_mse),
            "beats_pca": ae_mse < pca_mse, "pca_components": k,
            "code_mean_abs": float(codes.abs().mean()), "code_zero_fraction": float((codes == 0).float().mean()),
            "parameters": sum(p.numel() for p in model.parameters()),
            "counts": {"train": len(dls.train_ds), "valid": len(valid_x)}}


class AutoencoderTask(Task):
    """The autoencoder as a task of the training loop: any folder of images in (labels ignored), a model that
    rebuilds them from a short code out, scored against PCA."""
    kind = AUTOENCODER
    start_competes = True  # it starts as PCA: never export worse than that under --keep best

    def default_data(self):
        return pets_images()

    def dataloaders(self, cfg, root, files, get_x, workers):
        splitter, self.split = dataset_split(root, files, valid_pct=cfg.valid_pct, seed=cfg.seed, cache=cfg.cache)
        return autoencoder_dls(files, splitter=splitter, size=cfg.size, bs=cfg.bs, workers=workers,
                               get_x=get_x)

    def learner(self, dls, cfg):
        model = ConvAutoencoder(size=cfg.size, code_size=cfg.code_size, depth=cfg.depth, width=cfg.width,
                                sparse=cfg.sparsity > 0, blocks=cfg.blocks)
        return autoencoder_learner(dls, model, loss=cfg.loss, wd=cfg.wd)

    def default_lr(self, cfg):
        return LR

    def callbacks(self, cfg):
        return [CodeSparsity(cfg.sparsity)] if cfg.sparsity else []

    def report(self, learn, history, folder):
        return autoencoder_report(learn, history, folder)

    def describe(self, cfg, root, dls):
        return {"split": self.split, "counts": {"train": len(dls.train_ds), "valid": len(dls.valid_ds)}}

    def save_examples(self, dls, folder):
        save_examples(dls.valid_ds.items, lambda f: "example", folder, per_class=4)

    def export(self, learn, model_path):
        export_weights_only(learn.model, autoencoder_config(learn.model), model_path)
        export_graphs(learn.model, artifact_paths(model_path)["onnx"], artifact_paths(model_path)["decoder"])

    def summary(self, m, cfg):
        advice = ("lower --lr" if m["diverged_at_epoch"] else
                  "a lower --sparsity, which trades zeros in the code for reconstruction" if cfg.sparsity else
                  "more --epochs, or a smaller --width or --depth, which trains in fewer steps")
        worse = (f" (no epoch improved on its starting point, PCA, which is what was exported: {advice})"
                 if m["kept_epoch"] == 0 else "" if m["beats_pca"] else f" (no better than PCA: {advice})")
        zeros = f"; {m['code_zero_fraction']:.0%} of the code's numbers are 0" if cfg.sparsity else ""
        return (f"held-out MSE {m['ae_mse']:.5f} (PSNR {m['ae_psnr']:.2f} dB) vs PCA with {m['pca_components']} "
                f"components {m['pca_mse']:.5f} ({m['pca_psnr']:.2f} dB): ratio {m['mse_ratio_ae_to_pca']:.3f}{worse}"
                f"{zeros}, with {kept_weights(m)}; trained in {m['train_seconds']:.0f} s; wrote {cfg.out} and its "
                "report")


def autoencoder_config(model):
    """What rebuilds the model from its weights (`ae.config.json`), and what the apps read: size and code size."""
    return {"format": FORMAT[AUTOENCODER], "kind": AUTOENCODER, "size": model.size, "code_size": model.code_size,
            "depth": model.depth, "width": model.width, "blocks": model.blocks, "sparse": model.sparse}


def export_graphs(model, image_graph=None, code_graph=None):
    """The two ONNX graphs the apps and the static Space run, into paths (or returned as bytes): an image's
    (`FromImage`: reconstruction, PCA's, code) and a code's (`FromCode`: the image it decodes to)."""
    config, code = autoencoder_config(model), {"code": torch.zeros(1, model.code_size)}
    return (to_onnx(FromImage(model), config, image_graph, outputs=AUTOENCODER_OUTPUTS),
            to_onnx(FromCode(model), config, code_graph, outputs=DECODER_OUTPUTS, inputs=code))


def load_autoencoder(path, learn=None):
    """The model of an exported autoencoder, float32 on the CPU: `learn`'s, or rebuilt from the weights and config
    beside `path` (no pickle), or, when the learner `path` is all there is, unpickled (only one you trust)."""
    paths = artifact_paths(path)
    if learn is None and paths["weights"].is_file() and paths["config"].is_file():
        model = from_weights(paths["weights"])
    elif learn is not None or Path(path).suffix == ".pkl":
        from .loading import load_trusted_learner
        model = (learn or load_trusted_learner(path)).model
    else:
        raise UserError(f"{path} was exported by an older version of training/ (no decoder graph, or no code output) "
                        "and has no weights beside it: retrain it with training/train_autoencoder.py")
    if not hasattr(model, "pca_axes"):
        raise UserError(f"{path} was trained by an older version of the autoencoder (no PCA path): "
                        "retrain it with training/train_autoencoder.py")
    return model.cpu().float().eval()


def from_weights(weights):
    """The model rebuilt from safetensors and the config beside them: no pickle involved."""
    from safetensors.torch import load_file
    from .loading import read_config
    c = read_config(weights)
    model = ConvAutoencoder(c["size"], c["code_size"], c["depth"], c["width"], sparse=c["sparse"], blocks=c["blocks"])
    model.load_state_dict(load_file(weights))
    return model
