"""The static Space: a real Chromium runs the bundle from a plain file server on 127.0.0.1, and agrees with Python.

onnxruntime-web comes from the npm registry: test.sh fetches it once into build/test-cache (the tests
themselves reach nothing but 127.0.0.1), and the registry tests below serve it from 127.0.0.1.
"""
import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import PY, ROOT, fails_with_one_line, free_port, run
from test_browser import CAMERA, chromium, evaluate
from uploads import invalid_uploads, valid_uploads
from imagelab import onnxruntime_web
from imagelab.loading import open_model

RUNTIME_CACHE = ROOT / "build" / "test-cache"  # where test.sh fetches onnxruntime-web
OFFLINE = {"HF_TOKEN": "", "HF_HUB_OFFLINE": "1"}


@contextmanager
def file_server(folder):
    """Python's own static file server on 127.0.0.1 serving `folder`, like any host of a static site."""
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def deploy_static(model, out, cache=RUNTIME_CACHE, app="pets", **env):
    return run(["-m", "imagelab.deploy", app, "--model", model, "--static", "--out", out],
               env={**os.environ, **OFFLINE, "IMAGELAB_CACHE": str(cache), **env})


def photo(path, size, seed, **save):
    """A photo-like image: smooth random colour fields (reddish to bluish: the tiny model's two classes) plus grain."""
    rng = np.random.default_rng(seed)
    w, h = size
    field = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    tint = np.array([220, 60, 60]) * (seed % 5) / 4 + np.array([60, 60, 220]) * (1 - (seed % 5) / 4)
    pixels = 0.5 * np.asarray(field, np.float32) + 0.5 * tint + rng.normal(0, 12, (h, w, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, **save)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """20 images as people upload them: JPEG photos of many sizes (shrunk a lot, a little, or enlarged), a
    progressive JPEG, PNG; and EXIF rotation, transparency, a palette and WEBP from the upload corpus."""
    d = tmp_path_factory.mktemp("photos")
    sizes = [(500, 375), (375, 500), (320, 240), (1024, 768), (640, 427), (800, 800), (90, 60), (24, 18),
             (333, 500), (1600, 1200), (41, 41), (200, 150), (451, 300), (300, 451), (256, 192)]
    out = [photo(d / f"photo_{i:02d}.jpg", s, seed=i, quality=85) for i, s in enumerate(sizes)]
    out.append(photo(d / "progressive.jpg", (480, 360), seed=15, quality=90, progressive=True))
    corpus = valid_uploads(d / "corpus")
    out += [corpus[n] for n in ("exif_rotated.jpg", "rgba.png", "palette.png", "photo.webp")]
    assert len(out) == 20
    return out


@pytest.fixture(scope="module")
def browser():
    """Chromium, one for the module's pages (Playwright's sync API runs one instance at a time)."""
    with chromium(*CAMERA) as browser:
        yield browser


@contextmanager
def static_page(browser, model, app, tmp):
    """`app`'s static Space built from `model`, copied elsewhere and the original deleted, served by a plain file
    server on 127.0.0.1 and open in Chromium."""
    assert onnxruntime_web.cached_tarball(RUNTIME_CACHE).is_file(), (
        "onnxruntime-web is not fetched: bash test.sh, or IMAGELAB_CACHE=build/test-cache python -m imagelab.onnxruntime_web")
    res = deploy_static(model, tmp / "build" / f"{app}-static", app=app)
    assert res.returncode == 0, res.stderr[-2000:]
    moved = shutil.copytree(tmp / "build" / f"{app}-static", tmp / "elsewhere" / "site")
    shutil.rmtree(tmp / "build")
    with file_server(moved) as url:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))  # a 404 is one
        page.goto(url)
        page.wait_for_selector("body[data-ready]", timeout=60_000)
        page.folder, page.errors = moved, errors
        yield page
        page.close()


@pytest.fixture(scope="module")
def page(browser, tiny_model, tmp_path_factory):
    with static_page(browser, tiny_model, "pets", tmp_path_factory.mktemp("static")) as page:
        yield page


@pytest.fixture(scope="module")
def autoencoder_page(browser, tiny_autoencoder, tmp_path_factory):
    with static_page(browser, tiny_autoencoder, "autoencoder", tmp_path_factory.mktemp("ae-static")) as page:
        yield page


def expected(model, photos):
    from imagelab.inference import Predictor
    predictor = Predictor(model)
    return [dict(zip(predictor.vocab, map(float, probs))) for probs in predictor.probabilities(photos)]


def assert_agree(got, want, photos):
    """Top-1 is the Predictor's on every image, and every probability shown is within 0.02 of its; returns the
    largest difference."""
    for name, g, w in zip((p.name for p in photos), got, want):
        assert g[0]["label"] == max(w, key=w.get), (name, g, w)
        for item in g:
            assert abs(item["confidence"] - w[item["label"]]) <= 0.02, (name, g, w)
    return max(abs(item["confidence"] - w[item["label"]]) for g, w in zip(got, want) for item in g)


def test_folder_holds_what_the_page_needs_and_only_that(page):
    names = {p.relative_to(page.folder).as_posix() for p in page.folder.rglob("*") if p.is_file()}
    assert {"index.html", "imagelab.js", "pets.onnx", "pets.config.json", "README.md", ".gitattributes",
            "onnxruntime-web/ort.wasm.bundle.min.js", "onnxruntime-web/ort-wasm-simd-threaded.wasm"} <= names
    assert sorted(n for n in names if n.startswith("onnxruntime-web/")) == sorted(
        f"onnxruntime-web/{f}" for f in onnxruntime_web.FILES.values())  # no WebGPU, WebGL or JSPI builds
    assert not [n for n in names if n.endswith((".pkl", ".safetensors", ".py"))]
    readme = (page.folder / "README.md").read_text()
    meta = yaml.safe_load(readme.split("---\n")[1])
    assert meta["sdk"] == "static" and meta["app_file"] == "index.html" and meta["title"] == "Pet classifier"
    assert "$" not in readme and "window.imagelab.classify" in readme
    rules = (page.folder / ".gitattributes").read_text()
    assert "*.onnx filter=lfs" in rules and "*.wasm filter=lfs" in rules


def test_classify_agrees_with_the_python_predictor(page, photos, tiny_model):
    images = [base64.b64encode(p.read_bytes()).decode() for p in photos]
    got = evaluate(page, """async (images) => {
        const out = [];
        for (const b64 of images) {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            out.push(await window.imagelab.classify(new Blob([bytes])));
        }
        return out;
    }""", images)
    want = expected(tiny_model, photos)
    # The page resizes exactly as Pillow does, so only float rounding may differ. Another resampling filter
    # moves this barely trained model's probabilities by less than 0.02: the tolerance alone would miss it.
    assert assert_agree(got, want, photos) < 1e-4
    assert all(len(g) == 2 and g[0]["confidence"] >= g[1]["confidence"] for g in got)  # every class, best first
    assert not page.errors


def test_upload_control_shows_the_predictors_top_labels(page, photos, tiny_model):
    got = []
    for p in photos:
        page.set_input_files("#upload", str(p))
        page.wait_for_selector(f'#results[data-source="{p.name}"]', timeout=30_000)
        got.append(page.eval_on_selector_all("#results li", "lis => lis.map(li => ({label: li.dataset.label, "
                                             "confidence: Number(li.dataset.confidence)}))"))
        assert page.inner_text("#results li .pct").endswith("%")
    assert_agree(got, expected(tiny_model, photos), photos)
    assert page.eval_on_selector("#upload", "input => input.files.length") == 1
    page.click("#examples button")  # the examples are served from the folder and classified too
    page.wait_for_selector('#results[data-source="cats_0.jpg"] li', timeout=30_000)
    assert page.eval_on_selector("#upload", "input => input.files.length") == 0  # no longer names the last file
    assert not page.errors


def test_an_unreadable_upload_says_so(page, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture")
    page.set_input_files("#upload", str(bad))
    page.wait_for_selector('#results[data-source=""]', state="attached", timeout=30_000)
    assert "notes.jpg: not a readable image" in page.inner_text("#status")
    # no broken-image icon where the picture would be
    page.wait_for_function("!document.querySelector('#preview').hasAttribute('src')", timeout=10_000)
    # a small file that claims a huge picture: refused from its header, as in Python, before anything decodes it
    for name, (path, _) in invalid_uploads(tmp_path / "bad").items():
        if name.startswith("bomb"):
            start = time.monotonic()
            page.set_input_files("#upload", str(path))
            page.wait_for_function("document.querySelector('#status').textContent.includes('image too large')",
                                   timeout=30_000)
            assert time.monotonic() - start < 15, name


def test_only_the_latest_upload_is_answered(page, photos, tmp_path):
    """A large image then a small one at once: the small one's answer comes first, the large one's later, and
    the later must not be drawn beside the small one."""
    big = tmp_path / "big.png"
    Image.effect_noise((3000, 3000), 64).convert("RGB").save(big)  # slow to decode and to shrink
    small = photos[0]
    page.set_input_files("#upload", str(big))
    page.set_input_files("#upload", str(small))
    page.wait_for_selector(f'#results[data-source="{small.name}"]', state="attached", timeout=60_000)
    page.wait_for_selector('#output[aria-busy="false"]', state="attached", timeout=60_000)  # both runs ended
    assert page.get_attribute("#results", "data-source") == small.name and page.inner_text("#status") == ""


def test_runtime_comes_checked_from_the_registry_then_from_the_cache(tmp_path):
    """A registry on 127.0.0.1 (npm_config_registry, as npm reads it): a tarball that is not the pinned one is
    refused and nothing is cached; the real one is cached, and then the registry is not needed."""
    tgz = tmp_path / "registry" / onnxruntime_web.PACKAGE / "-" / f"{onnxruntime_web.PACKAGE}-{onnxruntime_web.VERSION}.tgz"
    tgz.parent.mkdir(parents=True)
    tgz.write_bytes(b"not the package")
    cache = tmp_path / "cache"
    env = {**os.environ, "IMAGELAB_CACHE": str(cache)}
    with file_server(tmp_path / "registry") as url:
        env["npm_config_registry"] = url
        fails_with_one_line(run(["-m", "imagelab.onnxruntime_web"], env=env), "failed its integrity check")
        assert not onnxruntime_web.cached_tarball(cache).exists()
        shutil.copy(onnxruntime_web.cached_tarball(RUNTIME_CACHE), tgz)
        res = run(["-m", "imagelab.onnxruntime_web"], env=env)
        assert res.returncode == 0, res.stderr[-2000:]
    assert onnxruntime_web.cached_tarball(cache).read_bytes() == tgz.read_bytes()
    res = run(["-m", "imagelab.onnxruntime_web"], env=env)  # the registry is gone
    assert res.returncode == 0 and "verified" in res.stdout, res.stderr[-2000:]


def test_deploy_static_stops_with_one_line_before_writing(tiny_model, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}/"
    res = deploy_static(tiny_model, tmp_path / "out", cache=tmp_path / "empty", npm_config_registry=closed)
    fails_with_one_line(res, "cannot fetch onnxruntime-web", "python -m imagelab.onnxruntime_web")
    model = tmp_path / "ae" / "pets.pkl"  # a report that says autoencoder, of a classifier's files
    shutil.copytree(tiny_model.parent, model.parent)
    metrics = model.with_name("pets.report") / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "kind": "autoencoder"}))
    fails_with_one_line(deploy_static(model, tmp_path / "out"), "the pets app serves classifier models")
    fails_with_one_line(deploy_static(model, tmp_path / "out", app="autoencoder"), "missing", "pets.decoder.onnx",
                        "re-export")
    shutil.copy(model.with_suffix(".onnx"), model.with_name("pets.decoder.onnx"))
    fails_with_one_line(deploy_static(model, tmp_path / "out", app="autoencoder"),
                        "the model's ONNX graph has no output 'reconstruction'",
                        "retrain it")  # the page would read outputs that this graph (a classifier's) lacks
    assert not (tmp_path / "out").exists()


def test_a_push_without_a_token_says_only_that(tiny_model, tmp_path):
    """A Gradio push's note on paid hardware comes once the login check has passed (tests/test_deploy.py pushes)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}
    for static in ([], ["--static"]):
        res = run(["-m", "imagelab.deploy", "pets", "--model", tiny_model, "--out", tmp_path / "out", *static,
                   "--push", "me/pets"], env=env)
        fails_with_one_line(res, "no Hugging Face token")
        assert "paid hardware" not in res.stdout, res.stdout


def test_paste_and_webcam_are_classified(page, photos):
    evaluate(page, """async (b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "clip.jpg", {type: "image/jpeg"}));
        document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data}));
    }""", base64.b64encode(photos[0].read_bytes()).decode())
    page.wait_for_selector('#results[data-source="pasted image"] li', timeout=30_000)
    page.click("#webcam")
    page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=30_000)
    page.click("#webcam")  # now "Take photo"
    page.wait_for_selector('#results[data-source="webcam photo"] li', timeout=30_000)
    assert page.eval_on_selector("#results li", "li => li.dataset.label") in ("cats", "dogs")
    assert not page.errors


def test_autoencoder_page_rebuilds_as_python_does(autoencoder_page, photos, tiny_autoencoder):
    """The same preprocessing (the centre square, Pillow's resize) and the same graph: the PSNRs of the
    reconstruction and of PCA's, through the script API and through the upload control, are Python's."""
    page, ae = autoencoder_page, open_model(tiny_autoencoder, "autoencoder")
    names = {p.relative_to(page.folder).as_posix() for p in page.folder.rglob("*") if p.is_file()}
    assert {"index.html", "autoencoder.js", "images.js", "autoencoder.onnx", "autoencoder.decoder.onnx",
            "autoencoder.config.json"} <= names
    assert not [n for n in names if n.endswith((".pkl", ".safetensors", ".py"))]
    readme = (page.folder / "README.md").read_text()
    assert yaml.safe_load(readme.split("---\n")[1])["sdk"] == "static" and "$" not in readme
    assert "window.imagelab.reconstruct" in readme
    some = photos[::3]  # sizes from 24x18 to 1600x1200, EXIF rotation, transparency
    got = evaluate(page, """async (images) => {
        const out = [];
        for (const b64 of images) {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const r = await window.imagelab.reconstruct(new Blob([bytes]));
            out.push([r.psnr, r.pcaPsnr]);
        }
        return out;
    }""", [base64.b64encode(p.read_bytes()).decode() for p in some])
    want = [(r.psnr, r.pca_psnr) for r in map(ae.reconstruct, some)]
    assert np.allclose(got, want, atol=1e-3), (got, want)
    page.set_input_files("#upload", str(some[0]))
    page.wait_for_selector(f'#figures[data-source="{some[0].name}"]', timeout=30_000)
    shown = page.eval_on_selector("#figures", "e => [Number(e.dataset.psnr), Number(e.dataset.pcaPsnr)]")
    assert np.allclose(shown, want[0], atol=1e-3) and "PSNR" in page.inner_text("#psnr")
    drawn = page.eval_on_selector("#reconstruction", "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, "
                                  "c.height).data.filter((_, i) => i % 4 === 3)).every((a) => a === 255)")
    assert drawn  # every pixel of the reconstruction's canvas painted
    page.click("#examples button")
    page.wait_for_selector('#figures[data-source$=".jpg"]', timeout=30_000)
    assert not page.errors


def test_autoencoder_page_walks_between_two_codes_as_python_does(autoencoder_page, photos, tiny_autoencoder):
    """The decoder graph on codes evenly spaced between two images' codes: Python's strip, pixel for pixel (within
    one grey level), through the script API and the page's two inputs."""
    page, (a, b) = autoencoder_page, (photos[0], photos[5])
    frames = evaluate(page, """async ([a, b]) => {
        const blob = (b64) => new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))]);
        const r = await window.imagelab.interpolate(blob(a), blob(b), 5);
        return r.frames.map((f) => Array.from(f));
    }""", [base64.b64encode(p.read_bytes()).decode() for p in (a, b)])
    want = np.asarray(open_model(tiny_autoencoder, "autoencoder").interpolate(a, b, steps=5)).astype(int)  # S x 5S x 3
    size = want.shape[0]
    got = np.concatenate([np.asarray(f).reshape(3, size, size).transpose(1, 2, 0) for f in frames], axis=1)
    assert np.abs(np.round(np.clip(got, 0, 1) * 255) - want).max() <= 1
    page.set_input_files("#from", str(a))
    page.set_input_files("#to", str(b))
    page.wait_for_selector(f'#walk[data-source="{a.name} -> {b.name} in 8"]', timeout=30_000)
    assert page.eval_on_selector("#walk", "c => [c.width, c.height]") == [8 * size, size]
    assert not page.errors


@pytest.mark.parametrize("app", ["pets", "autoencoder"])
def test_the_benchmark_runs_the_page_and_python_alike(tiny_model, tiny_autoencoder, photos, tmp_path, app):
    model = tiny_autoencoder if app == "autoencoder" else tiny_model
    for p in photos[:3]:  # JPEG photos, of three sizes
        shutil.copy(p, tmp_path / p.name)
    res = run(["benchmarks/static_space.py", "--app", app, "--model", model, "--images", tmp_path, "--n", "3"],
              env={**os.environ, **OFFLINE, "IMAGELAB_CACHE": str(RUNTIME_CACHE)}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["photos"] == 3 and out["browser_ms_per_photo"] > 0 and out["python_ms_per_photo"] > 0
    if app == "autoencoder":
        assert out["kind"] == "autoencoder" and out["max_abs_psnr_db_diff"] < 1e-3
    else:
        assert out["kind"] == "classifier" and out["top1_agree"] == 3 and out["max_abs_prob_diff"] < 1e-4
