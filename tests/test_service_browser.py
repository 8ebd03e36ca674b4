"""`braintumor serve` as a user meets it: a real process on loopback with API keys and an audit log, the page in
a real headless Chromium (Debian's package, driven by Playwright), and a bounded load test."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image

from braintumor.data.datasets import load_split
from braintumor.serve.access import add_key
from braintumor.serve.feedback import FeedbackStore
from braintumor.serve.predict import load, predict, predict_series

from conftest import save
from fixtures.browser import chromium_page
from fixtures.dicom import dicom_bytes, mr_dataset
from fixtures.servers import BIN, free_port, serving


@pytest.fixture(scope="module")
def scans(trained_states, tmp_path_factory) -> list[Path]:
    """Three scans of the served model's test split that its gate reads, a broken file and a page of noise (not
    a brain MR slice)."""
    root = tmp_path_factory.mktemp("page-scans")
    workspace = trained_states["seed_cnn"][0]
    test = load_split(workspace / "artifacts/split", "test", "binary")
    candidates = [save(root / f"scan-{k}.png", pixels[..., 0]) for k, pixels in enumerate(test["x"])]
    answers, _ = predict(load(str(workspace / "models/model.keras")), candidates)
    readable = [k for k, a in enumerate(answers) if a["status"] != "out_of_distribution"]
    assert len(readable) >= 5, answers  # three scans, and two slices of the series that the page can step through
    files = [candidates[k] for k in readable[:3]]
    in_series = readable[3:5] + [k for k in range(len(candidates)) if k not in readable[:5]][:4]
    broken = root / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    noise = save(root / "noise.png", np.random.default_rng(0).integers(0, 256, (200, 200)).astype(np.uint8))
    return files + [broken, noise, zipped_series(root / "study.zip", [test["x"][k][..., 0] for k in in_series])]


def zipped_series(path: Path, slices: list[np.ndarray]) -> Path:
    """A zipped MR series of 8-bit slices (one DICOM file each, positioned, windowed to their full range)."""
    from pydicom.uid import generate_uid

    series, study = generate_uid(), generate_uid()
    with zipfile.ZipFile(path, "w") as archive:
        for k, pixels in enumerate(slices):
            ds = mr_dataset(
                pixels.astype(np.uint16),
                SeriesInstanceUID=series,
                StudyInstanceUID=study,
                WindowCenter=128,
                WindowWidth=256,
                ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                ImagePositionPatient=[0.0, 0.0, float(k)],
            )
            archive.writestr(f"IM{k:04d}", dicom_bytes(ds))
    return path


@pytest.fixture(scope="module")
def server(trained_states, scans, tmp_path_factory):
    """`braintumor serve` with a keys file and an audit log, on a copy of the seed_cnn state's shipped model whose
    uncertain band holds the middle one of the three scans, so that the page must show it as uncertain (a model
    trained for seconds calibrates every tumor to 1.0, so the copy shows raw scores). Yields its URL, the key,
    the audit and server logs, and the scans read and uncertain as `predict` answers them."""
    root = tmp_path_factory.mktemp("serve")
    models = root / "models"
    shutil.copytree(trained_states["seed_cnn"][0] / "models", models)
    info = json.loads((models / "model.json").read_text())
    del info["calibration"]
    (models / "model.json").write_text(json.dumps(info))
    answers, _ = predict(load(str(models / "model.keras")), scans[:3])
    low, middle, high = sorted(a["probability"] for a in answers)
    assert low < middle < high
    info["uncertain_band"] = [(low + middle) / 2, (middle + high) / 2]
    (models / "model.json").write_text(json.dumps(info))
    loaded = load(str(models / "model.keras"))
    answers, _ = predict(loaded, scans[:3])  # as the server will answer
    (study,), _ = predict_series(loaded, [("study.zip", "study.zip", scans[-1].read_bytes())])
    uncertain = {scans[k].name for k, a in enumerate(answers) if a["status"] == "uncertain"}
    uncertain |= {"series"} if study["status"] == "uncertain" else set()
    read = sum(a["status"] != "out_of_distribution" for a in answers) + (study["status"] != "out_of_distribution")
    assert any(a["probability"] == middle and a["status"] == "uncertain" for a in answers)
    key = add_key(root / "keys.json", "reader", ["predict", "explain", "feedback"])
    port = free_port()
    args = [
        str(BIN / "braintumor"),
        "serve",
        "--model",
        str(models / "model.keras"),
        "--port",
        str(port),
        "--max-file-mb",
        "1",
        "--keys",
        str(root / "keys.json"),
        "--rate-limit",
        "100000",
        "--burst",
        "1000",
        "--audit-log",
        str(root / "audit.jsonl"),
    ]
    with serving(args, f"http://127.0.0.1:{port}/readyz", root / "serve.log"):
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{port}",
            key=key,
            audit=root / "audit.jsonl",
            feedback=f"sqlite:///{root / 'feedback.db'}",  # the default store, beside the audit log
            log=root / "serve.log",
            read=read,
            uncertain=uncertain,
            study=study,
        )


def test_the_page_ranks_scans_lists_bad_files_and_shows_the_overlay(server, scans):
    with chromium_page() as page:
        page.goto(server.url + "/")
        page.wait_for_selector("#model:has-text('API key')")  # the server asks for a key first
        page.fill("#key-input", server.key)
        page.click("#key button")
        page.wait_for_selector("#model:has-text('threshold')")
        page.set_input_files("#files", [str(path) for path in scans])
        page.wait_for_selector("#status:has-text('scans read')", timeout=60_000)

        rows = page.locator("#queue tbody tr[data-filename]")
        assert rows.count() == server.read
        first = len(server.uncertain)
        top = {
            "series" if rows.nth(k).get_attribute("data-series") else rows.nth(k).get_attribute("data-filename")
            for k in range(first)
        }
        assert top == server.uncertain  # at the top
        assert all("Uncertain: read first" in rows.nth(k).inner_text() for k in range(first))
        assert "uncertain band" in page.locator("#queue tbody").inner_text()
        probabilities = [float(rows.nth(k).get_attribute("data-probability")) for k in range(first, server.read)]
        assert probabilities == sorted(probabilities, reverse=True)
        assert page.locator("#errors").is_visible()
        not_read = page.locator("#errors").inner_text()
        assert "broken.jpg" in not_read
        assert "noise.png: not read: does not look like a brain MR slice" in not_read
        assert "Not for diagnosis" in page.locator("footer").inner_text()

        study = page.locator("#queue tbody tr[data-series]")  # the zipped series: one row that opens to its slices
        assert study.count() == 1 and "DICOM series, 6 slices" in study.inner_text()
        study.click()
        page.wait_for_selector("#slices li")
        assert page.locator("#slices li").count() == 6
        assert page.locator("#slices li.driving").count() == len(server.study["driving_slices"])
        shown = "() => { const i = document.querySelector('#overlay'); return i.naturalWidth > 0 && i.src !== %r; }"
        page.wait_for_function(shown % "", timeout=60_000)  # the slice that drove the reading, with its evidence
        read = [s["slice"] for s in server.study["slice_results"] if s["status"] != "out_of_distribution"]
        driving = server.study["driving_slices"]
        assert page.locator("#slices li.readable").count() == len(read) >= 2  # the gate's refusals get no overlay
        series = study.get_attribute("data-series")
        zipped = [("files", ("study.zip", scans[-1].read_bytes()))]
        for k in [(driving or read)[0]] + [k for k in read if k != (driving or read)[0]][:1]:  # then another slice
            item = page.locator(f"#slices li[data-slice='{k}']")
            if "shown" not in (item.get_attribute("class") or ""):
                before = page.locator("#overlay").get_attribute("src")
                item.click()
                page.wait_for_function(shown % before, timeout=60_000)
            assert page.locator("#slices li.shown").count() == 1 and "shown" in item.get_attribute("class")
            answer = next(s for s in server.study["slice_results"] if s["slice"] == k)
            assert item.inner_text().startswith(f"slice {k + 1}: {answer['probability'] * 100:.1f}")
            assert f"Slice {k + 1} shown" in page.locator("#detail-reading").inner_text()
            assert_same_panel(panel_shown(page), explained(server, zipped, series=series, slice=k))
        plain = page.locator("#queue tbody tr[data-filename]:not([data-series])").first
        before = page.locator("#overlay").get_attribute("src")
        plain.click()
        page.wait_for_function(shown % before, timeout=60_000)
        name = plain.get_attribute("data-filename")
        assert page.locator("#detail-title").inner_text() == name
        sent = next(path for path in scans if path.name == name)
        assert_same_panel(panel_shown(page), explained(server, [("file", (name, sent.read_bytes()))]))

        page.keyboard.press("n")  # the reader's verdict, from the keyboard, on the selected scan
        page.wait_for_selector("#queue tbody tr[data-verdict='no_tumor']")
        assert page.locator("#queue tbody tr[data-verdict]").get_attribute("data-filename") == name
        assert "Recorded: No tumor" in page.locator("#verdict-note").inner_text()
        (kept,) = FeedbackStore(server.feedback).verdicts()
        assert (kept["key_id"], kept["verdict"]) == ("reader", "no_tumor")
        assert kept["scan_sha256"] == hashlib.sha256(sent.read_bytes()).hexdigest()
        page.keyboard.press("j")  # and on to the next scan
        page.wait_for_function(
            "n => document.querySelector('#queue tbody tr.selected').dataset.filename !== n", arg=name
        )


def panel_shown(page) -> np.ndarray:
    """The pixels of the panel the page shows (the overlay image's own bytes, read back through the DOM)."""
    read = "async () => Array.from(new Uint8Array(await (await fetch(document.querySelector('#overlay').src))"
    read += ".arrayBuffer()))"
    return np.asarray(Image.open(io.BytesIO(bytes(page.evaluate(read)))).convert("RGB"))


def explained(server, files: list, **form) -> np.ndarray:
    """The panel /v1/explain answers for `files` (and the series' slice in `form`)."""
    answer = requests.post(
        f"{server.url}/v1/explain", files=files, data=form, headers={"X-API-Key": server.key}, timeout=120
    )
    assert answer.status_code == 200, answer.text
    return np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"))


def assert_same_panel(shown: np.ndarray, expected: np.ndarray) -> None:
    assert shown.shape == expected.shape
    assert np.abs(shown.astype(int) - expected.astype(int)).mean() < 1  # the same scan and map, not another's


def test_a_bounded_load_gets_no_server_error(server, scans):
    """300 uploads from 8 concurrent clients on loopback, one in ten a broken file."""
    good, broken = scans[0].read_bytes(), scans[3].read_bytes()

    def one(k: int) -> int:
        body = broken if k % 10 == 0 else good
        return requests.post(
            f"{server.url}/v1/predict",
            files=[("files", (f"{k}.png", body))],
            headers={"X-API-Key": server.key},
            timeout=120,
        ).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(300)))
    assert codes.count(200) == 300, {code: codes.count(code) for code in set(codes)}
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_no_key_no_answer_and_nothing_identifying_is_kept(server, scans):
    name = "DOE_JOHN_1970-01-01.png"
    refused = requests.post(f"{server.url}/v1/predict", files=[("files", (name, scans[0].read_bytes()))], timeout=60)
    assert refused.status_code == 401
    answer = requests.post(
        f"{server.url}/v1/predict",
        files=[("files", (name, scans[0].read_bytes()))],
        headers={"X-API-Key": server.key},
        timeout=60,
    )
    assert answer.status_code == 200 and answer.json()["not_for_diagnosis"] is True
    records = [json.loads(line) for line in server.audit.read_text().splitlines()]
    assert any(r["request_id"] == answer.json()["request_id"] and r["key_id"] == "reader" for r in records)
    store = Path(server.feedback.removeprefix("sqlite:///"))  # answers and verdicts, with its write-ahead log
    database = "".join(part.read_bytes().decode("latin-1") for part in store.parent.glob(store.name + "*"))
    for kept in (server.audit.read_text(), server.log.read_text(), database):
        for secret in ("DOE_JOHN", "scan-0", "noise.png", server.key, '"POST /v1/predict'):  # nor access lines
            assert secret not in kept
