"""The apps as real servers on 127.0.0.1, called the way README shows: gradio_client."""
import json
import os
import re
import socket
import urllib.request

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from checkouts import repo_app_without_models
from conftest import fails_with_one_line, free_port, run, served, write_image
from imagelab import UserError


def test_pets_app_predicts(pets_app, tmp_path):
    client = Client(pets_app, verbose=False)
    for name, color in [("red.jpg", (220, 60, 60)), ("blue.png", (60, 60, 220))]:
        out = client.predict(handle_file(str(write_image(tmp_path / name, color))), api_name="/predict")
        confidences = {c["label"]: c["confidence"] for c in out["confidences"]}
        assert set(confidences) == {"cats", "dogs"} and out["label"] in confidences
        assert sum(confidences.values()) == pytest.approx(1, abs=1e-4)


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
        out = Client(url, verbose=False).predict(handle_file(str(write_image(tmp_path / "x.jpg", (60, 60, 220)))),
                                                 api_name="/pets_predict")
        assert out["label"] in ("cats", "dogs")
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
