"""The Gradio demo driven in headless Chromium (Debian's package through Playwright; no browser download).

Upload an image, ask, see the streamed answer (greedy, so it must equal ``model.chat``), ask again with the
history, hit an error without breaking the page, clear, and keep a screenshot.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run must install Debian's chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def web_url(reference_model):
    from visualglm.web import build_demo, launch

    model, tok = reference_model
    demo = build_demo(model, tok, temperature=0, max_length=512)
    _, url, _ = launch(demo, port=free_port(), block=False)
    yield url
    demo.close(verbose=False)


def test_upload_ask_answer_clear(browser, web_url, reference_model, reference_dir, tmp_path):
    from playwright.sync_api import expect

    model, tok = reference_model
    image = str(reference_dir / "chelsea.png")
    first, history = model.chat(tok, image, "描述这张图片。", temperature=0, max_length=512)
    second, _ = model.chat(tok, image, "What animal is it?", history, english=True, temperature=0, max_length=512)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(web_url)
    chat = page.locator("#chatbot")
    page.locator("#image input[type=file]").set_input_files(image)
    expect(page.locator("#status")).to_contain_text("451×300 image", timeout=30_000)  # a new conversation
    page.locator("#query textarea").fill("描述这张图片。")
    page.locator("#send").click()
    expect(chat).to_contain_text(first, timeout=60_000)
    expect(page.locator("#query textarea")).to_have_value("")

    page.locator("#query textarea").fill("What animal is it?")  # follow-up: English form, with history
    page.locator("#query textarea").press("Enter")
    expect(chat).to_contain_text(second, timeout=60_000)

    shot = tmp_path / "web.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("VISUALGLM_SCREENSHOT_DIR"):  # keep one for people to look at
        shutil.copy(shot, Path(os.environ["VISUALGLM_SCREENSHOT_DIR"]) / "web.png")

    # A prompt longer than the max-length slider is an error message, not a broken page.
    page.locator("#max_length input[type=number]").fill("64")
    page.locator("#max_length input[type=number]").press("Enter")
    page.locator("#query textarea").fill("tell me " * 40)
    page.locator("#send").click()
    expect(page.get_by_text("max_length=64").first).to_be_visible(timeout=30_000)

    page.locator("#clear").click()
    expect(chat).not_to_contain_text(first, timeout=30_000)
    expect(page.locator("#status")).to_contain_text("New conversation about the 451×300 image")
    page.locator("#max_length input[type=number]").fill("512")
    page.locator("#max_length input[type=number]").press("Enter")
    page.locator("#query textarea").fill("你好")  # still answering after the error and the clear
    page.locator("#send").click()
    hello = model.chat(tok, image, "你好", temperature=0, max_length=512)[0]
    expect(chat).to_contain_text(hello, timeout=60_000)
    page.close()
