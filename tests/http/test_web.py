"""The web page at `/` and the API docs at `/docs`: served from the package, and driven in a real
headless Chromium (Debian's, through its chromedriver) against a real server, offline.
(`python -m benchmarks.screenshot` draws the README's picture of the page.)"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver import Chrome as WebDriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from harness.servers import served
from tests.conftest import ROOT
from tests.images import encode
from tests.onnx_models import classifier, headless_metadata, metadata_for
from tests.repositories import add_version
from tests.service_support import cpu_settings, ready_client

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [
    package
    for package, command in (("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER))
    if command is None
]
needs_chromium = pytest.mark.skipif(
    bool(MISSING),
    reason=f"Debian's {' and '.join(MISSING)} not installed (make test installs it as root)",
)

TOKEN = "a-token-for-the-web-page"
PHOTO = ROOT / "model_export" / "photos" / "cat.jpg"
WAIT_S = 60.0
IMAGES_PROCESSED = "vit_images_processed_total"
EXIF_ORIENTATION = 0x0112


# Without a browser: what the server sends.


@pytest.fixture(scope="module")
def client(served_model: Path) -> Iterator[TestClient]:
    with ready_client(cpu_settings(served_model)) as client:
        yield client


def test_the_page_and_its_assets_are_served_from_the_package(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
    assert sorted(assets) == [
        "static/web/app.js",
        "static/web/favicon.svg",
        "static/web/style.css",
    ]
    types = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
    for asset in assets:
        answer = client.get(f"/{asset}")
        assert answer.status_code == 200, asset
        assert answer.headers["content-type"].startswith(types[asset.rsplit(".", 1)[1]])
        assert answer.content
    assert client.get("/static/web/index.html").status_code == 404  # only the files named
    assert client.get("/static/web/../app.py").status_code == 404


def test_docs_load_nothing_from_other_hosts(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", docs.text)
    assert urls and all(url.startswith("/") for url in urls), urls
    for url in urls:
        assert client.get(url).status_code == 200, url
    assert client.get("/redoc").status_code == 404  # ReDoc loads only from a CDN: it is off


def test_a_post_to_the_page_says_to_get_it(client: TestClient) -> None:
    answer = client.post("/")
    assert answer.status_code == 405 and answer.headers["allow"] == "GET"
    assert answer.json()["type"] == "method_not_allowed"


def test_the_page_is_not_in_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/", "/docs"} & set(paths)
    assert not any(path.startswith("/static") for path in paths)


# In Chromium, against a real server with an API token.


@pytest.fixture(scope="module")
def server(served_model: Path) -> Iterator[str]:
    with served(served_model, ROOT, api_token=TOKEN) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        # Only loopback resolves: a page that reached for a CDN could not load it.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def requests_sent(browser: WebDriver) -> list[tuple[str, str]]:
    """Every request the browser sent since the last call, as (method, URL); the log drains as
    it is read."""
    sent = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            sent.append((request["method"], request["url"]))
    return sent


def requested_urls(browser: WebDriver) -> list[str]:
    return [url for _, url in requests_sent(browser)]


def assert_only_loopback(urls: list[str], server: str) -> None:
    elsewhere = [
        url for url in urls if not url.startswith(("data:", "blob:")) and not url.startswith(server)
    ]
    assert not elsewhere, f"requests beyond the server: {elsewhere}"
    assert urlsplit(server).hostname == "127.0.0.1"


def wait_for(browser: WebDriver, condition: Any, message: str) -> Any:
    return WebDriverWait(browser, WAIT_S).until(condition, message)


def open_page(browser: WebDriver, server: str, token: str | None = TOKEN) -> None:
    browser.get(f"{server}/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{server}/")
    wait_for(
        browser,
        lambda b: b.find_element(By.ID, "model").is_enabled(),
        "the model list never loaded",
    )
    if token is not None:
        browser.find_element(By.ID, "token").send_keys(token)


def upload(browser: WebDriver, photo: Path) -> str:
    """Choose `photo` in the file input; wait until the page has finished with it."""
    browser.find_element(By.ID, "file").send_keys(str(photo))
    results = browser.find_element(By.ID, "results")
    wait_for(
        browser,
        lambda b: results.get_attribute("data-state") in ("done", "failed"),
        "the page never finished with the upload",
    )
    return str(results.get_attribute("data-state"))


def classify_by_api(server: str, photo: Path) -> dict[str, Any]:
    answer = httpx.post(
        f"{server}/v1/classify?top_k=5",
        files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    prediction: dict[str, Any] = answer.json()["predictions"][0]
    return prediction


def served_models(server: str) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = httpx.get(f"{server}/v1/models", timeout=10).json()["models"]
    return models


def images_processed(server: str) -> float:
    """The server's count of images classified, every model together, as Prometheus reads it."""
    families = text_string_to_metric_families(httpx.get(f"{server}/metrics", timeout=10).text)
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == IMAGES_PROCESSED
    )


def shown_pixels(browser: WebDriver, image_id: str) -> np.ndarray:
    """The RGB pixels of the page's image `image_id`, at its own size, as the browser holds them."""
    data_url = browser.execute_script(
        """const image = document.getElementById(arguments[0]);
        const canvas = document.createElement("canvas");
        canvas.width = image.naturalWidth;
        canvas.height = image.naturalHeight;
        canvas.getContext("2d").drawImage(image, 0, 0);
        return canvas.toDataURL("image/png");""",
        image_id,
    )
    png = base64.b64decode(str(data_url).split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def server_overlay(server: str, photo: bytes, name: str) -> np.ndarray:
    """The attention overlay the server draws for `photo` (explain's PNG answer)."""
    answer = httpx.post(
        f"{server}/v1/explain",
        files={"file": (name, photo, "image/jpeg")},
        headers={"Authorization": f"Bearer {TOKEN}", "Accept": "image/png"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"), dtype=np.int16)


@needs_chromium
def test_the_page_answers_as_the_api_does(server: str, browser: WebDriver) -> None:
    expected = classify_by_api(server, PHOTO)
    requested_urls(browser)
    open_page(browser, server)
    assert upload(browser, PHOTO) == "done"

    bars = browser.find_elements(By.CSS_SELECTOR, "#top-k li")
    shown = [(b.get_attribute("data-label"), b.get_attribute("data-probability")) for b in bars]
    assert [(label, float(str(p))) for label, p in shown] == [
        (entry["label"], entry["probability"]) for entry in expected["top"]
    ]
    best = expected["top"][0]
    assert bars[0].find_element(By.CSS_SELECTOR, ".label").text == best["label"]
    assert bars[0].find_element(By.CSS_SELECTOR, ".value").text == f"{best['probability']:.1%}"
    assert best["label"] in browser.find_element(By.ID, "status").text

    photo = browser.find_element(By.ID, "photo")
    assert browser.execute_script("return arguments[0].naturalWidth", photo) > 0
    assert PHOTO.name in str(photo.get_attribute("alt"))
    flag = {None: "unknown", True: "true", False: "false"}[expected.get("in_distribution")]
    assert browser.find_element(By.ID, "ood").get_attribute("data-in-distribution") == flag
    assert float(str(browser.find_element(By.ID, "latency").get_attribute("data-ms"))) > 0
    assert_only_loopback(requested_urls(browser), server)


@needs_chromium
def test_one_upload_is_one_request_and_one_image_counted(server: str, browser: WebDriver) -> None:
    open_page(browser, server)
    requests_sent(browser)
    before = images_processed(server)
    assert upload(browser, PHOTO) == "done"
    posts = [url for method, url in requests_sent(browser) if method == "POST"]
    (model,) = served_models(server)
    assert posts == [
        f"{server}/v1/models/{model['name']}/versions/{model['version']}/explain?top_k=5"
    ]
    assert images_processed(server) == before + 1
    assert browser.find_element(By.ID, "overlay-figure").get_attribute("data-state") == "loaded"


@needs_chromium
def test_the_overlay_is_the_one_the_server_draws(
    server: str, browser: WebDriver, tmp_path: Path
) -> None:
    """The page lays the attention over the photo itself, upright as its EXIF says, with the
    colours, box and dimming of the server's PNG overlay: the same picture, within a level or
    two of rounding."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored on its side, 200 x 300: upright, the cat's 300 x 200
    sideways = encode(Image.open(PHOTO).transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)
    photo = tmp_path / "cat-sideways.jpg"
    photo.write_bytes(sideways)
    expected = server_overlay(server, sideways, photo.name)
    assert expected.shape == (200, 300, 3)

    open_page(browser, server)
    assert upload(browser, photo) == "done"
    assert browser.find_element(By.ID, "overlay-figure").get_attribute("data-state") == "loaded"
    overlay = browser.find_element(By.ID, "overlay")
    assert photo.name in str(overlay.get_attribute("alt"))
    shown = shown_pixels(browser, "overlay")
    assert shown.shape == expected.shape
    difference = np.abs(shown - expected)
    assert difference.mean() < 0.25 and np.percentile(difference, 99) <= 2, (
        difference.mean(),
        np.percentile(difference, 99),
    )


@needs_chromium
def test_a_photo_the_browser_cannot_show_is_said_and_its_attention_drawn_on_grey(
    server: str, browser: WebDriver, tmp_path: Path
) -> None:
    tiff = tmp_path / "cat.tiff"
    Image.open(PHOTO).save(tiff)
    open_page(browser, server)
    assert upload(browser, tiff) == "done"
    caption = browser.find_element(By.ID, "photo-caption")
    assert "cannot show" in caption.text and tiff.name in caption.text
    assert not browser.find_element(By.ID, "photo").is_displayed()
    assert browser.find_element(By.ID, "overlay-figure").get_attribute("data-state") == "loaded"
    overlay = shown_pixels(browser, "overlay")
    assert overlay.shape == (200, 300, 3)
    dimmed_grey = round(128 * 0.45)  # the left edge: cropped away before the model saw it
    assert (overlay[:, 0] == dimmed_grey).all()
    assert overlay.max() > 128  # the heat, over the box
    assert upload(browser, PHOTO) == "done"  # the next photo is shown again
    wait_for(browser, lambda b: browser.find_element(By.ID, "photo").is_displayed(), "hidden")
    assert caption.text == "The photo"


@needs_chromium
def test_a_refused_upload_leaves_nothing_of_the_previous_answer(
    server: str, browser: WebDriver, tmp_path: Path
) -> None:
    open_page(browser, server)
    assert upload(browser, PHOTO) == "done"
    assert browser.find_elements(By.CSS_SELECTOR, "#top-k li")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    browser.find_element(By.ID, "file").send_keys(str(notes))
    results = browser.find_element(By.ID, "results")
    wait_for(
        browser,
        lambda b: results.get_attribute("data-state") == "failed",
        "the refused upload never failed",
    )
    assert "415 unsupported_image_format" in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "overlay-figure").get_attribute("data-state") == "empty"
    assert browser.find_elements(By.CSS_SELECTOR, "#top-k li") == []
    for image in ("photo", "overlay"):
        assert browser.find_element(By.ID, image).get_attribute("src") is None, image
    assert browser.find_element(By.ID, "ood").get_attribute("textContent") == ""


@needs_chromium
def test_a_model_without_a_rollout_is_asked_to_classify_only(
    browser: WebDriver, tmp_path: Path
) -> None:
    model = classifier(tmp_path / "plain.onnx", metadata=metadata_for(["red", "green", "blue"], 32))
    with served(model, ROOT) as plain:
        open_page(browser, plain.url, token=None)
        requests_sent(browser)
        assert upload(browser, PHOTO) == "done"
        posts = [url for method, url in requests_sent(browser) if method == "POST"]
        assert posts == [f"{plain.url}/v1/models/foreign/versions/1/classify?top_k=5"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#top-k li")) == 3
        figure = browser.find_element(By.ID, "overlay-figure")
        assert figure.get_attribute("data-state") == "none"
        assert "no attention rollout" in browser.find_element(By.ID, "overlay-caption").text
        assert not browser.find_element(By.ID, "overlay").is_displayed()


@needs_chromium
def test_a_model_without_classes_shows_its_embeddings_size_not_bars(
    browser: WebDriver, tmp_path: Path
) -> None:
    model = classifier(tmp_path / "encoder.onnx", headless=True, metadata=headless_metadata(32))
    with served(model, ROOT) as encoder:
        open_page(browser, encoder.url, token=None)
        assert "serves embeddings only" in browser.find_element(By.ID, "card-labels").text
        assert browser.find_element(By.ID, "card-embedding").text.startswith("3 floats per image")
        requests_sent(browser)
        assert upload(browser, PHOTO) == "done"
        posts = [url for method, url in requests_sent(browser) if method == "POST"]
        assert posts == [f"{encoder.url}/v1/models/encoder/versions/1/embed"]
        assert browser.find_elements(By.CSS_SELECTOR, "#top-k li") == []
        shown = browser.find_element(By.ID, "embedding-result").text
        assert shown.startswith("An embedding of 3 floats")
        assert not browser.find_element(By.ID, "top-k-heading").is_displayed()


@needs_chromium
def test_a_model_not_loaded_is_listed_and_its_first_photo_loads_it(
    browser: WebDriver, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "colours", 1)
    with served(repo, ROOT, model_control="on_demand") as server:
        open_page(browser, server.url, token=None)
        options = browser.find_elements(By.CSS_SELECTOR, "#model option")
        assert [o.text for o in options] == ["colours (not loaded: its first photo loads it)"]
        assert "loads on its first request" in browser.find_element(By.ID, "card-labels").text
        requests_sent(browser)
        assert upload(browser, PHOTO) == "done"
        posts = [url for method, url in requests_sent(browser) if method == "POST"]
        assert posts == [f"{server.url}/v1/models/colours/classify?top_k=5"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#top-k li")) == 3
        wait_for(
            browser,
            lambda b: b.find_element(By.CSS_SELECTOR, "#model option").text == "colours version 1",
            "the list never showed the model loaded",
        )
        assert browser.find_element(By.ID, "card-labels").text == "3: red, green, blue"


@needs_chromium
def test_the_model_card_describes_the_served_model(server: str, browser: WebDriver) -> None:
    (model,) = served_models(server)
    open_page(browser, server, token=None)

    def card(field: str) -> str:
        return str(browser.find_element(By.ID, f"card-{field}").text)

    options = browser.find_elements(By.CSS_SELECTOR, "#model option")
    assert [option.text for option in options] == [f"{model['name']} version {model['version']}"]
    assert card("labels") == f"{len(model['labels'])}: {', '.join(model['labels'])}"
    assert card("input-size") == "128 × 128 pixels"
    assert card("patches") == "64 (8 × 8 of 16 × 16 pixels)"
    assert card("tokens") == str(model["cost"]["tokens"]) == "65"
    assert card("attention-pairs") == "4,225 (65 tokens squared)"
    assert model["runtime"]["precision"] == "fp32"
    assert card("precision") == f"fp32: {model['precision_choice']}"
    assert card("accuracy").startswith(f"{model['held_out_accuracy']:.2%}")
    assert card("provider") == f"{model['provider']} ({model['engine_choice']})"
    assert model["provider"] in ("CPUExecutionProvider", "OpenVINO-CPU")


@needs_chromium
def test_the_model_card_reports_the_self_test(server: str, browser: WebDriver) -> None:
    (model,) = served_models(server)
    open_page(browser, server, token=None)
    self_test = browser.find_element(By.ID, "card-self-test")
    assert model["self_test"]["status"] == "passed"  # the bundled model's golden images
    assert self_test.get_attribute("data-status") == model["self_test"]["status"]
    assert self_test.text.startswith(model["self_test"]["status"])


@needs_chromium
def test_without_the_token_the_page_points_at_its_token_field(
    server: str, browser: WebDriver
) -> None:
    open_page(browser, server, token=None)
    assert upload(browser, PHOTO) == "failed"
    status = browser.find_element(By.ID, "status").text
    assert PHOTO.name in status and "API token field" in status
    assert "Authorization" not in status and "header" not in status
    assert not browser.find_element(By.ID, "result").is_displayed()
    token = browser.find_element(By.ID, "token")
    assert browser.switch_to.active_element == token
    assert token.get_attribute("aria-invalid") == "true"
    error = browser.find_element(By.ID, "token-error")
    assert error.is_displayed() and "needs a token" in error.text
    assert "token-error" in str(token.get_attribute("aria-describedby")).split()

    token.send_keys(TOKEN + Keys.ENTER)  # the photo goes again, with the token
    results = browser.find_element(By.ID, "results")
    wait_for(browser, lambda b: results.get_attribute("data-state") == "done", "not sent again")
    assert browser.find_elements(By.CSS_SELECTOR, "#top-k li")
    assert token.get_attribute("aria-invalid") is None
    assert not browser.find_element(By.ID, "token-error").is_displayed()


@needs_chromium
def test_a_wrong_token_is_said_to_be_refused(server: str, browser: WebDriver) -> None:
    open_page(browser, server, token="not-" + TOKEN)
    assert upload(browser, PHOTO) == "failed"
    assert "refused the API token" in browser.find_element(By.ID, "status").text
    assert browser.switch_to.active_element.get_attribute("id") == "token"
    assert "refused" in browser.find_element(By.ID, "token-error").text


@needs_chromium
def test_the_token_is_kept_for_the_tab_only(server: str, browser: WebDriver) -> None:
    open_page(browser, server)
    browser.refresh()
    wait_for(browser, lambda b: b.find_element(By.ID, "model").is_enabled(), "no models")
    assert browser.find_element(By.ID, "token").get_attribute("value") == TOKEN
    assert browser.execute_script("return localStorage.length") == 0


@needs_chromium
def test_every_control_is_labelled_and_reached_by_keyboard(server: str, browser: WebDriver) -> None:
    open_page(browser, server)
    for control in ("model", "token", "file"):
        assert browser.find_elements(By.CSS_SELECTOR, f"label[for='{control}']"), control
    assert browser.find_element(By.ID, "drop-zone").tag_name == "button"
    assert browser.find_element(By.ID, "results").get_attribute("aria-live") == "polite"

    reached: list[str | None] = []
    browser.find_element(By.TAG_NAME, "body").click()
    while "drop-zone" not in reached and len(reached) < 12:
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.append(browser.switch_to.active_element.get_attribute("id"))
    order = [control for control in reached if control in ("model", "token", "file", "drop-zone")]
    assert order == ["model", "token", "file", "drop-zone"], reached

    upload(browser, PHOTO)
    images = browser.find_elements(By.CSS_SELECTOR, "#result img")
    assert any(image.is_displayed() for image in images)
    assert all(image.get_attribute("alt") for image in images if image.is_displayed())
    for bar in browser.find_elements(By.CSS_SELECTOR, "#top-k li"):
        assert re.fullmatch(r"(<0\.1|\d+\.\d)%", bar.find_element(By.CSS_SELECTOR, ".value").text)


@needs_chromium
def test_docs_render_offline(server: str, browser: WebDriver) -> None:
    requested_urls(browser)
    browser.get(f"{server}/docs")
    wait_for(
        browser,
        lambda b: b.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"),
        "swagger-ui never rendered the operations",
    )
    title = browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
    assert title.startswith("ViT inference service")
    paths = [
        element.text
        for element in browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock-summary-path")
    ]
    assert "/v1/classify" in paths
    assert_only_loopback(requested_urls(browser), server)
