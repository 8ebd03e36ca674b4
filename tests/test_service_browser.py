"""`braintumor serve` as a user meets it: a real process on loopback, the page in a real headless Chromium
(Debian's package, driven by Playwright), and a bounded load test."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import brain_image, save
from fixtures.servers import BIN, free_port, serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(trained_states, tmp_path_factory):
    """`braintumor serve` on the seed_cnn state's shipped model; yields its base URL."""
    workspace = trained_states["seed_cnn"][0]
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [
        str(BIN / "braintumor"),
        "serve",
        "--model",
        str(workspace / "models/model.keras"),
        "--port",
        str(port),
        "--max-file-mb",
        "1",
    ]
    with serving(args, f"http://127.0.0.1:{port}/readyz", log):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("page-scans")
    files = [save(root / f"scan-{k}.png", brain_image(k, 96 + 8 * k)) for k in range(3)]
    broken = root / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return files + [broken]


def test_the_page_ranks_scans_lists_bad_files_and_shows_the_overlay(server, scans, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's `chromium` package (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server + "/")
        page.wait_for_selector("#model:has-text('threshold')")
        page.set_input_files("#files", [str(path) for path in scans])
        page.wait_for_selector("#status:has-text('scans read')", timeout=60_000)

        rows = page.locator("#queue tbody tr[data-filename]")
        assert rows.count() == 3
        probabilities = [float(rows.nth(k).get_attribute("data-probability")) for k in range(3)]
        assert probabilities == sorted(probabilities, reverse=True)
        assert page.locator("#errors").is_visible()
        assert "broken.jpg" in page.locator("#errors li").first.inner_text()
        assert "not a diagnostic device" in page.locator("footer").inner_text()

        rows.first.click()
        page.wait_for_function("document.querySelector('#overlay').naturalWidth > 0", timeout=60_000)
        assert page.locator("#detail-title").inner_text() == rows.first.get_attribute("data-filename")
        page.screenshot(path=str(tmp_path / "triage.png"), full_page=True)
        browser.close()
    assert (tmp_path / "triage.png").stat().st_size > 10_000


def test_a_bounded_load_gets_no_server_error(server, scans):
    """300 uploads from 8 concurrent clients on loopback, one in ten a broken file."""
    good, broken = scans[0].read_bytes(), scans[-1].read_bytes()

    def one(k: int) -> int:
        body = broken if k % 10 == 0 else good
        return requests.post(f"{server}/v1/predict", files=[("files", (f"{k}.png", body))], timeout=120).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(300)))
    assert codes.count(200) == 300, {code: codes.count(code) for code in set(codes)}
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200
