"""The web face end to end, in a real headless Chromium: playground, gallery, model pages, compare,
the key prompt, phone width, and /docs.

Debian's `chromium` driven by Playwright for Python (`executable_path`: no browser download). Each
test starts its own gateway on an empty data dir (kontext-tiny at small sizes: well under a second
a picture) and fails on any console error, uncaught page error or Content-Security-Policy
violation (the gateway's pages allow their own origin only). Screenshots go to
$KONTEXT_TEST_OUTPUT/screenshots (default test-output/); KONTEXT_UPDATE_DOCS=1 also refreshes
docs/playground.png.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import open_image, png_bytes, running_server
from kontext_gateway.config import Settings

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium executable on PATH or at /usr/bin/chromium: the web tests drive a real browser",
)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")

SHOTS = Path(os.environ.get("KONTEXT_TEST_OUTPUT", "test-output")) / "screenshots"
DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ["/", "/playground", "/gallery", "/models", "/models/kontext-tiny", "/compare"]
KEY_STORAGE = "kontext-gateway.api-key"
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Before any script of the page: each violation kept in window.__cspViolations and, where the page
# has the binding, told to the test. (wait_for_function takes "() => ..." here, never a bare
# expression: Playwright runs those with eval, which the policy refuses.)
CSP_WATCH = """window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  const where = `${e.sourceFile}:${e.lineNumber}`;
  const text = `${e.violatedDirective} refused ${e.blockedURI || "inline"} at ${where} ${e.sample}`;
  window.__cspViolations.push(text);
  window.__cspViolation?.(text);
});"""


# ---- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with running_server(Settings(data_dir=tmp_path / "data")) as url:
        yield url


class Console:
    """Console errors and uncaught exceptions of a page. Chromium also logs every HTTP error answer
    ("Failed to load resource: ... status of 400") as a console error: a test that provokes one on
    purpose (a 400 for a bad size, the 401 that asks for a key) names its status in `allow`."""

    NETWORK = re.compile(r"Failed to load resource: the server responded with a status of (\d{3})")

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.allowed: set[int] = set()

    def attach(self, page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.expose_function("__cspViolation", lambda text: self.errors.append(f"CSP violation: {text}"))
        page.add_init_script(CSP_WATCH)

    def _console(self, msg) -> None:
        if msg.type not in ("error", "warning"):
            return
        m = self.NETWORK.search(msg.text)
        url = (msg.location or {}).get("url", "")
        if m and int(m.group(1)) in self.allowed and "/v1/" in url:
            return
        self.errors.append(f"console.{msg.type}: {msg.text} ({url})")

    def allow(self, *statuses: int) -> None:
        self.allowed.update(statuses)

    def assert_clean(self) -> None:
        assert not self.errors, "console errors:\n" + "\n".join(self.errors)


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def page(browser, console: Console) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    console.attach(pg)
    try:
        yield pg
        console.assert_clean()  # every test: no console errors, no uncaught exceptions
    finally:
        context.close()


# ---- helpers ------------------------------------------------------------------------------------------------


def shot(page, name: str, full_page: bool = False) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    if full_page:
        page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=full_page)
    return path


def image_bytes(src: str) -> bytes:
    if src.startswith("data:"):
        return base64.b64decode(src.split(",", 1)[1])
    r = httpx.get(src, timeout=30)  # signed URL: no key needed
    r.raise_for_status()
    return r.content


def run_and_wait(page, previous: str | None = None) -> str:
    """Click Run; wait until a new result is shown; return its request id."""
    page.get_by_test_id("run").click()
    page.wait_for_function(
        """prev => { const r = document.querySelector('[data-testid=result]');
                     return r && r.dataset.requestId !== prev && r.querySelector('img')?.complete; }""",
        arg=previous or "",
    )
    return page.get_by_test_id("result").get_attribute("data-request-id")


def fill_generate(page, prompt: str, size: str, steps: str = "2", seed: str | None = None) -> None:
    page.get_by_test_id("prompt").fill(prompt)
    page.get_by_test_id("param-size").fill(size)
    if seed is not None:
        page.get_by_test_id("param-seed").fill(seed)
    page.locator('[data-testid="group-advanced"] > summary').click()  # folded by default
    page.get_by_test_id("param-num_inference_steps").fill(steps)


def no_horizontal_scroll(page) -> tuple[int, int]:
    return page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")


# ---- playground ---------------------------------------------------------------------------------------------


def test_generate_shows_image_at_requested_size(server: str, page) -> None:
    page.goto(f"{server}/playground?model=kontext-tiny")
    assert page.get_by_test_id("model-select").input_value() == "kontext-tiny"
    fill_generate(page, "A serene mountain landscape at sunset", "256x256", steps="4", seed="7")
    rid = run_and_wait(page)

    img = page.get_by_test_id("result-image")
    assert open_image(image_bytes(img.get_attribute("src"))).size == (256, 256)
    # shown at its real size (the column is wider than 256 px)
    assert page.evaluate("el => [el.naturalWidth, el.clientWidth]", img.element_handle()) == [256, 256]
    assert page.get_by_test_id("status").get_attribute("data-state") == "succeeded"
    assert page.get_by_test_id("meta-seed").inner_text() == "7"
    assert page.get_by_test_id("meta-size").inner_text() == "256x256"
    assert page.get_by_test_id("meta-provider").inner_text() == "local/kontext-tiny"
    assert page.get_by_test_id("meta-cost").inner_text() == "$0.001"
    assert re.fullmatch(r"\d+ ms|\d+\.\d s", page.get_by_test_id("meta-duration").inner_text())
    assert page.get_by_test_id("download").get_attribute("download").endswith(".png")

    # "Copy as code": the same request through the Images API, with this server's base URL
    python = page.get_by_test_id("result-code-python").text_content()
    assert f'base_url="{server}/v1"' in python and "client.images.generate(" in python
    assert 'size="256x256"' in python and 'extra_body={"seed": 7, "num_inference_steps": 4}' in python
    assert f"curl {server}/v1/images/generations" in page.get_by_test_id("result-code-curl").text_content()
    assert "client.images.generate({" in page.get_by_test_id("result-code-js").text_content()

    record = httpx.get(f"{server}/v1/requests/{rid}").json()
    assert record["status"] == "succeeded" and record["settings"]["seed"] == 7
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "playground-result")
    if os.environ.get("KONTEXT_UPDATE_DOCS") == "1":
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS / "playground.png"))  # the viewport: 1280x800, for the README


def test_upload_and_edit(server: str, page) -> None:
    page.goto(f"{server}/playground?model=kontext-tiny")
    page.get_by_test_id("mode-edit").check()
    source = png_bytes(96, 64)
    with page.expect_file_chooser() as chooser:
        page.get_by_test_id("input-pick").click()
    chooser.value.set_files(files=[{"name": "photo.png", "mimeType": "image/png", "buffer": source}])
    thumb = page.get_by_test_id("input-thumb")
    assert image_bytes(thumb.get_attribute("src")) == source
    page.get_by_test_id("prompt").fill("Add a starry night sky to this image")
    page.get_by_test_id("param-size").fill("96x64")
    rid = run_and_wait(page)

    assert open_image(image_bytes(page.get_by_test_id("result-image").get_attribute("src"))).size == (96, 64)
    record = httpx.get(f"{server}/v1/requests/{rid}").json()
    assert record["mode"] == "edit" and record["inputs"] == 1
    python = page.get_by_test_id("result-code-python").text_content()
    assert "client.images.edit(" in python and 'image=open("photo.png", "rb")' in python

    # remove the image: an edit without one is stopped with words, before any call
    page.get_by_test_id("input-remove").click()
    assert page.get_by_test_id("input-thumb").count() == 0
    page.get_by_test_id("run").click()
    assert "An input image is needed" in page.get_by_test_id("error").inner_text()


DROP_AND_PASTE = """([kind, names, b64]) => {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const dt = new DataTransfer();
    for (const name of names) dt.items.add(new File([bytes], name, { type: "image/png" }));
    const init = { bubbles: true, cancelable: true };
    if (kind === "drop") {
        document.querySelector('[data-testid=input-dropzone]')
          .dispatchEvent(new DragEvent("drop", { ...init, dataTransfer: dt }));
    } else {
        document.dispatchEvent(new ClipboardEvent("paste", { ...init, clipboardData: dt }));
    }
}"""


def test_drop_and_paste_add_images_up_to_the_model_limit(server: str, page) -> None:
    page.goto(f"{server}/playground?model=flux.1-kontext-pro")  # takes up to 4 input images
    page.get_by_test_id("prompt").wait_for()
    b64 = base64.b64encode(png_bytes(32, 32)).decode()
    page.evaluate(DROP_AND_PASTE, ["paste", ["a.png"], b64])  # a paste switches to edit mode
    thumbs = page.get_by_test_id("input-thumb")
    thumbs.first.wait_for()
    assert page.get_by_test_id("mode-edit").is_checked()
    page.evaluate(DROP_AND_PASTE, ["drop", ["b.png", "c.png"], b64])
    page.wait_for_function("() => document.querySelectorAll('[data-testid=input-thumb]').length === 3")
    page.get_by_role("button", name="Remove input image 2").click()
    assert thumbs.count() == 2
    page.evaluate(DROP_AND_PASTE, ["drop", ["d.png", "e.png", "f.png"], b64])
    page.wait_for_function("() => document.querySelectorAll('[data-testid=input-thumb]').length === 4")
    # Said as the drop is taken in, so nothing of it is still to come.
    page.get_by_text(re.compile(r"takes at most 4 images; 1 left out\.")).wait_for(state="attached")
    assert thumbs.count() == 4  # the model's max_input_images
    assert "4 of 4 images" in page.get_by_test_id("input-dropzone").inner_text()
    # the chosen model's parameters: provider-only ones are marked with their providers
    page.locator('[data-testid="group-advanced"] > summary').click()
    assert page.get_by_test_id("param-enhance_prompt").is_visible()
    assert page.get_by_test_id("param-num_inference_steps").count() == 0  # no provider of [pro] takes it


def test_edit_this_result_then_edit_again(server: str, page) -> None:
    page.goto(f"{server}/playground?model=kontext-tiny")
    fill_generate(page, "a red fox", "64x64")
    first = run_and_wait(page)
    first_png = image_bytes(page.get_by_test_id("result-image").get_attribute("src"))

    page.get_by_test_id("edit-result").click()
    page.get_by_test_id("input-thumb").wait_for()  # the result is fetched and turned into a data URI
    assert page.get_by_test_id("mode-edit").is_checked()
    assert image_bytes(page.get_by_test_id("input-thumb").get_attribute("src")) == first_png
    page.get_by_test_id("prompt").fill("make it night")
    with page.expect_request(lambda r: r.url.endswith("/v1/predictions") and r.method == "POST") as sent:
        second = run_and_wait(page, first)
    # the second request's input image is the first result, byte for byte
    assert image_bytes(sent.value.post_data_json["input"]["input_image"]) == first_png
    second_png = image_bytes(page.get_by_test_id("result-image").get_attribute("src"))
    assert open_image(second_png).size == (64, 64)

    # and once more: iterative editing keeps going
    before = page.get_by_test_id("input-thumb").get_attribute("src")  # read first: the swap can be quick
    page.get_by_test_id("edit-result").click()
    page.wait_for_function("""src => document.querySelector('[data-testid=input-thumb]')?.src !== src""", arg=before)
    assert image_bytes(page.get_by_test_id("input-thumb").get_attribute("src")) == second_png
    page.get_by_test_id("prompt").fill("add snow")
    third = run_and_wait(page, second)
    assert len({first, second, third}) == 3
    assert httpx.get(f"{server}/v1/requests/{third}").json()["mode"] == "edit"


def test_running_shows_step_progress_and_cancels(server: str, page) -> None:
    page.goto(f"{server}/playground?model=kontext-tiny")
    fill_generate(page, "a slow one", "1024x1024", steps="40")
    page.get_by_test_id("run").click()
    progress = page.get_by_test_id("progress-text")
    progress.wait_for()  # the local engine reports its denoising steps while it runs
    assert re.fullmatch(r"step \d+/40", progress.inner_text())
    assert page.get_by_test_id("status").get_attribute("data-state") == "processing"
    assert re.fullmatch(r"\d+ ms|\d+\.\d s", page.get_by_test_id("elapsed").inner_text())
    assert page.get_by_test_id("run").is_disabled()
    page.get_by_test_id("cancel").click()
    page.wait_for_function("() => document.querySelector('[data-testid=status]').dataset.state === 'canceled'")
    assert page.get_by_test_id("status-text").inner_text().startswith("Canceled after")
    page.wait_for_function("() => !document.querySelector('[data-testid=run]').disabled")
    assert page.get_by_test_id("result-image").count() == 0
    listed = httpx.get(f"{server}/v1/requests", params={"status": "canceled"}).json()["data"]
    assert [r["prompt"] for r in listed] == ["a slow one"]


def test_bad_input_shows_error_in_words(server: str, page, console: Console) -> None:
    console.allow(400)  # the gateway's answer to the bad size (Chromium logs it)
    page.goto(f"{server}/playground?model=kontext-tiny")
    page.get_by_test_id("run").click()  # no prompt yet: said before any call
    assert "A prompt is needed" in page.get_by_test_id("error").inner_text()

    page.get_by_test_id("prompt").fill("a red fox")
    page.get_by_test_id("param-size").fill("0x0")
    page.get_by_test_id("run").click()
    error = page.get_by_test_id("error")
    error.get_by_text("Size 0x0 is not valid").wait_for()
    assert "each side must be between 1 and" in page.get_by_test_id("error-message").inner_text()
    size = page.get_by_test_id("param-size")
    assert size.get_attribute("aria-invalid") == "true"
    assert page.evaluate("document.activeElement.dataset.testid") == "param-size"
    assert "0x0" in page.get_by_test_id("field-error").inner_text()
    assert page.get_by_test_id("result-image").count() == 0
    shot(page, "playground-error")

    size.fill("64x64")  # fixing it clears the mark, and the run goes through
    assert size.get_attribute("aria-invalid") is None
    page.locator('[data-testid="group-advanced"] > summary').click()
    page.get_by_test_id("param-num_inference_steps").fill("1")
    run_and_wait(page)
    assert page.get_by_test_id("error").count() == 0


# ---- gallery ------------------------------------------------------------------------------------------------


def test_gallery_lists_newest_first_and_filters(server: str, page) -> None:
    page.goto(f"{server}/gallery")
    empty = page.get_by_test_id("gallery-empty")
    empty.wait_for()
    assert page.get_by_test_id("example-prompt").count() >= 1  # the catalog's example prompts

    with httpx.Client(base_url=server, timeout=60) as http:
        for prompt in ("first: a red fox", "second: an owl"):
            r = http.post(
                "/v1/images/generations",
                json={"model": "kontext-tiny", "prompt": prompt, "size": "64x64", "num_inference_steps": 1, "seed": 3},
            )
            assert r.status_code == 200, r.text
    page.reload()
    items = page.get_by_test_id("gallery-item")
    items.first.wait_for()
    assert page.get_by_test_id("gallery-prompt").all_inner_texts() == ["second: an owl", "first: a red fox"]
    assert open_image(image_bytes(items.first.locator("img").get_attribute("src"))).size == (64, 64)
    shot(page, "gallery")

    page.get_by_test_id("gallery-model").select_option("flux.1-kontext-pro")
    page.get_by_test_id("gallery-empty").wait_for()
    assert items.count() == 0 and "gallery?model=flux.1-kontext-pro" in page.url
    page.get_by_test_id("gallery-model").select_option("kontext-tiny")
    items.first.wait_for()
    assert items.count() == 2

    # open one large, then reuse its prompt and settings in the playground
    items.first.click()
    viewer = page.get_by_test_id("gallery-viewer")
    viewer.wait_for()
    assert viewer.get_by_test_id("viewer-prompt").inner_text() == "second: an owl"
    assert viewer.get_by_test_id("viewer-seed").inner_text() == "3"
    shot(page, "gallery-viewer")
    page.get_by_test_id("reuse").click()
    page.get_by_test_id("playground-form").wait_for()
    assert page.get_by_test_id("prompt").input_value() == "second: an owl"
    assert page.get_by_test_id("param-size").input_value() == "64x64"
    assert page.get_by_test_id("param-seed").input_value() == "3"

    # "edit this": the image becomes the playground's edit input
    page.go_back()
    page.get_by_test_id("gallery-item").first.click()
    source = image_bytes(page.get_by_test_id("viewer-image").first.get_attribute("src"))
    page.get_by_test_id("edit-this").click()
    page.get_by_test_id("input-thumb").wait_for()
    assert page.get_by_test_id("mode-edit").is_checked()
    assert image_bytes(page.get_by_test_id("input-thumb").get_attribute("src")) == source


def test_gallery_pages_with_load_more(server: str, page) -> None:
    with httpx.Client(base_url=server, timeout=60) as http:
        for i in range(26):  # a page is 24
            r = http.post(
                "/v1/images/generations",
                json={"model": "kontext-tiny", "prompt": f"picture {i}", "size": "32x32", "num_inference_steps": 1},
            )
            assert r.status_code == 200, r.text
    page.goto(f"{server}/gallery")
    items = page.get_by_test_id("gallery-item")
    items.first.wait_for()
    assert items.count() == 24
    page.get_by_test_id("load-more").click()
    page.wait_for_function("() => document.querySelectorAll('[data-testid=gallery-item]').length === 26")
    prompts = page.get_by_test_id("gallery-prompt").all_inner_texts()
    assert prompts == [f"picture {i}" for i in range(25, -1, -1)]  # newest first, none twice
    assert page.get_by_test_id("load-more").is_hidden()


def test_empty_gallery_suggestion_fills_playground(server: str, page) -> None:
    page.goto(f"{server}/gallery?model=kontext-tiny")
    suggestion = page.get_by_test_id("example-prompt").first
    text = suggestion.inner_text().split(" — ")[0]
    suggestion.click()
    page.get_by_test_id("playground-form").wait_for()
    assert page.get_by_test_id("prompt").input_value() == text
    assert page.get_by_test_id("model-select").input_value() == "kontext-tiny"


# ---- model pages ----------------------------------------------------------------------------------------------


def test_model_page_pricing_table_and_working_python_example(server: str, page, tmp_path: Path) -> None:
    page.goto(f"{server}/models")
    cards = page.get_by_test_id("model-card")
    cards.first.wait_for()
    assert cards.count() == len(httpx.get(f"{server}/v1/models").json()["data"])
    page.locator('[data-testid="model-card"][data-id="kontext-tiny"] [data-testid="model-link"]').click()
    page.get_by_test_id("providers-table").wait_for()
    assert page.url == f"{server}/models/kontext-tiny"

    row = page.locator('[data-testid="provider-row"][data-config-key="local/kontext-tiny"]')
    assert row.get_by_test_id("price").inner_text() == "$0.001"
    assert row.get_by_test_id("p50").inner_text() == "no data yet"  # nothing run yet
    assert "2048x2048" in page.get_by_test_id("specs").inner_text()
    assert "Deterministic" in page.get_by_test_id("strengths").inner_text()
    params = page.locator('[data-testid="params-table"] [data-testid="param-row"]')
    names = params.evaluate_all("rows => rows.map(r => r.dataset.name)")
    assert {"prompt", "seed", "size", "num_inference_steps", "cfg_scale", "image"} <= set(names)
    steps = page.locator('[data-testid="param-row"][data-name="num_inference_steps"]').inner_text()
    assert "integer" in steps and "1 to 100" in steps and "local/kontext-tiny" in steps
    shot(page, "model-page", full_page=True)

    # The text-to-image Python example, run as it is shown, makes an image on this server.
    code = page.get_by_test_id("code-t2i-python").text_content()
    assert f'base_url="{server}/v1"' in code and 'api_key="unused"' in code
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip().splitlines()[-1]
    assert url.startswith(f"{server}/v1/blobs/")
    assert open_image(image_bytes(url)).size == (1024, 1024)
    edit = page.get_by_test_id("code-edit-python").text_content()
    assert "client.images.edit(" in edit and 'image=open("input.png", "rb")' in edit
    assert "-F image=@input.png" in page.get_by_test_id("code-edit-curl").text_content()

    page.reload()  # the stats now know the request the example made
    row.get_by_test_id("p50").wait_for()
    assert re.fullmatch(r"\d+ ms", row.get_by_test_id("p50").inner_text())
    assert row.get_by_test_id("success-rate").inner_text() == "100%"

    page.get_by_test_id("try-playground").click()
    page.get_by_test_id("playground-form").wait_for()
    assert page.get_by_test_id("model-select").input_value() == "kontext-tiny"


# ---- compare ----------------------------------------------------------------------------------------------------


def test_compare_runs_two_columns(server: str, page) -> None:
    page.goto(f"{server}/compare")
    checked = page.locator('[data-testid="target"]:checked')
    checked.first.wait_for()
    assert checked.evaluate_all("els => els.map(e => e.value)") == ["kontext-tiny|", "kontext-tiny|local/kontext-tiny"]
    page.get_by_test_id("compare-prompt").fill("a lighthouse in a storm")
    page.get_by_test_id("compare-size").fill("64x64")
    page.get_by_test_id("compare-seed").fill("11")
    page.get_by_test_id("compare-run").click()
    page.wait_for_function(
        "() => document.querySelectorAll("
        "'[data-testid=compare-col][data-state=succeeded] [data-testid=col-cost]').length === 2"
    )
    cols = page.get_by_test_id("compare-col")
    assert cols.count() == 2
    pictures = []
    for i in range(2):
        col = cols.nth(i)
        assert col.get_by_test_id("col-cost").inner_text() == "$0.001"
        assert re.fullmatch(r"\d+ ms|\d+\.\d s", col.get_by_test_id("col-time").inner_text())
        assert col.get_by_test_id("col-provider").inner_text() == "local/kontext-tiny"
        data = image_bytes(col.get_by_test_id("col-image").get_attribute("src"))
        assert open_image(data).size == (64, 64)
        pictures.append(data)
    assert pictures[0] == pictures[1]  # one seed for every column; the same model: the same picture
    shot(page, "compare", full_page=True)


def test_compare_column_shows_its_own_error(server: str, page, console: Console) -> None:
    console.allow(400)
    page.goto(f"{server}/compare")
    page.get_by_test_id("compare-prompt").fill("a lighthouse")
    page.get_by_test_id("compare-size").fill("0x0")
    page.get_by_test_id("compare-run").click()
    page.wait_for_function(
        "() => document.querySelectorAll('[data-testid=compare-col][data-state=error]').length === 2"
    )
    assert "Size 0x0 is not valid" in page.get_by_test_id("col-error").first.inner_text()


# ---- keys ---------------------------------------------------------------------------------------------------------


def test_keyed_server_asks_for_key_then_playground_works(server: str, page, console: Console) -> None:
    console.allow(401)  # the answer that makes the page ask
    r = httpx.post(f"{server}/v1/admin/keys", json={"name": "web"})  # the first key makes the gateway keyed
    assert r.status_code in (200, 201), r.text
    key = r.json()["key"]
    assert httpx.get(f"{server}/v1/models").status_code == 401

    page.goto(f"{server}/playground?model=kontext-tiny")
    dialog = page.get_by_test_id("key-dialog")
    dialog.wait_for()
    shot(page, "key-prompt")
    page.get_by_test_id("key-input").fill("kx-wrong")
    page.get_by_test_id("key-submit").click()
    page.get_by_test_id("key-reason").get_by_text("not accepted").wait_for()  # asked again, saying why
    page.get_by_test_id("key-input").fill(key)
    page.get_by_test_id("key-submit").click()

    page.get_by_test_id("playground-form").wait_for()
    assert not dialog.is_visible()
    assert page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") == key
    assert page.evaluate("localStorage.length") == 0  # kept for the tab only
    assert page.get_by_test_id("key-status").is_visible()
    fill_generate(page, "a red fox", "64x64")
    run_and_wait(page)
    assert open_image(image_bytes(page.get_by_test_id("result-image").get_attribute("src"))).size == (64, 64)
    code = page.get_by_test_id("result-code-python").text_content()
    assert 'os.environ["KONTEXT_API_KEY"]' in code and key not in code  # never the key itself

    page.get_by_test_id("nav-gallery").click()  # other pages use the key too, without asking again
    page.get_by_test_id("gallery-item").first.wait_for()
    assert not dialog.is_visible()


# ---- phone width, keyboard, every page --------------------------------------------------------------------------


def test_phone_width_has_no_horizontal_scroll(server: str, browser, console: Console) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 800}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    console.attach(page)
    try:
        page.goto(f"{server}/playground?model=kontext-tiny")
        fill_generate(page, "a red fox", "128x128")
        run_and_wait(page)  # with a result and its code blocks
        scroll, width = no_horizontal_scroll(page)
        assert scroll <= width, f"/playground: {scroll} > {width}"
        shot(page, "phone-playground", full_page=True)
        for path in PAGES[2:]:
            page.goto(f"{server}{path}")
            page.locator("main h1").first.wait_for()
            page.wait_for_load_state("networkidle")
            scroll, width = no_horizontal_scroll(page)
            assert scroll <= width, f"{path}: {scroll} > {width}"
            shot(page, "phone" + path.replace("/", "-"), full_page=True)
        console.assert_clean()
    finally:
        context.close()


def test_keyboard_reaches_the_controls(server: str, page) -> None:
    page.goto(f"{server}/playground?model=kontext-tiny")
    page.get_by_test_id("prompt").wait_for()
    reached = []
    for _ in range(12):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.dataset.testid || document.activeElement.tagName"))
    for testid in ("nav-playground", "nav-gallery", "nav-models", "nav-compare", "model-select", "prompt"):
        assert testid in reached, reached
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # focus is visible
    page.get_by_test_id("prompt").fill("a red fox")
    page.get_by_test_id("param-size").fill("64x64")
    page.get_by_test_id("prompt").press("Control+Enter")  # runs it from the keyboard
    page.get_by_test_id("result-image").wait_for()


def test_every_page_loads_without_console_errors(server: str, page) -> None:
    for path in PAGES:
        page.goto(f"{server}{path}")
        page.locator("main h1").first.wait_for()
        page.wait_for_load_state("networkidle")
        assert page.title().endswith("Kontext Gateway")
        current = page.locator('header nav [aria-current="page"]')
        assert current.count() == 1
    # in-app navigation: pushState, no reload
    page.evaluate("window.__marker = 1")
    for testid, heading in (
        ("nav-models", "Models"),
        ("nav-compare", "Compare"),
        ("nav-gallery", "Gallery"),
        ("nav-playground", "Playground"),
    ):
        page.get_by_test_id(testid).click()
        page.locator("main h1", has_text=heading).wait_for()
    assert page.evaluate("window.__marker") == 1
    page.go_back()
    page.locator("main h1", has_text="Gallery").wait_for()


# ---- Content-Security-Policy, /docs -----------------------------------------------------------------------------


def violations(page) -> list[str]:
    return page.evaluate("window.__cspViolations")


def test_every_page_runs_under_its_csp(server: str, page, browser) -> None:
    # The watch sees what the policy refuses: a style attribute set on purpose is reported.
    probe_context = browser.new_context()
    try:
        probe = probe_context.new_page()
        probe.add_init_script(CSP_WATCH)
        probe.goto(f"{server}/gallery")
        probe.evaluate("document.body.setAttribute('style', 'outline: 1px solid red')")
        probe.wait_for_function("() => window.__cspViolations.length > 0")
        assert violations(probe)[0].startswith("style-src-attr refused inline")
    finally:
        probe_context.close()

    response = page.goto(f"{server}/playground?model=kontext-tiny")
    assert response.headers["content-security-policy"] == PAGE_CSP
    assert response.headers["x-frame-options"] == "DENY"
    fill_generate(page, "a red fox", "64x64")
    run_and_wait(page)  # the result shown, with its code blocks
    page.get_by_test_id("mode-edit").check()  # the image picker, with a preview of a chosen file
    with page.expect_file_chooser() as chooser:
        page.get_by_test_id("input-pick").click()
    chooser.value.set_files(files=[{"name": "photo.png", "mimeType": "image/png", "buffer": png_bytes(32, 32)}])
    page.get_by_test_id("input-thumb").wait_for()
    assert violations(page) == []
    for path in PAGES:
        response = page.goto(f"{server}{path}")
        assert response.headers["content-security-policy"] == PAGE_CSP
        page.locator("main h1").first.wait_for()
        page.wait_for_load_state("networkidle")
        assert violations(page) == [], path
    page.goto(f"{server}/gallery")
    page.get_by_test_id("gallery-item").first.click()  # the viewer
    page.get_by_test_id("viewer-image").first.wait_for()
    assert violations(page) == []
    page.goto(f"{server}/docs")
    page.locator(".opblock").first.wait_for()
    page.wait_for_load_state("networkidle")
    assert violations(page) == []


HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def test_docs_render_offline(server: str, page) -> None:
    elsewhere: list[str] = []

    def only_the_gateway(route) -> None:
        if route.request.url.startswith(f"{server}/"):
            route.continue_()
        else:  # a CDN, a validator badge, a font: none may be needed
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_gateway)
    response = page.goto(f"{server}/docs")
    assert response.headers["content-security-policy"] == PAGE_CSP
    spec = httpx.get(f"{server}/openapi.json").json()
    operations = sum(1 for item in spec["paths"].values() for method in item if method in HTTP_METHODS)
    page.locator(".opblock").first.wait_for()
    assert page.locator(".opblock").count() == operations
    assert page.get_by_text(spec["info"]["title"]).first.is_visible()

    # Try one out: the call goes to this gateway under the page's policy (connect-src 'self').
    op = page.locator(".opblock-get", has=page.locator('.opblock-summary-path[data-path="/v1/models"]'))
    op.locator(".opblock-summary").click()
    op.get_by_role("button", name="Try it out").click()
    op.get_by_role("button", name="Execute").click()
    answer = op.locator(".live-responses-table tr.response").first
    answer.wait_for()
    assert answer.locator(".response-col_status").inner_text().strip() == "200"
    assert "kontext-tiny" in answer.locator(".response-col_description").inner_text()
    page.wait_for_load_state("networkidle")
    shot(page, "docs")
    assert elsewhere == []
    assert violations(page) == []
