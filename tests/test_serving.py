"""The app as strangers use it: odd images, hostile uploads and many clients at once, on 127.0.0.1."""
import json
import time

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from conftest import Client, answers_as_the_model, run, write_image
from uploads import invalid_uploads, valid_uploads


def peak_rss_mb(proc):
    for line in open(f"/proc/{proc.pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_odd_but_valid_images_are_classified(pets_app, tiny_model, tmp_path):
    client = Client(pets_app, verbose=False)
    for name, path in valid_uploads(tmp_path).items():
        out = client.predict(handle_file(str(path)), api_name="/predict")
        assert sum(c["confidence"] for c in out["confidences"]) == pytest.approx(1, abs=1e-4), name
        answers_as_the_model(out, tiny_model, path)


def test_invalid_uploads_get_a_clear_error_fast_and_the_server_survives(pets_app, tmp_path):
    client = Client(pets_app, verbose=False)
    before = peak_rss_mb(pets_app.proc)
    for name, (path, message) in invalid_uploads(tmp_path).items():
        start = time.monotonic()
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(path)), api_name="/predict")
        assert time.monotonic() - start < 10, name
    assert peak_rss_mb(pets_app.proc) - before < 200  # the 40000x40000 "bomb" was never decoded
    assert pets_app.proc.poll() is None
    out = client.predict(handle_file(str(write_image(tmp_path / "ok.jpg", (220, 60, 60)))), api_name="/predict")
    assert out["label"] in ("cats", "dogs")


def test_32_clients_10_requests_each_no_failures(pets_app, tmp_path):
    image = write_image(tmp_path / "load.jpg", (60, 60, 220), size=(320, 240))
    res = run(["benchmarks/load.py", "--url", pets_app, "--image", image, "--clients", "32", "--requests", "10"],
              timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["requests"] == 320 and result["ok"] == 320 and result["failures"] == 0, result["first_errors"]
    assert result["p50_ms"] > 0 and result["p95_ms"] >= result["p50_ms"]
