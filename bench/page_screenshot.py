"""A screenshot of generate.py's page after one question: starts ``generate.py --ui`` with the given flags on a free
local port, asks the question in Debian's Chromium through Playwright, waits for the uncertainty and saves the page.

    python bench/page_screenshot.py --out docs/images/generate_page.png --question "..." -- \\
        --base_model smollm2-135m --adapter ADAPTER --posterior swag --samples 8 --temperature 0
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_ID = "uncertainty-summary"  # peft_bayes.cli.generate_ui.SUMMARY_ID


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: generate.py --ui did not start (exit status {proc.poll()})") from None
            time.sleep(0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--question", required=True)
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the uncertainty")
    p.add_argument("generate_flags", nargs=argparse.REMAINDER, help="after --: generate.py's flags")
    args = p.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: no system Chromium (make install-ui)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    port = _free_port()
    flags = [f for f in args.generate_flags if f != "--"] + ["--ui", "--server_port", str(port)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *flags], cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait(url, proc, 300)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_label("Instruction").fill(args.question)
            page.get_by_role("button", name="Submit").click()
            t = time.perf_counter()
            page.locator(f"#{SUMMARY_ID}").get_by_text("draws").wait_for(timeout=args.timeout * 1000)
            print(f"the uncertainty appeared after {time.perf_counter() - t:.1f} s")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
