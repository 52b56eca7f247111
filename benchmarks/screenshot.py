"""The README's picture of the web page: the bundled model served on 127.0.0.1, the page in
Debian's headless Chromium (through its chromedriver and selenium), a photo uploaded through the
page's file field, and the whole page written as a PNG once its answer and overlay are drawn.

    python -m benchmarks.screenshot     # about 10 seconds; writes docs/web-page.png

The PNG carries the sha256 of what it shows (the page's files, the model file and the photo):
tests/http/test_web.py fails, naming this command, once any of them has changed since.

Needs the dev extra (selenium) and Debian's `chromium` and `chromium-driver`. The page is
offline: only loopback resolves in the browser. It exits non-zero, writing nothing, where the
page does not answer the photo.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import shutil
import socket
import sys
from pathlib import Path

from PIL import Image, PngImagePlugin
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from benchmarks.run import DOCS, ROOT, start

PHOTO = ROOT / "model_export" / "photos" / "cat.jpg"
MODEL = ROOT / "models" / "shapes-vit.onnx"
SCREENSHOT = DOCS / "web-page.png"
# The page's own files, as the service ships them (service/http/web.py serves them).
STATIC = ROOT / "service" / "http" / "static"
PAGE_FILES = ("index.html", "app.js", "style.css")
FINGERPRINT_KEY = "vit-page-sha256"
WIDTH, HEIGHT = 1280, 1000
WAIT_S = 60.0


def chromium() -> webdriver.Chrome:
    """Debian's Chromium, headless, at the README's width, reaching nothing but loopback."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        sys.exit("needs Debian's chromium and chromium-driver (apt-get install them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root, in a container
        "--disable-dev-shm-usage",
        f"--window-size={WIDTH},{HEIGHT}",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=ChromeService(executable_path=driver))


def screenshot(url: str, photo: Path) -> bytes:
    """The page at `url` once it has answered `photo`, whole (beyond the window), as PNG."""
    browser = chromium()
    try:
        browser.get(f"{url}/")
        wait = WebDriverWait(browser, WAIT_S)
        wait.until(lambda b: b.find_element(By.ID, "model").is_enabled(), "no model listed")
        browser.find_element(By.ID, "file").send_keys(str(photo.resolve()))
        results = browser.find_element(By.ID, "results")
        wait.until(lambda b: results.get_attribute("data-state") in ("done", "failed"), "no answer")
        status = browser.find_element(By.ID, "status").text
        if results.get_attribute("data-state") != "done":
            sys.exit(f"the page did not answer {photo.name}: {status}")
        browser.execute_script("document.activeElement.blur()")  # no focus ring in the picture
        height = browser.execute_script("return document.documentElement.scrollHeight")
        shot = browser.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1},
            },
        )
        return base64.b64decode(shot["data"])
    finally:
        browser.quit()


def fingerprint(model: Path = MODEL, photo: Path = PHOTO) -> str:
    """The sha256 of everything the picture shows: the page's files, the model and the photo."""
    digest = hashlib.sha256()
    for path in (*(STATIC / name for name in PAGE_FILES), model, photo):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def with_fingerprint(png: bytes, value: str) -> bytes:
    """The PNG with `value` stored as its text chunk FINGERPRINT_KEY."""
    info = PngImagePlugin.PngInfo()
    info.add_text(FINGERPRINT_KEY, value)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, "PNG", pnginfo=info, optimize=True)
    return buffer.getvalue()


def stored_fingerprint(path: Path = SCREENSHOT) -> str | None:
    """The fingerprint a screenshot was written with, or None."""
    with Image.open(path) as image:
        value = image.info.get(FINGERPRINT_KEY)
    return value if isinstance(value, str) else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--photo", type=Path, default=PHOTO)
    parser.add_argument("-o", "--output", type=Path, default=SCREENSHOT)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service.cli", "--model", str(args.model), "--port", str(port)]
    # No API token, whatever this shell sets: the picture shows the page answering.
    env = {"VIT_PROVIDERS": '["CPUExecutionProvider"]', "VIT_API_TOKEN": ""}
    server = start(command, env, url)
    try:
        png = screenshot(url, args.photo)
    finally:
        server.terminate()
        server.wait(timeout=30)
    args.output.write_bytes(with_fingerprint(png, fingerprint(args.model, args.photo)))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
