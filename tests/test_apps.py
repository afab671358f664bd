"""The apps as real servers on 127.0.0.1, called the way README shows: gradio_client."""
import base64
import io
import json
import os
import re
import socket
import time
import urllib.request

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from checkouts import repo_app_without_models
from conftest import Client, answers_as_the_model, fails_with_one_line, free_port, run, served, write_image
from imagelab import UserError


def test_pets_app_predicts(pets_app, tiny_model, tmp_path):
    client = Client(pets_app, verbose=False)
    for name, color in [("red.jpg", (220, 60, 60)), ("blue.png", (60, 60, 220))]:
        image = write_image(tmp_path / name, color)
        out = client.predict(handle_file(str(image)), api_name="/predict")
        assert {c["label"] for c in out["confidences"]} == {"cats", "dogs"}
        assert sum(c["confidence"] for c in out["confidences"]) == pytest.approx(1, abs=1e-4)
        answers_as_the_model(out, tiny_model, image)


def test_pets_app_rejects_a_non_image_with_a_clear_message(pets_app, tmp_path):
    client = Client(pets_app, verbose=False)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    with pytest.raises(AppError, match="not a readable image"):
        client.predict(handle_file(str(bad)), api_name="/predict")
    good = write_image(tmp_path / "ok.jpg", (220, 60, 60))
    assert client.predict(handle_file(str(good)), api_name="/predict")["label"]  # still serving


def test_root_app_tabs(tiny_model, tmp_path):
    with served(["app.py"], env={"PETS_MODEL": str(tiny_model)}) as url:
        image = write_image(tmp_path / "x.jpg", (60, 60, 220))
        answers_as_the_model(Client(url, verbose=False).predict(handle_file(str(image)), api_name="/pets_predict"),
                             tiny_model, image)
    app, env = repo_app_without_models("app.py", tmp_path)  # pets never trained: the tab says how
    with served([app], env={**env, "PETS_MODEL": None}) as url:
        with urllib.request.urlopen(url + "config", timeout=10) as r:
            config = json.dumps(json.load(r))
        assert "No model at" in config and "training/train_pets.py" in config and "--preset scratch" in config


def test_a_port_that_cannot_be_served_stops_the_app_with_one_line(tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fails_with_one_line(run(["apps/pets/app.py", "--model", tiny_model, "--port", port], timeout=120),
                            f"cannot listen on 127.0.0.1:{port}", "choose another with --port")
    for args, env in ((["--port", "99999"], {}), ([], {"GRADIO_SERVER_PORT": "abc"})):
        res = run(["apps/pets/app.py", "--model", tiny_model, *args], env={**os.environ, **env})
        assert res.returncode == 2 and "argument --port: not a port number" in res.stderr, res.stderr[-2000:]
    res = run(["apps/pets/app.py", "--help"], env={**os.environ, "GRADIO_SERVER_PORT": "abc"})
    assert res.returncode == 0 and "GRADIO_SERVER_PORT" in res.stdout


def test_a_handoff_gives_the_next_step_what_the_first_computed_once_and_forgets_the_oldest():
    from imagelab.ui import Handoff
    handoff = Handoff(keep=2)
    assert handoff.put("a.jpg", ("labels", "view", "heat")) == ("labels", "view", "heat")
    handoff.put("b.jpg", "b's"), handoff.put("c.jpg", "c's")  # a.jpg's next step never came (an API call): it goes
    assert handoff.take("b.jpg", lambda upload: "computed again") == "b's"
    assert handoff.take("b.jpg", lambda upload: f"computed for {upload}") == "computed for b.jpg"  # taken once
    assert handoff.take("a.jpg", lambda upload: f"computed for {upload}") == "computed for a.jpg"
    assert handoff.take("c.jpg", lambda upload: "computed again") == "c's"


def test_a_request_without_an_image_gets_one_line(pets_app, tiny_autoencoder):
    """An API caller that sends no image is told so, as a bad upload is (the page never sends none)."""
    with pytest.raises(AppError, match="upload an image first"):
        Client(pets_app, verbose=False).predict(None, api_name="/predict")
    with served(["apps/autoencoder/app.py", "--model", tiny_autoencoder]) as url:
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="upload an image first"):
            client.predict(None, api_name="/reconstruct")
        with pytest.raises(AppError, match="upload both images first"):
            client.predict(None, None, 4, api_name="/interpolate")
    assert "Traceback" not in pets_app.log.read_text() and "Traceback" not in url.log.read_text()


def test_an_image_url_that_cannot_be_fetched_gets_one_line(pets_app, missing_pictures):
    with pytest.raises(AppError, match=f"cannot download the image at {re.escape(missing_pictures)}"):
        Client(pets_app, verbose=False).predict(handle_file(missing_pictures), api_name="/predict")
    assert "Traceback" not in pets_app.log.read_text()


def sent_inside(data, kind="image/png"):
    """An image as an API caller may send it inside the request: a data: URL, no file uploaded."""
    return {"path": None, "url": f"data:{kind};base64,{base64.b64encode(data).decode()}",
            "meta": {"_type": "gradio.FileData"}}


def test_an_image_sent_as_a_data_url_goes_through_the_apps_decoder_and_limits(pets_app, tmp_path):
    """Classified as the same file uploaded (Gradio decoded it and re-encoded it as WEBP), and refused as an upload
    would be, in one line, before its pixels or even its base64 are decoded."""
    from PIL import Image
    from test_serving import peak_rss_mb
    from uploads import png_header_only
    client = Client(pets_app, verbose=False)
    photo = write_image(tmp_path / "red.png", (220, 60, 60), size=(120, 90))
    assert (client.predict(sent_inside(photo.read_bytes()), api_name="/predict")
            == client.predict(handle_file(str(photo)), api_name="/predict"))
    big = tmp_path / "big.png"  # 42 megapixels, one colour: a few hundred KB
    Image.new("RGB", (7000, 6000), (220, 60, 60)).save(big)
    heavy = io.BytesIO()  # 30 megapixels of noise: more bytes than an upload may have
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (3200, 3200, 3), np.uint8)).save(heavy, "PNG",
                                                                                               compress_level=1)
    before = peak_rss_mb(pets_app.proc)
    refused = [(sent_inside(big.read_bytes()), "image too large: 7000x6000 pixels"),
               (sent_inside(png_header_only(13300, 13300)), "image too large: 13300x13300 pixels"),
               # Gradio reads the request itself before the app: a few copies of its 40 MB, not a 30-megapixel decode
               (sent_inside(heavy.getvalue()), r"image too large: 29\.\d MB \(limit 25 MB\)"),
               (sent_inside(b"\0\0\0", "image/jpeg"), "not a readable image: not an image"),
               (sent_inside(b"hello", "text/plain"), "not a readable image: not an image"),
               ({**sent_inside(b""), "url": "data:image/png;base64,abcde"},
                r"not a readable image: the data: URL's base64 is broken \(Invalid base64"),
               ({**sent_inside(b""), "url": "data:image/png,hello"}, "must hold its image in base64"),
               ({**sent_inside(b""), "url": None}, "no image in the request"),
               # what gradio_client sends as it is without handle_file: never read as a path on the server
               (str(photo), r"no image in the request: send a file or URL through gradio_client's handle_file\("),
               ("http://127.0.0.1:9/x.jpg", "no image in the request"), (42, "no image in the request")]
    for i, (payload, message) in enumerate(refused):
        start = time.monotonic()
        with pytest.raises(AppError, match=message):
            client.predict(payload, api_name="/predict")
        assert time.monotonic() - start < 10, message
        if i == 1:
            assert peak_rss_mb(pets_app.proc) - before < 50  # the pictures were not decoded
    assert "Traceback" not in pets_app.log.read_text()


def test_a_host_that_is_not_this_machines_stops_the_app_with_one_line(tiny_model):
    # 192.0.2.1: TEST-NET-1, reserved for documentation, an address of no machine here
    res = run(["apps/pets/app.py", "--model", tiny_model, "--host", "192.0.2.1", "--port", "7999"], timeout=120)
    fails_with_one_line(res, "cannot listen on 192.0.2.1:7999", "192.0.2.1 is not an address of this machine")


def test_the_listen_check_takes_every_host_the_server_takes_and_names_what_is_wrong():
    from imagelab.app_options import check_listen
    port = free_port()
    for host in ("", "0.0.0.0", "127.0.0.1", "localhost", "::", "[::1]"):  # "": Gradio's 127.0.0.1
        check_listen(host, port)
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as taken:
        with pytest.raises(UserError, match=rf"^cannot listen on \[::1\]:{taken.getsockname()[1]}: the port is in use "
                                            r"\(choose another with --port\)"):
            check_listen("::1", taken.getsockname()[1])
