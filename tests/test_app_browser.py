"""The page in a real browser: Debian Chromium driven by Playwright against the app on loopback."""

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.app_server import REPO, AppServer, tiny_app_model

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
SCREENSHOTS = REPO / "test-outputs"
TIMEOUT_MS = 60_000


def _ensure_chromium() -> None:
    """Installs Debian's chromium when missing; skips (with apt's words) only when that is impossible."""
    if CHROMIUM.exists():
        return
    if shutil.which("apt-get") is None:
        pytest.skip("Chromium is missing and there is no apt-get to install it")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"Chromium is missing and `{' '.join(command)}` failed (no apt access or network?): "
                        f"{(done.stderr or done.stdout).strip()[-500:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_app_model(tmp_path_factory.getbasetemp())
    # As on a Space, so the page shows its Duplicate button.
    with AppServer(model, tmp_path_factory.mktemp("app-browser"), env={"SPACE_ID": "someone/dalle-flax"}) as app:
        yield app


@pytest.fixture(scope="module")
def browser():
    _ensure_chromium()
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _open(browser, server, width, height):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url)
    return page


@pytest.fixture(scope="module")
def page(browser, server):
    page = _open(browser, server, 1280, 800)  # a laptop screen: the whole grid must fit
    yield page
    page.close()


def _run_and_wait(page, submit) -> str:
    """Submits the prompt and waits for the final images (their status names the seed); returns it."""
    before = page.locator("#status").inner_text()
    old = page.locator("#gallery img").evaluate_all("imgs => imgs.map(i => i.src)")
    submit()
    page.wait_for_function("before => { const s = document.querySelector('#status').innerText;"
                           " return s.includes('Seed') && s !== before; }", arg=before)
    # The final images replace the gallery (short runs show no previews): wait for new files.
    page.wait_for_function("old => [...document.querySelectorAll('#gallery img')].every(i => !old.includes(i.src))",
                           arg=old)
    # Final images carry CLIP captions (previews show token counts); wait until all have loaded.
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('#gallery img')];"
        " const captions = [...document.querySelectorAll('#gallery .caption-label')];"
        " return imgs.length === 9 && captions.every(c => c.innerText.startsWith('CLIP'))"
        " && imgs.every(i => i.complete && i.naturalWidth > 0); }")
    return page.locator("#status").inner_text()


def _gallery_pixels(page) -> list[np.ndarray]:
    """The gallery's images as served to the browser, decoded here."""
    sources = page.locator("#gallery img").evaluate_all("imgs => imgs.map(i => i.src)")
    return [np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")) for src in sources]


def test_run_shows_nine_distinct_images_with_scores(page, server):
    page.locator("#prompt input").fill("a small red apple on a blue background")
    status = _run_and_wait(page, lambda: page.locator("#run").click())
    images = _gallery_pixels(page)
    assert len(images) == 9
    assert all(image.shape == (16, 16, 3) for image in images)
    assert all(len(np.unique(image.reshape(-1, 3), axis=0)) > 1 for image in images), "a blank image"
    assert len({image.tobytes() for image in images}) == 9, "two images are the same"
    captions = page.locator("#gallery .caption-label").all_inner_texts()
    assert len(captions) == 9 and all(c.startswith("CLIP ") for c in captions)
    # The seed used is shown in the status line and copied into the seed box under "Advanced".
    page.get_by_text("Advanced").click()
    assert page.locator("#seed input").input_value() == str(_seed(status))
    # All nine on a 1280x800 screen together with the prompt, enlarged from 16 px without smoothing.
    page.evaluate("window.scrollTo(0, 0)")
    assert page.locator("#prompt input").bounding_box()["y"] >= 0
    for box in page.locator("#gallery img").all():
        bounds = box.bounding_box()
        assert box.is_visible() and bounds["height"] > 100 and bounds["y"] + bounds["height"] <= 800, bounds
    assert page.locator("#gallery img").first.evaluate("i => getComputedStyle(i).imageRendering") == "pixelated"
    page.screenshot(path=str(SCREENSHOTS / "app_browser.png"), full_page=True)
    assert server.alive()


def _seed(status: str) -> int:
    return int(status.split("Seed")[1].split()[0])


def test_enter_runs_again_with_a_new_random_seed_and_new_images(page):
    page.locator("#prompt input").fill("two rockets on a black background")
    first = _run_and_wait(page, lambda: page.locator("#run").click())
    first_images = _gallery_pixels(page)
    second = _run_and_wait(page, lambda: page.locator("#prompt input").press("Enter"))
    second_images = _gallery_pixels(page)
    assert _seed(first) != _seed(second)  # "randomize seed" is on by default
    assert {image.tobytes() for image in first_images} != {image.tobytes() for image in second_images}


def test_footer_credits_limitations_and_duplicate_button(page):
    footer = page.locator("#footer").inner_text()
    assert "Twemoji graphics by Twitter, Inc and other contributors, CC-BY 4.0" in footer
    assert "Random weights: the images mean nothing." in footer and "Weights in float32." in footer
    assert "A tiny random model for tests" in page.locator("#title").inner_text()
    assert page.get_by_role("button", name="Duplicate Space").is_visible()


def test_example_click_shows_its_images(page):
    page.locator("#examples").get_by_text("two rockets on a black background").click()
    page.wait_for_function(
        "() => document.querySelector('#status').innerText.startsWith('Seed 0 ')"
        " && [...document.querySelectorAll('#gallery .caption-label')].length === 9")
    assert page.locator("#prompt input").input_value() == "two rockets on a black background"


def test_unavailable_model_is_a_clear_error_on_the_page(page, server):
    _open_advanced(page)
    page.locator("#model input").click()
    option = page.get_by_role("option", name="mini (not available offline)", exact=True)
    assert option.is_visible()  # said before it is picked
    option.click()
    # Changing the model shows its defaults (upstream's for the published ones) without loading it.
    page.wait_for_function("() => document.querySelector('#condition_scale input[type=number]').value === '10'")
    page.locator("#prompt input").fill("a cat above a dog")
    page.locator("#run").click()
    page.locator(".toast-body", has_text="could not be downloaded. Choose 'tiny' instead").wait_for()
    page.wait_for_timeout(500)  # the toast slides in
    page.screenshot(path=str(SCREENSHOTS / "app_browser_error.png"))
    page.locator(".toast-close").first.click()  # it covers the Run button until dismissed
    _choose_model(page, "tiny")
    page.wait_for_function("() => document.querySelector('#condition_scale input[type=number]').value === '3'")
    _run_and_wait(page, lambda: page.locator("#run").click())
    assert server.alive()


def _open_advanced(page):
    if not page.locator("#seed").is_visible():
        page.get_by_text("Advanced").click()


def _choose_model(page, name):
    page.locator("#model input").click()
    page.get_by_role("option", name=name, exact=True).click()


def test_each_tab_keeps_its_own_results(page):
    _run_and_wait(page, lambda: page.locator("#run").click())
    page.get_by_role("tab", name="Variations").click()
    assert page.locator("#vary-gallery img").count() == 0 and page.locator("#vary-status").inner_text().strip() == ""
    page.get_by_role("tab", name="Text to image").click()
    assert page.locator("#gallery img").count() == 9 and "Seed" in page.locator("#status").inner_text()


def test_grid_download_is_one_png_of_the_whole_grid(page, server):
    _run_and_wait(page, lambda: page.locator("#run").click())
    with page.expect_download() as download:
        page.locator("#download").click()
    grid = Image.open(download.value.path())
    assert grid.format == "PNG" and grid.size == (3 * 16, 3 * 16)
    assert np.array_equal(np.asarray(grid.convert("RGB"))[:16, :16], _gallery_pixels(page)[0])


def test_the_model_says_what_it_understands_next_to_the_prompt(page):
    assert "Understands nothing" in page.locator("#understands").inner_text()


def test_a_phone_sees_prompt_run_and_the_first_row_without_sideways_scrolling(browser, server):
    phone = _open(browser, server, 390, 844)
    try:
        phone.locator("#prompt input").fill("a small red apple on a blue background")
        phone.locator("#run").click()
        phone.wait_for_function("() => [...document.querySelectorAll('#gallery img')].length === 9"
                                " && document.querySelector('#status').innerText.includes('Seed')")
        phone.evaluate("window.scrollTo(300, 0)")
        assert phone.evaluate("window.scrollX") == 0, "the page scrolls sideways"
        for selector in ("#prompt input", "#run"):
            box = phone.locator(selector).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844, selector
        first_row = phone.locator("#gallery img").all()[:3]
        assert all(b["x"] >= 0 and b["x"] + b["width"] <= 390 and b["y"] + b["height"] <= 844
                   for b in (image.bounding_box() for image in first_row))
        phone.screenshot(path=str(SCREENSHOTS / "app_browser_phone.png"))
    finally:
        phone.close()
