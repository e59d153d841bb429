"""Screenshot of the web page answering one question about one photo, for the docs (not a test).

Serves BANK with `mcllava.server.create_app` on a loopback port, drives the page in Debian's headless Chromium
(Playwright, never a downloaded browser): picks the photo, types the question, presses Ask, waits for the answer
and the marked photo, and saves a PNG.

    python benchmarks/web_screenshot.py --bank demo-out/bank --concepts demo-out/world/concepts \
        --photo demo-out/world/scenes/0.png --question "Describe this photo." --out docs/img/web-page.png
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=Path, required=True)
    ap.add_argument("--concepts", type=Path, default=None, help="concept folders (thumbnails on the page)")
    ap.add_argument("--photo", type=Path, required=True)
    ap.add_argument("--question", default="Describe this photo.")
    ap.add_argument("--base", help="the base model, when the bank names it by a local path")
    ap.add_argument("--out", type=Path, default=Path("docs/img/web-page.png"))
    args = ap.parse_args()

    import uvicorn
    from playwright.sync_api import expect, sync_playwright

    from mcllava.server import create_app

    chromium = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and Path(p).exists()), None)
    if chromium is None:
        raise SystemExit("no Chromium binary: apt-get install -y chromium")
    app = create_app(args.bank, concepts_dir=args.concepts, base=args.base)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(f"http://127.0.0.1:{sock.getsockname()[1]}")
            page.get_by_label("Question").fill(args.question)
            page.set_input_files("#photo", str(args.photo))
            page.get_by_role("button", name="Ask").click()
            expect(page.locator("#answer")).not_to_be_empty(timeout=120_000)
            expect(page.locator("#marked")).to_be_visible()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            print(f"answer: {page.locator('#answer').inner_text()!r}\nscreenshot: {args.out}")
            browser.close()
    finally:
        server.should_exit = True


if __name__ == "__main__":
    main()
