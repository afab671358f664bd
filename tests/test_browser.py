"""The root app in a real browser (Debian's Chromium driven by Playwright), tab by tab, as a person uses it."""
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import ROOT, served, write_image

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
# Chromium's own background traffic would only hit the closed network; keep it to the page under test.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def page(tiny_model):
    ARTIFACTS.mkdir(exist_ok=True)
    with served(["app.py"], env={"PETS_MODEL": str(tiny_model)}) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        yield page
        browser.close()


def upload(page, tab, path):
    page.get_by_role("tab", name=tab).click()
    panel = page.get_by_role("tabpanel")
    panel.locator("input[type=file]").first.set_input_files(str(path))
    return panel


def test_pets_tab_classifies_an_upload(page, tmp_path):
    panel = upload(page, "Pets", write_image(tmp_path / "red.jpg", (220, 60, 60), size=(200, 160)))
    result = panel.get_by_test_id("label")  # gr.Label's output heading
    expect(result.filter(has_text="cats").or_(result.filter(has_text="dogs")).first).to_be_visible(timeout=30_000)
    expect(panel.get_by_text("%").first).to_be_visible()
    page.screenshot(path=ARTIFACTS / "pets-tab.png", full_page=True)


def test_invalid_upload_shows_the_error(page, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture")
    upload(page, "Pets", bad)
    toast = page.get_by_test_id("toast-text").filter(has_text="not a readable image")
    expect(toast.first).to_be_visible(timeout=30_000)
    page.wait_for_timeout(500)  # let the toast finish sliding in before the screenshot
    page.screenshot(path=ARTIFACTS / "pets-invalid-upload.png")
