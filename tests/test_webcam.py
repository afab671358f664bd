"""The other ways in, in a real Chromium: a photo from the (fake) webcam, flagged as wrong; one pasted from the clipboard."""
import pytest
from PIL import Image, ImageStat
from playwright.sync_api import expect

from conftest import served
from imagelab.inference import Predictor
from test_browser import ARTIFACTS, CAMERA, chromium, evaluate, shown_label

BLUE = (60, 60, 220)


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    """The pets app with flagging on (into a folder of its own) and a Chromium on it: (open a fresh page, folder)."""
    folder = tmp_path_factory.mktemp("flagged-data")
    ARTIFACTS.mkdir(exist_ok=True)
    app = ["apps/pets/app.py", "--model", tiny_model, "--flag-data", folder]
    with served(app) as url, chromium(*CAMERA) as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url.rstrip("/"))

        def fresh_page():
            page = context.new_page()
            page.goto(url)
            return page
        yield fresh_page, folder


def test_webcam_photo_is_classified_and_flagged(app):
    fresh_page, folder = app
    page = fresh_page()
    page.get_by_role("button", name="Capture from camera").click()
    page.get_by_role("button", name="Click to Access Webcam").click()
    page.wait_for_function("[...document.querySelectorAll('video')].some(v => v.videoWidth > 0 && v.currentTime > 0)",
                           timeout=30_000)  # the fake camera's frames are playing
    page.get_by_role("button", name="capture photo").click()
    assert shown_label(page) in ("cats", "dogs")
    page.get_by_label("Wrong answer? The right class is").click()
    page.get_by_role("option", name="dogs", exact=True).click()
    page.get_by_role("button", name="Flag as wrong").click()
    expect(page.get_by_text("kept as").first).to_be_visible(timeout=30_000)
    kept = list((folder / "flagged" / "dogs").glob("*.jpg"))
    assert len(kept) == 1 and kept[0].name in page.get_by_text("kept as").first.inner_text()
    with Image.open(kept[0]) as im:  # the camera's frame: mostly green
        r, g, b = ImageStat.Stat(im.convert("RGB")).mean
        assert g > r and g > b
    page.screenshot(path=ARTIFACTS / "pets-webcam-flagged.png", full_page=True)


def test_clipboard_image_is_classified(app, tiny_model, tmp_path):
    page = app[0]()
    evaluate(page, """async ([r, g, b]) => {
        const canvas = Object.assign(document.createElement('canvas'), {width: 120, height: 90});
        const ctx = canvas.getContext('2d');
        ctx.fillStyle = `rgb(${r},${g},${b})`;
        ctx.fillRect(0, 0, 120, 90);
        const png = await new Promise(done => canvas.toBlob(done, 'image/png'));
        await navigator.clipboard.write([new ClipboardItem({'image/png': png})]);
    }""", list(BLUE))
    page.get_by_role("button", name="Paste from clipboard").click()
    Image.new("RGB", (120, 90), BLUE).save(tmp_path / "same.png")
    want = Predictor(tiny_model).predict(tmp_path / "same.png", k=1)
    assert shown_label(page) == next(iter(want))
