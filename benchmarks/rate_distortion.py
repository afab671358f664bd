"""Rate-distortion: held-out PSNR against code size for the autoencoder and PCA, on the same held-out images.

    python benchmarks/rate_distortion.py --data ../shared/data/catsdogs          # 4 trainings of 3 epochs
    python benchmarks/rate_distortion.py --data DIR --code-sizes 16 64 --epochs 6

One autoencoder per code size, each trained by `training/train_autoencoder.py`'s loop with its defaults
and the options given here; each run's report scores PCA with as many components on the same held-out
images. Prints a Markdown table, writes `rate_distortion.png` into --workdir; the last line is one JSON object.
"""
import json
import tempfile
from pathlib import Path

from imagelab import ArgumentParser, run_cli


def parse(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", metavar="DIR", required=True, help="image folder (labels ignored)")
    p.add_argument("--code-sizes", type=int, nargs="+", default=[16, 32, 64, 128],
                   help="one autoencoder (and PCA) per code size")
    p.add_argument("--epochs", type=int, default=3, help="epochs each autoencoder trains")
    p.add_argument("--size", type=int, default=64, help="input size in pixels")
    p.add_argument("--bs", type=int, help="batch size, if not the trainer's default")
    p.add_argument("--lr", type=float, help="peak learning rate, if not the trainer's default")
    p.add_argument("--workdir", metavar="DIR", help="where the models and the plot go (default: a temporary folder)")
    return p.parse_args(argv)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["code_size"] for r in rows]
    ax.plot(sizes, [r["ae_psnr"] for r in rows], "o-", label="autoencoder")
    ax.plot(sizes, [r["pca_psnr"] for r in rows], "s--", label="PCA")
    ax.set_xscale("log", base=2)
    ax.set(xticks=sizes, xticklabels=sizes, xlabel="code size (numbers per image)", ylabel="held-out PSNR (dB)",
           title="Rate-distortion")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    args = parse(argv)
    from imagelab.autoencoder import AutoencoderTask
    from imagelab.config import AutoencoderConfig
    from imagelab.train import train
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rate-distortion-"))
    rows = []
    for k in args.code_sizes:
        given = {name: getattr(args, name) for name in ("bs", "lr") if getattr(args, name) is not None}
        cfg = AutoencoderConfig(data=args.data, epochs=args.epochs, size=args.size, code_size=k,
                                out=str(workdir / f"ae-{k}.pkl"), **given)
        m = train(AutoencoderTask(), cfg)
        rows.append({"code_size": k, "ae_psnr": round(m["ae_psnr"], 2), "pca_psnr": round(m["pca_psnr"], 2),
                     "mse_ratio_ae_to_pca": round(m["mse_ratio_ae_to_pca"], 3), "train_seconds": m["train_seconds"]})
    print("| code size | autoencoder PSNR (dB) | PCA PSNR (dB) | MSE ratio AE/PCA | training (s) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['code_size']} | {r['ae_psnr']:.2f} | {r['pca_psnr']:.2f} | {r['mse_ratio_ae_to_pca']:.3f} "
              f"| {r['train_seconds']:.0f} |")
    plot(rows, workdir / "rate_distortion.png")
    print(f"wrote {workdir / 'rate_distortion.png'}")
    print(json.dumps({"epochs": args.epochs, "size": args.size, "bs": cfg.bs, "lr": m["lr"], "rows": rows}))


if __name__ == "__main__":
    run_cli(main)
