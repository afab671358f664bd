"""Search, download, de-duplication, verification and quarantine, against a stand-in web on 127.0.0.1.

The search package and its HTTP client run unchanged, reaching "duckduckgo.com" and "www.bing.com"
through an HTTPS proxy on 127.0.0.1 (tests/search_server.py); the image URLs they return point at
the same server, so the real download code fetches real image bytes over real HTTP.
"""
import hashlib
import io
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from conftest import PY, ROOT, interruptible, read_until, run
from imagelab import UserError, download
from imagelab.data import check_image
from imagelab.download import make_dataset, search_images
from search_server import Web

PROXY_VARS = ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
              "no_proxy", "DDGS_PROXY", "SSL_CERT_FILE"]


def image_bytes(color, fmt="JPEG", mode="RGB", size=(40, 32)):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def web(tmp_path, monkeypatch):
    """The stand-in web, with this process's search client pointed at it the way a user would: proxy + CA."""
    web = Web(tmp_path)
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", web.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(web.ca_file))
    yield web
    web.close()


def bear_web(web):
    """Search results for three bear classes, with every kind of trouble a scrape brings."""
    jpeg = image_bytes((120, 80, 40))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).resize(
        (160, 120), Image.Resampling.BICUBIC)  # shapes at every scale, as a photo has: what a perceptual hash reads
    shapes, shapes_small = io.BytesIO(), io.BytesIO()
    picture.save(shapes, "JPEG")
    picture.resize((80, 60)).save(shapes_small, "PNG")
    shapes, shapes_small = shapes.getvalue(), shapes_small.getvalue()
    web.images.update({
        "g/1.jpg": ("image/jpeg", jpeg),
        "g/2.jpg": ("image/jpeg", image_bytes((110, 70, 30))),
        "g/same-as-1.jpg": ("image/jpeg", jpeg),  # the same bytes under another URL: a duplicate
        "g/cut.jpg": ("image/jpeg", image_bytes((100, 60, 20), size=(400, 300))[:900]),  # truncated
        "g/page.jpg": ("image/jpeg", b"<html>Access denied</html>"),  # a web page posing as an image
        "g/slow.jpg": ("image/jpeg", image_bytes((90, 60, 20))),
        "b/alpha.png": ("image/png", image_bytes((20, 20, 20, 0), "PNG", "RGBA")),
        "b/palette.png": ("image/png", image_bytes(3, "PNG", "P")),
        "b/photo.webp": ("image/webp", image_bytes((30, 30, 30), "WEBP")),
        "b/1.jpg?width=3200&height=1680&fit=crop": ("image/jpeg", image_bytes((40, 40, 40))),
        "t/1.jpg": ("image/jpeg", image_bytes((230, 200, 120))),
        "t/2.gif": ("image/gif", image_bytes((220, 190, 110), "GIF")),
        "t/grizzly-again.jpg": ("image/jpeg", jpeg),  # a duplicate across classes
        "t/shapes.jpg": ("image/jpeg", shapes),
        "t/shapes-small.png": ("image/png", shapes_small),  # other bytes, the same picture: a duplicate
    })
    web.delay["g/slow.jpg"] = 5  # longer than the --timeout the tests give
    web.results["grizzly bear"] = ["g/1.jpg", "g/2.jpg", "g/same-as-1.jpg", "g/cut.jpg", "g/page.jpg", "g/slow.jpg",
                                   "g/missing.jpg"]  # 404
    web.results["black bear"] = ["b/alpha.png", "b/palette.png", "b/photo.webp",
                                 "b/1.jpg?width=3200&height=1680&fit=crop"]
    web.results["teddy bear"] = ["t/1.jpg", "t/2.gif", "t/grizzly-again.jpg", "t/shapes.jpg", "t/shapes-small.png"]
    return web


def tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("backend", ["duckduckgo", "bing"])
def test_search_pages_through_results_of_either_engine(web, backend):
    web.results["grizzly bear"] = [f"g/{i}.jpg" for i in range(130)]
    urls = search_images("grizzly bear", 120, backend=backend)
    assert urls == [web.image_url(f"g/{i}.jpg") for i in range(120)]  # DuckDuckGo: 2 pages; Bing: 4
    assert {host for host, _, _ in web.searches} == {"duckduckgo.com" if backend == "duckduckgo" else "www.bing.com"}
    assert search_images("grizzly bear", 5, backend=backend) == [web.image_url(f"g/{i}.jpg") for i in range(5)]


def test_download_verifies_dedupes_and_quarantines(web, tmp_path):
    bear_web(web)
    web.results["black bear"].append("file:///etc/passwd")  # a result must never make us read a local file
    dest = tmp_path / "bears"
    summary = make_dataset(["grizzly", "black", "teddy"], dest, per_class=10, query="{} bear", timeout=1)

    by_hash = {}
    for key, (_, body) in web.images.items():
        by_hash.setdefault(hashlib.sha256(body).hexdigest()[:16], key)
    saved = {c: sorted(by_hash[p.name.split(".")[0]] for p in (dest / c).iterdir())
             for c in ("grizzly", "black", "teddy")}
    assert saved == {"grizzly": ["g/1.jpg", "g/2.jpg"],
                     "black": ["b/1.jpg?width=3200&height=1680&fit=crop", "b/alpha.png", "b/palette.png",
                               "b/photo.webp"],
                     "teddy": ["t/1.jpg", "t/2.gif", "t/shapes.jpg"]}
    for c in saved:
        for p in (dest / c).iterdir():
            assert check_image(p) is None
            with Image.open(p) as im:  # named by content hash, with the suffix of the real format
                assert p.suffix == {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}[im.format]

    quarantined = sorted((dest / "quarantine" / "grizzly").iterdir())
    assert sorted(p.read_bytes() for p in quarantined) == sorted(web.images[k][1] for k in ("g/cut.jpg", "g/page.jpg"))
    reasons = (dest / "quarantine" / "reasons.tsv").read_text().splitlines()
    assert len(reasons) == 2 and all(line.count("\t") == 3 for line in reasons)
    assert {line.split("\t")[3] for line in reasons} == {web.image_url("g/cut.jpg"), web.image_url("g/page.jpg")}

    assert summary == json.loads((dest / "download-summary.json").read_text())
    assert summary["classes"]["grizzly"] == {"found": 7, "saved": 2, "duplicate": 1, "quarantined": 2, "failed": 2,
                                             "images": 2}
    assert summary["classes"]["black"] == {"found": 5, "saved": 4, "duplicate": 0, "quarantined": 0, "failed": 1,
                                           "images": 4}
    assert summary["classes"]["teddy"] == {"found": 5, "saved": 3, "duplicate": 2, "quarantined": 0, "failed": 0,
                                           "images": 3}
    failed = {f["url"]: f["reason"] for f in summary["failed"]}
    assert set(failed) == {web.image_url("g/slow.jpg"), web.image_url("g/missing.jpg"), "file:///etc/passwd"}
    assert "timed out" in failed[web.image_url("g/slow.jpg")] and "404" in failed[web.image_url("g/missing.jpg")]
    assert "not an http(s) URL" in failed["file:///etc/passwd"]
    assert not [p for p in dest.rglob(".*")], "partial downloads left behind"

    # A second run adds nothing: what is there, quarantined files included, is known by its hash.
    before = tree(dest)
    again = make_dataset(["grizzly", "black", "teddy"], dest, per_class=10, query="{} bear", timeout=1)
    assert again["total"]["saved"] == again["total"]["quarantined"] == 0
    assert again["total"]["duplicate"] == 17 - 3  # all but the three that fail
    assert tree(dest) == before


def test_a_longer_timeout_is_the_searchs_too(web, tmp_path, monkeypatch):
    """--timeout waits for a slow search engine as for a slow image host; a shorter one leaves the search its
    SEARCH_TIMEOUT (here made shorter than the search's delay, for a quick test)."""
    bear_web(web)
    web.search_delay = 1.5
    monkeypatch.setattr(download, "SEARCH_TIMEOUT", 0.5)
    with pytest.raises(UserError, match="image search for 'grizzly bear' failed"):
        make_dataset(["grizzly"], tmp_path / "short", per_class=2, query="{} bear", timeout=0.2, backend="bing")
    assert not (tmp_path / "short").exists()
    summary = make_dataset(["grizzly"], tmp_path / "long", per_class=2, query="{} bear", timeout=6, backend="bing")
    assert summary["classes"]["grizzly"]["saved"] == 2


def test_a_failed_search_writes_nothing(web, tmp_path):
    bear_web(web)
    dest = tmp_path / "bears"
    with pytest.raises(UserError, match="image search for 'panda bear' failed"):
        make_dataset(["grizzly", "panda"], dest, per_class=5, query="{} bear", backend="duckduckgo")
    for bad in (["../evil"], ["removed"], [".hidden"]):
        with pytest.raises(UserError, match="not a usable class name"):
            make_dataset(bad, dest, query="{} bear")
    with pytest.raises(UserError, match="must contain"):
        make_dataset(["grizzly"], dest, query="bears")
    assert not dest.exists()


def test_download_then_train_from_the_command_line(web, tmp_path):
    bear_web(web)
    for c, color in (("grizzly", (120, 80, 40)), ("black", (30, 30, 30)), ("teddy", (230, 200, 120))):
        keys = [f"{c}/{i}.jpg" for i in range(6)]
        web.images.update({k: ("image/jpeg", image_bytes(tuple(v + 5 * i for v in color))) for i, k in enumerate(keys)})
        web.results[f"{c} bear"] = keys
    dest, out = tmp_path / "bears", tmp_path / "models" / "bears.pkl"
    res = run(["training/train_bears.py", "--download", "--per-class", "6", "--dest", dest, "--no-pretrained",
               "--epochs", "1", "--size", "32", "--bs", "4", "--workers", "0", "--out", out], env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "found  saved  dupes  quarantined  failed  images" in res.stdout
    assert [ln.split() for ln in res.stdout.splitlines() if ln.startswith("total")] == [
        ["total", "18", "18", "0", "0", "0", "18"]]
    metrics = json.loads(out.with_name("bears.report").joinpath("metrics.json").read_text())
    assert metrics["vocab"] == ["black", "grizzly", "teddy"] and metrics["counts"]["skipped"] == 0
    assert sum(map(sum, metrics["confusion_matrix"])) + sum(metrics["counts"]["train"].values()) == 18


def test_offline_download_fails_fast_with_one_line(tmp_path):
    dead = Web(tmp_path)  # a proxy address that nothing listens on any more
    dead.close()
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS} | {"HTTPS_PROXY": dead.url}
    start = time.monotonic()
    res = run(["training/train_bears.py", "--dest", tmp_path / "bears"], env=env, timeout=120)
    assert time.monotonic() - start < 60
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "cannot reach the image search" in lines[0] and "--data" in lines[0]
    assert not (tmp_path / "bears").exists()


def test_ctrl_c_while_downloading_leaves_no_partial_file(web, tmp_path):
    for i in range(4):
        web.images[f"g/{i}.jpg"] = ("image/jpeg", image_bytes((100 + i, 80, 40)))
        web.delay[f"g/{i}.jpg"] = 3  # still downloading when Ctrl-C comes
    web.results["grizzly bear"] = [f"g/{i}.jpg" for i in range(4)]
    dest = tmp_path / "bears"
    proc = subprocess.Popen([PY, "training/train_bears.py", "--download-only", "--classes", "grizzly",
                             "--dest", dest], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ), preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    read_until(proc.stderr, "downloading", timeout=120)
    while not list(dest.glob("grizzly/.part-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(dest.glob("grizzly/.part-*")), "no download was under way"  # half-written files exist now
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert [p for p in dest.rglob("*") if p.is_file()] == []  # and are gone: nothing half-written is left
