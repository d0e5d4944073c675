"""The README's screenshot of the web demo: the Segment tab with a result, in headless Chromium.

    python benchmarks/demo_screenshot.py [--out docs/images/demo.png] [--chromium /usr/bin/chromium]

Serves ``langseg demo`` (lseg-shapes, vlt-shapes) on a free port of this machine, clicks one of its
ShapeWorld examples, runs it, and saves the top of the page (inputs and outputs, not the examples table).
Needs the dev extras (gradio, playwright) and a chromium; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from langseg.serve.demo import build_demo, example_scenes, launch_options
from langseg.serve.service import Models

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDTH = 1280  # wide enough for the download names
EXAMPLE = 2  # of the demo's examples: the one with most to see (six objects over a texture)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "demo.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()

    demo = build_demo(Models(["lseg-shapes", "vlt-shapes"], device="cpu"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, **launch_options())
    try:
        with tempfile.TemporaryDirectory() as folder:  # the labels of the example, as the demo wrote them
            labels = example_scenes(Path(folder))[EXAMPLE][1]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": WIDTH, "height": 1000}, device_scale_factor=1)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#segment-tab").get_by_text(labels[:40]).click()
            expect(page.locator("#segment-labels textarea")).to_have_value(labels)
            expect(page.locator("#segment-image img")).to_be_visible()
            page.locator("#segment-run").click()
            expect(page.locator("#segment-overlay img")).to_be_visible(timeout=60_000)
            expect(page.locator("#segment-json a[download]")).to_be_visible()
            page.evaluate("window.scrollTo(0, 0)")  # clicking scrolled; boxes below are page coordinates
            page.wait_for_timeout(500)  # let the last images finish fading in
            bottom = page.locator("#segment-run").bounding_box()
            table = page.locator("#segment-json").bounding_box()
            height = max(bottom["y"] + bottom["height"], table["y"] + table["height"]) + 16
            args.out.parent.mkdir(parents=True, exist_ok=True)
            clip = {"x": 0, "y": 0, "width": WIDTH, "height": height}
            page.screenshot(path=args.out, full_page=True, clip=clip)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
