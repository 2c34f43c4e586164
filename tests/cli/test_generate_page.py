"""generate.py --ui in a real browser: Playwright drives Debian's Chromium against the page on localhost.

Skipped, with the reason shown, where gradio, Playwright's Python package or a system Chromium is missing (.ci/run
installs all three)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from peft_bayes.cli import generate_ui as ui

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="needs gradio (pip install '.[ui]')"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="needs playwright (the ui extra)"),
    pytest.mark.skipif(CHROMIUM is None, reason="needs a system Chromium (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def page_url(llama_dir, data_file, train_argv, tmp_path):
    from peft_bayes.cli import train

    adapter = tmp_path / "adapter"
    swag = ["--posterior", "swag", "--swag_start", "0steps", "--swag_collect_every", "1", "--max_steps", "3"]
    assert train.main(train_argv(llama_dir, data_file, adapter, "--learning_rate", "2e-2", *swag)) == 0
    port = _free_port()
    argv = ["--base_model", str(llama_dir), "--adapter", str(adapter), "--posterior", "swag", "--samples", "3", "--ui",
            "--server_port", str(port), "--temperature", "0", "--max_new_tokens", "8"]  # fmt: skip
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *argv], stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the page did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_page_shows_tokens_sampled_answers_and_summary(page_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(page_url)
            page.get_by_label("Instruction").fill("Tom has 3 apples and buys 4 more. How many apples?")
            page.get_by_role("button", name="Submit").click()
            summary = page.locator(f"#{ui.SUMMARY_ID}")
            summary.get_by_text("draws").wait_for(timeout=120_000)
            text = summary.inner_text()
            assert ("confident" in text or "uncertain" in text) and "3 draws" in text and "epistemic" in text
            assert "answers, one per posterior draw" in page.locator(f"#{ui.SAMPLES_ID}").inner_text()
            tokens = page.locator(f"#{ui.TOKENS_ID}")
            assert tokens.inner_text().strip()  # the answer's tokens are on the page
            assert page.get_by_label("Response").input_value().strip()
            page.screenshot(path=str(tmp_path / "generate_page.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "generate_page.png").stat().st_size > 10_000
