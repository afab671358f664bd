"""fastai's learn.predict against imagelab's Predictor, side by side on the same model and images.

    python benchmarks/inference.py --model models/pets.pkl --images ../shared/data/catsdogs

Both classify the same files (decoding included) in alternation, so machine noise hits both alike.
The same loop also times what the classifier app does for its heatmap (labels and Grad-CAM from one
run of the graph, drawn over the image) and flip TTA (`Predictor(tta=True)`), each as a ratio to a
plain prediction. Prints a table, then one JSON object as the last line. `--cold-start` also times `python app.py`
from launch to its first answered request.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from imagelab import ArgumentParser, run_cli
from imagelab.inference import Predictor, overlay
from imagelab.paths import example_images

ROOT = Path(__file__).resolve().parents[1]


def p95(xs):
    return float(np.percentile(xs, 95))


def cold_start(model, timeout=180):
    """Seconds from starting the root app.py to its first answered pets request."""
    import socket
    from gradio_client import Client, handle_file
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    example = example_images(model)[0]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT,
                            env={**os.environ, "PETS_MODEL": str(Path(model).resolve())},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            try:
                Client(f"http://127.0.0.1:{port}/", verbose=False).predict(handle_file(str(example)),
                                                                           api_name="/pets_predict")
                return time.perf_counter() - start
            except Exception:  # not up yet
                time.sleep(0.1)
        raise TimeoutError(f"app did not answer within {timeout}s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="exported learner (.pkl)")
    p.add_argument("--images", required=True, help="folder of images (recursive)")
    p.add_argument("--limit", type=int, default=100, help="images to time")
    p.add_argument("--warmup", type=int, default=3, help="untimed predictions first")
    p.add_argument("--cold-start", action="store_true", help="also time app.py from launch to first answer")
    args = p.parse_args(argv)

    from fastai.learner import load_learner  # the training stack: after --help
    from imagelab.data import RGBImage, find_images
    learn = load_learner(args.model, cpu=True)
    predictor, flip = Predictor(args.model), Predictor(args.model, tta=True)
    files = find_images(args.images)[0]
    files = [files[i] for i in np.linspace(0, len(files) - 1, min(args.limit, len(files))).astype(int)]

    def fastai_probs(f):
        with learn.no_bar():
            return learn.predict(RGBImage.create(f))[2].numpy()

    def app_heatmap(f):  # what the classifier panel computes: labels, then the heatmap drawn over the image
        labels, view, heat = predictor.explain(f)
        return overlay(view, heat)

    extras = {"heatmap": app_heatmap if predictor.has_heatmap else None, "flip_tta": lambda f: flip.probabilities([f])}
    extras = {k: fn for k, fn in extras.items() if fn}
    for f in files[: args.warmup]:
        fastai_probs(f), predictor.probabilities([f]), *(fn(f) for fn in extras.values())
    t_learn, t_pred, agree, diff = [], [], 0, 0.0
    t_extra = {k: [] for k in extras}
    for f in files:
        t0 = time.perf_counter()
        a = fastai_probs(f)
        t1 = time.perf_counter()
        b = predictor.probabilities([f])[0]
        t2 = time.perf_counter()
        for k, fn in extras.items():
            t3 = time.perf_counter()
            fn(f)
            t_extra[k].append((time.perf_counter() - t3) * 1000)
        t_learn.append((t1 - t0) * 1000)
        t_pred.append((t2 - t1) * 1000)
        agree += int(a.argmax() == b.argmax())
        diff = max(diff, float(np.abs(a - b).max()))

    result = {"learn_predict_ms": round(statistics.median(t_learn), 2), "predictor_ms": round(statistics.median(t_pred), 2),
              "learn_predict_p95_ms": round(p95(t_learn), 2), "predictor_p95_ms": round(p95(t_pred), 2),
              "speedup": round(statistics.median(t_learn) / statistics.median(t_pred), 2),
              "top1_agree": agree / len(files), "max_prob_diff": diff, "n_images": len(files),
              **{f"{k}_ms": round(statistics.median(t), 2) for k, t in t_extra.items()},
              **{f"{k}_over_predict": round(statistics.median(t) / statistics.median(t_pred), 2) for k, t in t_extra.items()}}
    if args.cold_start:
        result["cold_start_s"] = round(cold_start(args.model), 2)
    print(f"{'':16}{'median ms':>10}{'p95 ms':>10}")
    print(f"{'learn.predict':16}{result['learn_predict_ms']:>10}{result['learn_predict_p95_ms']:>10}")
    print(f"{'Predictor':16}{result['predictor_ms']:>10}{result['predictor_p95_ms']:>10}")
    for k, t in t_extra.items():
        print(f"{k:16}{statistics.median(t):>10.2f}{p95(t):>10.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
