"""The static Space in Chromium against ONNX Runtime in Python, side by side on the same model and photos.

    python benchmarks/static_space.py --model models/pets.pkl --images ../shared/data/catsdogs --n 100
    python benchmarks/static_space.py --app autoencoder --model models/autoencoder.pkl --images ../shared/data/catsdogs

Builds the static Space (`deploy --static`), serves it on 127.0.0.1 and, photo by photo, runs each file
through the app's Python model (`Predictor`, `Reconstructor`) and then through the page
(`window.imagelab.classify`, `.reconstruct`; decoding included, timed in the page), so machine noise hits
both alike. Prints how far apart they are (a classifier: top-1 agreement and probabilities; an
autoencoder: the PSNRs of its reconstruction and of PCA's), the time per photo of each, then one JSON
object as the last line.
"""
import argparse
import base64
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from imagelab import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Classifier:
    """The page's `classify` against the Predictor: (top-1 agrees, largest probability difference)."""
    call = "classify"

    def __init__(self, served):
        self.served = served

    def python(self, photo):
        return self.served.probabilities([photo])[0]

    def compare(self, want, got):
        vocab = self.served.vocab
        diff = max(abs(g["confidence"] - float(want[vocab.index(g["label"])])) for g in got)
        return got[0]["label"] == vocab[want.argmax()], diff


class Autoencoder:
    """The page's `reconstruct` against the Reconstructor: (True, largest PSNR difference in dB, its or PCA's)."""
    call = "reconstruct"

    def __init__(self, served):
        self.served = served

    def python(self, photo):
        return self.served.reconstruct(photo)

    def compare(self, want, got):
        return True, max(abs(want.psnr - got["psnr"]), abs(want.pca_psnr - got["pcaPsnr"]))


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--app", default="pets", help="which app's static Space (pets, bears, autoencoder)")
    p.add_argument("--model", required=True, help="an exported model of that app (.pkl with its graphs and report)")
    p.add_argument("--images", required=True, help="folder of photos (recursive)")
    p.add_argument("--n", type=int, default=100, help="photos, spread evenly over the sorted folder")
    args = p.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from imagelab.loading import config_kind, open_model, read_config
    from imagelab.paths import dataset_files

    files = dataset_files(args.images)
    photos = [files[i * len(files) // args.n] for i in range(min(args.n, len(files)))]
    tmp = tempfile.TemporaryDirectory(prefix="static-bench-")  # removed when the program ends
    site = Path(tmp.name) / "site"
    subprocess.run([sys.executable, "-m", "imagelab.deploy", args.app, "--model", args.model, "--static", "--out", site],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    kind = config_kind(read_config(args.model))
    side = (Autoencoder if kind == "autoencoder" else Classifier)(open_model(args.model, kind))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        start = time.perf_counter()
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for_selector("body[data-ready]", timeout=120_000)
        load_s = time.perf_counter() - start
        for photo in photos:
            t = time.perf_counter()
            want = side.python(photo)
            py_ms = 1000 * (time.perf_counter() - t)
            got, js_ms = page.evaluate("""async ([call, b64]) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const t = performance.now();
                const out = await window.imagelab[call](new Blob([bytes]));
                return [out, performance.now() - t];
            }""", [side.call, base64.b64encode(photo.read_bytes()).decode()])
            agree, diff = side.compare(want, got)
            rows.append({"photo": photo.name, "agree": agree, "diff": diff, "py_ms": py_ms, "js_ms": js_ms})
        browser.close()
    server.shutdown()
    measure = "psnr_db" if kind == "autoencoder" else "prob"
    out = {"model": args.model, "kind": kind, "photos": len(rows),
           **({} if kind == "autoencoder" else {"top1_agree": sum(r["agree"] for r in rows)}),
           f"max_abs_{measure}_diff": max(r["diff"] for r in rows),
           f"mean_abs_{measure}_diff": statistics.mean(r["diff"] for r in rows),
           "python_ms_per_photo": round(statistics.median(r["py_ms"] for r in rows), 1),
           "browser_ms_per_photo": round(statistics.median(r["js_ms"] for r in rows), 1),
           "page_load_s": round(load_s, 2)}
    out["browser_to_python_time_ratio"] = round(out["browser_ms_per_photo"] / out["python_ms_per_photo"], 2)
    worst = max(rows, key=lambda r: r["diff"])
    what = "PSNRs (dB)" if kind == "autoencoder" else \
        f"top-1 agrees on {out['top1_agree']}/{len(rows)} photos; probabilities"
    print(f"{what} differ by at most {out[f'max_abs_{measure}_diff']:.2e} ({worst['photo']}), "
          f"{out[f'mean_abs_{measure}_diff']:.2e} on average")
    print(f"median per photo: Python (ONNX Runtime) {out['python_ms_per_photo']} ms, browser "
          f"{out['browser_ms_per_photo']} ms (x{out['browser_to_python_time_ratio']}); page ready in {out['page_load_s']} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
