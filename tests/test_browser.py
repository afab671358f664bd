"""The root app in a real browser (Debian's Chromium driven by Playwright), tab by tab, as a person uses it."""
import io
import re
import shutil
import threading
import time
from contextlib import contextmanager

import numpy as np
import psutil
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from conftest import ROOT, served, write_image
from imagelab.inference import Predictor

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
# Chromium's own background traffic would only hit the closed network; keep it to the page under test.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
# Chromium's stand-in camera (a moving test pattern on green), allowed without asking: the webcam path runs for real.
CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


@contextmanager
def chromium(*args):
    """Chromium under Playwright (`args` after CHROMIUM_ARGS), closed after the block within a minute: Playwright's
    close and its driver's exit have no timeout of their own (a Chromium it does not bundle is known to hang there);
    after a minute the browser's and the driver's processes are killed, so the test ends instead of holding the run."""
    watchdog = threading.Timer(60, kill_browser_processes)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *args])
            try:
                yield browser
            finally:
                watchdog.start()
                browser.close()
    finally:
        watchdog.cancel()


def kill_browser_processes():
    for proc in psutil.Process().children(recursive=True):
        try:
            if "chrom" in proc.name() or proc.name() == "node":  # Playwright's driver runs on Node.js
                proc.kill()
        except psutil.NoSuchProcess:
            pass


def evaluate(page, script, arg=None, seconds=60):
    """`page.evaluate` of the async function `script`, which fails after `seconds`: Playwright's has no timeout, and
    a promise the page never settles would hold the test."""
    return page.evaluate(f"""(arg) => Promise.race([({script})(arg), new Promise((_, fail) =>
        setTimeout(() => fail(new Error("no answer within {seconds} s")), {seconds * 1000}))])""", arg)


@pytest.fixture(scope="module")
def site(tiny_model, tiny_bears, tiny_autoencoder, tmp_path_factory):
    """The root app with every tab's model, and a browser page on it; the cleaner works on a copy."""
    bears_model, bears_data, _ = tiny_bears
    data = shutil.copytree(bears_data, tmp_path_factory.mktemp("clean") / "bears")
    env = {"PETS_MODEL": str(tiny_model), "BEARS_MODEL": str(bears_model), "CLEANER_MODEL": str(bears_model),
           "CLEANER_DATA": str(data), "AUTOENCODER_MODEL": str(tiny_autoencoder)}
    ARTIFACTS.mkdir(exist_ok=True)
    with served(["app.py"], env=env) as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        yield page, data


def open_tab(page, tab):
    page.get_by_role("tab", name=tab).click()
    return page.get_by_role("tabpanel")


def shown_label(panel):
    """The top label of the Label block in `panel` (a page or a tab), once its confidences are shown."""
    label = panel.get_by_test_id("label")
    expect(label.filter(has_text="%").first).to_be_visible(timeout=30_000)
    return label.first.inner_text().splitlines()[1]  # "Prediction", then the top label (every class follows it)


@contextmanager
def queue_drained(page, seconds=60):
    """A block in which the page asks for runs, left once the server has run them all. After each run it asks for
    (/queue/join), Gradio's page opens the session's event stream (/queue/data), which the server ends once none of
    the session's runs is pending (Chromium reports it ended or, the page closing it, failed). Only a stream opened
    after the last run asked for counts: one that ends then may have been another run's. (The page asks for a run
    and waits for the answer before it opens the stream: the two requests come in that order.)"""
    asked, streams, ended = [], [], set()

    def on_request(request):
        if "/queue/join" in request.url:
            asked.append(request)
            streams.clear()
        elif "/queue/data" in request.url and asked:
            streams.append(request)

    def on_ended(request):
        if "/queue/data" in request.url:
            ended.add(request)

    listeners = {"request": on_request, "requestfinished": on_ended, "requestfailed": on_ended}
    for event, listener in listeners.items():
        page.on(event, listener)
    try:
        yield
        deadline = time.monotonic() + seconds
        while not (streams and all(s in ended for s in streams)):
            assert time.monotonic() < deadline, f"the page's runs did not end within {seconds} s ({len(asked)} asked)"
            page.wait_for_timeout(100)
    finally:
        for event, listener in listeners.items():
            page.remove_listener(event, listener)


def screenshot(page, name):
    page.wait_for_timeout(500)  # let transitions (toasts, images) settle
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


@pytest.mark.parametrize("tab, color", [("Pets", (220, 60, 60)), ("Bears", (150, 100, 50))])
def test_classifier_tab_labels_an_upload(site, tiny_model, tiny_bears, tmp_path, tab, color):
    page, _ = site
    panel = open_tab(page, tab)
    image = write_image(tmp_path / "x.jpg", color, size=(200, 160))
    panel.locator("input[type=file]").first.set_input_files(str(image))
    want = Predictor(tiny_model if tab == "Pets" else tiny_bears[0]).predict(image, k=1)
    assert shown_label(panel) == next(iter(want))
    heatmap = panel.locator(".block", has=page.get_by_text("Where it looked")).locator("img")
    expect(heatmap.first).to_be_visible(timeout=30_000)  # the predicted class's Grad-CAM over the image
    assert heatmap.first.evaluate("img => img.naturalWidth") > 0
    screenshot(page, f"{tab.lower()}-tab")


def test_autoencoder_tab_shows_a_reconstruction(site, tmp_path):
    page, _ = site
    panel = open_tab(page, "Autoencoder")
    panel.locator("input[type=file]").first.set_input_files(str(write_image(tmp_path / "x.png", (200, 90, 40))))
    expect(panel.get_by_text("PCA with as many components").first).to_be_visible(timeout=60_000)
    sources = []
    for label in ("Original (as the model sees it)", "Autoencoder", "PCA, same code size"):
        shown = panel.locator(".block", has=page.get_by_text(label, exact=True)).last.locator("img")
        expect(shown.first).to_be_visible(timeout=30_000)
        assert shown.first.evaluate("img => img.naturalWidth") > 0, label
        # The model-sized picture fills its frame: Gradio would draw it at its own size, a speck in the middle.
        drawn = np.asarray(Image.open(io.BytesIO(shown.first.screenshot())).convert("L"))
        assert (drawn < 240).mean() > 0.8, (label, (drawn < 240).mean())  # the upload is dark orange; the frame white
        sources.append(shown.first.get_attribute("src"))
    assert len(set(sources)) == 3, sources  # three different pictures, each in its own place
    screenshot(page, "autoencoder-tab")


def test_the_interpolation_waits_quietly_for_its_second_image(site, tmp_path):
    """Its API answers a missing image with one line; the page, where a visitor gives one image and then the other,
    shows nothing until both are there."""
    page, _ = site
    panel = open_tab(page, "Autoencoder")
    uploads = panel.locator("input[type=file]")  # the image to rebuild, then From and To
    strip = panel.locator(".block", has=page.get_by_text("Interpolation", exact=True)).last
    with queue_drained(page):  # the interpolation's run for the first image is over
        uploads.nth(1).set_input_files(str(write_image(tmp_path / "a.png", (200, 90, 40))))
    page.wait_for_timeout(500)  # and the page has drawn what it answered
    assert not page.get_by_test_id("toast-text").count(), page.get_by_test_id("toast-text").all_inner_texts()
    assert "rror" not in strip.inner_text() and not strip.locator("img").count(), strip.inner_text()
    uploads.nth(2).set_input_files(str(write_image(tmp_path / "b.png", (40, 90, 200))))
    expect(strip.locator("img").first).to_be_visible(timeout=60_000)
    screenshot(page, "autoencoder-interpolation")


def test_a_replaced_upload_runs_once_and_an_invalid_one_clears_the_last_results(site, tmp_path):
    """Gradio fires `change` twice when an upload replaces another: the apps listen to the visitor's upload
    instead, so the model runs once, and a bad upload's message shows once, without the last image's heatmap."""
    page, _ = site
    panel = open_tab(page, "Pets")
    upload = panel.locator("input[type=file]").first
    heatmap = panel.locator(".block", has=page.get_by_text("Where it looked")).locator("img")
    shown = heatmap.first.get_attribute("src") if heatmap.count() else None  # an earlier test's upload, if any
    upload.set_input_files(str(write_image(tmp_path / "first.jpg", (190, 70, 90), size=(200, 160))))
    expect(heatmap.first).not_to_have_attribute("src", shown or "", timeout=30_000)
    page.wait_for_timeout(1500)  # all of this upload's requests are made by now
    steps = []  # the requests that run a step of the app: its predict, then its heatmap
    count = lambda request: steps.append(request.url) if "/queue/join" in request.url else None  # noqa: E731
    page.on("request", count)
    shown = heatmap.first.get_attribute("src")
    upload.set_input_files(str(write_image(tmp_path / "second.jpg", (70, 80, 200), size=(200, 160))))
    expect(heatmap.first).not_to_have_attribute("src", shown, timeout=30_000)
    page.wait_for_timeout(1500)  # a second run, if any, would have been asked for by now
    assert len(steps) == 2, steps
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture")
    upload.set_input_files(str(bad))
    toast = page.get_by_test_id("toast-text").filter(has_text="not a readable image")
    expect(toast.first).to_be_visible(timeout=30_000)
    expect(heatmap).to_have_count(0, timeout=10_000)  # the last good image's heatmap is gone
    page.remove_listener("request", count)
    assert len(steps) == 3 and toast.count() == 1, (steps, toast.all_inner_texts())
    screenshot(page, "pets-invalid-upload")


def test_an_example_clicked_is_classified_once(site):
    page, _ = site
    panel = open_tab(page, "Pets")
    heatmap = panel.locator(".block", has=page.get_by_text("Where it looked")).locator("img")
    shown = heatmap.first.get_attribute("src") if heatmap.count() else None  # an earlier test's upload, if any
    steps = []
    count = lambda request: steps.append(request.url) if "/queue/join" in request.url else None  # noqa: E731
    page.on("request", count)
    panel.locator(".gallery-item, [data-testid=examples] button, .examples button").last.click()
    expect(heatmap.first).not_to_have_attribute("src", shown or "", timeout=30_000)
    page.wait_for_timeout(1500)
    page.remove_listener("request", count)
    assert len(steps) == 2, steps  # its labels, then its heatmap


def test_cleaner_tab_removes_and_undoes_a_file(site):
    page, data = site
    panel = open_tab(page, "Cleaner")
    panel.get_by_label("all", exact=True).check()  # every image of the class, not only the held-out ones
    panel.get_by_role("button", name="Show").click()
    expect(panel.get_by_text("images of").first).to_be_visible(timeout=60_000)
    first = panel.get_by_role("combobox", name=re.compile("^What to do with ")).first  # one per image, worst first
    expect(first).to_be_visible()
    names = lambda folder: {p.name for p in folder.iterdir()}  # noqa: E731
    before, removed_before = names(data / "black"), names(data / "removed" / "black")
    first.click()
    page.get_by_role("option", name="remove", exact=True).click()
    screenshot(page, "cleaner-tab")
    panel.get_by_role("button", name="Apply", exact=True).click()
    expect(panel.get_by_text("Moved 1 file.").first).to_be_visible(timeout=60_000)
    moved = before - names(data / "black")
    assert len(moved) == 1 and names(data / "removed" / "black") - removed_before == moved
    panel.get_by_role("button", name="Undo last apply").click()
    expect(panel.get_by_text("Undid 1 move.").first).to_be_visible(timeout=60_000)
    assert names(data / "black") == before and names(data / "removed" / "black") == removed_before
