"""The autoencoder app's work in torch (the trained model) against ONNX Runtime (`Reconstructor`, what the app
serves), side by side on the same model and images.

    python benchmarks/autoencoder_serving.py --model models/autoencoder.pkl --images ../shared/data/catsdogs

Per image, in alternation so that machine noise hits both alike: an upload's reconstruction and PCA's with
both PSNRs, and the walk from it to the next image (8 steps), decoding included. Also each side's start in a
fresh process (imports and loading the model), and how far apart their outputs are. Prints a table, then one
JSON object as the last line.
"""
import json
import statistics
import subprocess
import sys
import time

import numpy as np

from imagelab import ArgumentParser, run_cli
from imagelab.inference import psnr, square_input, to_image
from imagelab.loading import open_model

STEPS = 8
START = {  # a fresh process's imports and model load, per side
    "torch": "from imagelab.autoencoder import load_autoencoder; load_autoencoder(path)",
    "onnxruntime": "from imagelab.loading import open_model; open_model(path, 'autoencoder')",
}


class TorchSide:
    """What the app computes, with the trained torch model on the CPU."""

    def __init__(self, path):
        import torch
        from imagelab.autoencoder import load_autoencoder
        self.torch, self.model = torch, load_autoencoder(path)

    def reconstruct(self, image):
        x = self.torch.from_numpy(square_input(image, self.model.size))
        with self.torch.no_grad():
            rebuilt = [self.model(x), self.model.pca(x)]
        return [(to_image(r[0].numpy()), psnr(float(((r - x) ** 2).mean()))) for r in rebuilt]

    def interpolate(self, a, b, steps=STEPS):
        torch, x = self.torch, np.concatenate([square_input(im, self.model.size) for im in (a, b)])
        t = torch.linspace(0, 1, steps)[:, None]
        with torch.no_grad():
            code_a, code_b = self.model.encode(torch.from_numpy(x))
            frames = self.model.decode((1 - t) * code_a + t * code_b)
        return to_image(torch.cat(list(frames), dim=2).numpy())


class OnnxSide:
    def __init__(self, path):
        self.ae = open_model(path, "autoencoder")

    def reconstruct(self, image):
        r = self.ae.reconstruct(image)
        return [(r.reconstruction, r.psnr), (r.pca, r.pca_psnr)]

    def interpolate(self, a, b, steps=STEPS):
        return self.ae.interpolate(a, b, steps)


def start_seconds(model, side, repeats):
    """Median seconds a fresh process takes to import and load the model for `side`."""
    code = f"import sys, time\nt = time.perf_counter()\npath = sys.argv[1]\n{START[side]}\n" \
           "print(time.perf_counter() - t)"
    return statistics.median(float(subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True,
                                                  text=True, check=True).stdout) for _ in range(repeats))


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported autoencoder (.pkl with its graphs beside it)")
    p.add_argument("--images", required=True, help="folder of images (recursive)")
    p.add_argument("--limit", type=int, default=60, help="images to time")
    p.add_argument("--starts", type=int, default=3, help="fresh processes started per side")
    args = p.parse_args(argv)

    from imagelab.data import find_images  # the training stack: after --help
    sides = {"torch": TorchSide(args.model), "onnxruntime": OnnxSide(args.model)}
    files = find_images(args.images)[0]
    files = [files[i] for i in np.linspace(0, len(files) - 1, min(args.limit, len(files))).astype(int)]
    for side in sides.values():  # warm up
        side.reconstruct(files[0]), side.interpolate(files[0], files[-1])
    times = {(name, work): [] for name in sides for work in ("reconstruct", "interpolate")}
    grey_apart, db_apart = 0, 0.0
    for i, f in enumerate(files):
        got = {}
        for name, side in sides.items():
            t = time.perf_counter()
            rebuilt = side.reconstruct(f)
            times[name, "reconstruct"].append(time.perf_counter() - t)
            t = time.perf_counter()
            walk = side.interpolate(f, files[(i + 1) % len(files)])
            times[name, "interpolate"].append(time.perf_counter() - t)
            got[name] = [np.asarray(im, np.int16) for im, _ in rebuilt] + [np.asarray(walk, np.int16)], \
                [db for _, db in rebuilt]
        (t_images, t_db), (o_images, o_db) = got["torch"], got["onnxruntime"]
        grey_apart = max(grey_apart, *(int(np.abs(a - b).max()) for a, b in zip(t_images, o_images)))
        db_apart = max(db_apart, *(abs(a - b) for a, b in zip(t_db, o_db)))

    ms = {f"{name}_{work}_ms": round(1000 * statistics.median(v), 2) for (name, work), v in times.items()}
    result = {**ms, "images": len(files), "steps": STEPS,
              "reconstruct_speedup": round(ms["torch_reconstruct_ms"] / ms["onnxruntime_reconstruct_ms"], 2),
              "interpolate_speedup": round(ms["torch_interpolate_ms"] / ms["onnxruntime_interpolate_ms"], 2),
              **{f"{side}_start_s": round(start_seconds(args.model, side, args.starts), 2) for side in START},
              "max_grey_levels_apart": grey_apart, "max_psnr_db_apart": round(db_apart, 6)}
    print(f"{'':14}{'torch':>10}{'onnxruntime':>14}")
    for work in ("reconstruct", "interpolate"):
        print(f"{work + ' ms':14}{ms[f'torch_{work}_ms']:>10}{ms[f'onnxruntime_{work}_ms']:>14}")
    print(f"{'start s':14}{result['torch_start_s']:>10}{result['onnxruntime_start_s']:>14}")
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
