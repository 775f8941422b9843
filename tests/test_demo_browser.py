"""The demo in a real browser: Debian's chromium, headless, driven by playwright (with the system browser's
executable: nothing downloads a browser build) against ``mm demo --model DIR`` started as a user starts it.

It uploads a bundled ShapesWorld image, asks the grounding question, watches the answer stream into the chat
and finds the drawn box on the image beside it. ``MM_DEMO_SCREENSHOT=PATH`` keeps the page's screenshot
there (bench/results/demo_screenshot_*.png was made so); otherwise it lands in the test's temporary folder.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from demo_helpers import (
    GROUND_ANSWER,
    GROUND_QUESTION,
    free_port,
    ground_example,
    make_box_model,
    start_demo,
    stop_demo,
)
from PIL import Image

from data.boxes import parse_boxes
from demo import app as demo_app

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# every text the last answer bubble shows, recorded by the page itself on each DOM change: no polling gap
RECORD_ANSWERS = """() => {
  window.__answers = [];
  const record = () => {
    const bots = document.querySelectorAll('#chat [data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : null;
    const seen = window.__answers;
    if (text !== null && seen[seen.length - 1] !== text) seen.push(text);
  };
  new MutationObserver(record).observe(document.querySelector('#chat'),
    {subtree: true, childList: true, characterData: true});
}"""


def chromium_executable() -> str | None:
    """The system chromium (``MM_CHROMIUM`` overrides), or None."""
    if explicit := os.environ.get("MM_CHROMIUM"):
        return explicit if Path(explicit).is_file() else None
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser():
    executable = chromium_executable()
    if executable is None:
        pytest.skip(
            "no chromium executable (on PATH, or at $MM_CHROMIUM); install Debian's: apt-get install "
            "chromium (.ci/run does so where apt and root are available)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where chromium's sandbox refuses to start
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    model = make_box_model(tmp_path_factory.mktemp("browser") / "model")
    proc, url, lines = start_demo("--model", str(model), "--port", str(free_port()), cwd=model.parent)
    yield url
    assert stop_demo(proc) == 0, "\n".join(lines[-40:])


def box_colour_bbox(image: Image.Image, colour: tuple[int, int, int], tol: int = 24):
    """(x0, y0, x1, y1) around the pixels within ``tol`` of ``colour`` on every channel, or None."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    ys, xs = np.nonzero((np.abs(rgb - np.array(colour)) <= tol).all(axis=-1))
    return None if len(xs) == 0 else (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_browser_uploads_asks_sees_the_streamed_answer_and_the_drawn_box(browser, demo_url, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(demo_url)
        page.wait_for_selector("#ask textarea", timeout=30_000)
        example = ground_example()["image"]
        page.set_input_files("#ask input[type=file]", example)  # the clip's file chooser
        page.wait_for_selector("#ask img", timeout=15_000)  # the upload's thumbnail: it reached the server
        page.fill("#ask textarea", GROUND_QUESTION)
        page.evaluate(RECORD_ANSWERS)
        page.click("#ask [data-testid=submit-button]")

        # the answer streams into the chat: growing prefixes first, then the whole answer
        page.wait_for_function(
            "t => window.__answers.includes(t)", arg=GROUND_ANSWER, timeout=30_000, polling=50
        )
        seen = page.evaluate("window.__answers")
        partial = [t for t in seen if t and t != GROUND_ANSWER]
        assert partial and all(GROUND_ANSWER.startswith(t) for t in partial), seen
        page.wait_for_function(
            "() => document.querySelector('#stats').innerText.includes('1 box drawn')", timeout=15_000
        )
        stats = page.inner_text("#stats")
        assert "tokens/s" in stats and "visual tokens" in stats and "KV cache" in stats

        # the box is drawn on the image beside the chat, where the answer puts it
        shown = page.locator("#boxes img")
        shown.wait_for(state="visible")
        page.wait_for_function(
            "() => { const i = document.querySelector('#boxes img'); return i && i.complete && "
            "i.naturalWidth > 0; }"
        )
        img = page.evaluate(
            "() => { const i = document.querySelector('#boxes img'); return {nw: i.naturalWidth, "
            "nh: i.naturalHeight, fit: getComputedStyle(i).objectFit}; }"
        )
        assert (img["nw"], img["nh"]) == (384, 384)  # the 96 px scene enlarged 4x
        pixels = Image.open(io.BytesIO(shown.screenshot()))  # the element as the page paints it
        found = box_colour_bbox(pixels, demo_app.BOX_COLOURS[0])
        assert found is not None, "no box-coloured pixels in the image beside the chat"
        # where the picture lies in the element: object-fit scales it (not up, for scale-down) and centres it
        fit = min(pixels.width / img["nw"], pixels.height / img["nh"])
        k = {"contain": fit, "scale-down": min(1.0, fit), "none": 1.0}.get(img["fit"])
        assert k is not None, f"unexpected object-fit {img['fit']}"
        left, top = (pixels.width - img["nw"] * k) / 2, (pixels.height - img["nh"] * k) / 2
        x0, y0, x1, y1 = (v * 4 * k for v in parse_boxes(GROUND_ANSWER, (96, 96))[0])
        expected = (left + x0, top + y0, left + x1, top + y1)
        assert all(abs(a - b) <= 3 for a, b in zip(found, expected)), (found, expected)

        screenshot = Path(os.environ.get("MM_DEMO_SCREENSHOT") or tmp_path / "demo.png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot))
        assert screenshot.stat().st_size > 10_000
    finally:
        page.close()
