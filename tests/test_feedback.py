"""Readers' verdicts (`POST /v1/feedback`): tied to an answer that was given, codes only, scoped, appended beside
each other, and durable: a server killed between two verdicts loses neither, two replicas writing one PostgreSQL
database at once lose nothing."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading

import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image

from braintumor.data.images import prepare
from braintumor.serve.access import AuditLog, add_key, read_keys
from braintumor.serve.feedback import FeedbackStore, KeptScans, Verdict
from braintumor.serve.service import Access, create_app

from conftest import png_bytes
from fixtures.servers import BIN, free_port, postgres, tool_env, wait_for
from fixtures.split import synthetic_scan

SCAN = png_bytes(synthetic_scan(1, True, 120)[..., 0])  # a tumor like those the tiny model learnt: read, not refused
NOISE = png_bytes(np.random.default_rng(0).integers(0, 256, (96, 96)).astype(np.uint8))  # refused


@pytest.fixture
def service(trained_states, tmp_path):
    """The app with two readers (predict and feedback), a viewer (predict only) and a SQLite store."""
    keys = {
        name: add_key(tmp_path / "keys.json", name, scopes)
        for name, scopes in (
            ("reader-a", ["predict", "feedback"]),
            ("reader-b", ["predict", "feedback"]),
            ("viewer", ["predict"]),
        )
    }
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    access = Access(read_keys(tmp_path / "keys.json"), audit=AuditLog(tmp_path / "audit.jsonl"))
    model = str(trained_states["seed_cnn"][0] / "models/model.keras")
    kept = KeptScans(tmp_path / "kept")
    with TestClient(create_app(model, access=access, feedback=store, kept_scans=kept)) as client:
        yield client, keys, store


def ask(client, key: str, *files: tuple[str, bytes]) -> dict:
    answer = client.post("/v1/predict", files=[("files", f) for f in files], headers={"X-API-Key": key})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_verdict_names_its_answer_and_keeps_the_model_s_answer_and_the_reader(service):
    client, keys, store = service
    answer = ask(client, keys["reader-a"], ("a.png", SCAN), ("noise.png", NOISE))
    scan, noise = answer["results"]
    assert scan["status"] != "out_of_distribution" and noise["status"] == "out_of_distribution"
    body = {"request_id": answer["request_id"], "scan_sha256": scan["scan_sha256"], "verdict": "no_tumor"}
    given = client.post("/v1/feedback", json=body, headers={"X-API-Key": keys["reader-a"]})
    assert given.status_code == 201, given.text
    assert given.json()["answer"]["probability"] == scan["probability"]
    # a second reader's verdict sits beside the first; a refused scan may be confirmed as not a brain MR
    second = {**body, "verdict": "tumor", "subtype": "glioma"}
    assert client.post("/v1/feedback", json=second, headers={"X-API-Key": keys["reader-b"]}).status_code == 201
    refused = {"request_id": answer["request_id"], "scan_sha256": noise["scan_sha256"], "verdict": "not_brain_mr"}
    assert client.post("/v1/feedback", json=refused, headers={"X-API-Key": keys["reader-a"]}).status_code == 201
    kept = store.verdicts()
    assert [(v["key_id"], v["verdict"], v["subtype"], v["status"]) for v in kept] == [
        ("reader-a", "no_tumor", None, scan["status"]),
        ("reader-b", "tumor", "glioma", scan["status"]),
        ("reader-a", "not_brain_mr", None, "out_of_distribution"),
    ]
    assert {v["model_sha256"] for v in kept} == {answer["model"]["model_sha256"]}
    assert kept[0]["probability"] == scan["probability"] and kept[2]["probability"] is None


def test_bad_verdicts_get_a_clear_answer_and_change_nothing(service):
    client, keys, store = service
    answer = ask(client, keys["reader-a"], ("a.png", SCAN), ("broken.png", b"not an image"))
    scan, broken = answer["results"]
    assert "error" in broken and "scan_sha256" not in broken  # nothing was read: nothing to give a verdict on
    good = {"request_id": answer["request_id"], "scan_sha256": scan["scan_sha256"], "verdict": "tumor"}
    reader, viewer = {"X-API-Key": keys["reader-a"]}, {"X-API-Key": keys["viewer"]}
    refusals = {
        "another request": ({**good, "request_id": "0" * 32}, reader, 404, "no answer of this service"),
        "another scan": ({**good, "scan_sha256": "f" * 64}, reader, 404, "no answer of this service"),
        "no feedback scope": (good, viewer, 403, "may not feedback"),
        "no key": (good, {}, 401, "API key"),
        "free text": ({**good, "note": "Doe, Jane"}, reader, 422, "note"),
        "unknown code": ({**good, "verdict": "maybe"}, reader, 422, "verdict"),
        "subtype of no tumor": ({**good, "verdict": "no_tumor", "subtype": "glioma"}, reader, 422, "subtype"),
        "malformed digest": ({**good, "scan_sha256": "abc"}, reader, 422, "scan_sha256"),
    }
    for name, (body, headers, status, says) in refusals.items():
        refused = client.post("/v1/feedback", json=body, headers=headers)
        assert refused.status_code == status and says in refused.text, (name, refused.text)
    assert client.post("/v1/feedback", content=b"{not json", headers=reader).status_code == 422
    assert store.verdicts() == []


def test_a_series_is_named_by_its_files_in_any_order(service):
    from pydicom.uid import generate_uid

    from fixtures.dicom import dicom_bytes, mr_dataset

    client, keys, _ = service
    series, study = generate_uid(), generate_uid()
    files = []
    for k in range(3):
        ds = mr_dataset(
            synthetic_scan(10 + k, True, 64)[..., 0].astype(np.uint16),
            SeriesInstanceUID=series,
            StudyInstanceUID=study,
            ImagePositionPatient=[0.0, 0.0, 2.0 * k],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            InstanceNumber=k + 1,
        )
        files.append((f"{k}.dcm", dicom_bytes(ds)))
    forward = ask(client, keys["reader-a"], *files)["results"][0]
    backward = ask(client, keys["reader-a"], *files[::-1])["results"][0]
    assert forward["series"] and forward["scan_sha256"] == backward["scan_sha256"]


def test_the_server_keeps_every_verdict_across_a_kill(trained_states, tmp_path):
    """`braintumor serve` (its default store: SQLite beside the audit log) killed with SIGKILL between two
    verdicts, then started again: both verdicts, and the answer the second one names, are there."""
    key = add_key(tmp_path / "keys.json", "reader", ["predict", "feedback"])
    model = str(trained_states["seed_cnn"][0] / "models/model.keras")
    headers = {"X-API-Key": key}

    def start():
        port = free_port()
        args = [str(BIN / "braintumor"), "serve", "--model", model, "--port", str(port), "--keys", "keys.json"]
        log = open(tmp_path / "serve.log", "a")  # noqa: SIM115 - the server's, closed when it ends
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=tool_env(), cwd=tmp_path, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/readyz", process, tmp_path / "serve.log")
        return process, url

    process, url = start()
    answer = requests.post(f"{url}/v1/predict", files=[("files", ("a.png", SCAN))], headers=headers, timeout=60).json()
    body = {"request_id": answer["request_id"], "scan_sha256": answer["results"][0]["scan_sha256"]}
    first = requests.post(f"{url}/v1/feedback", json={**body, "verdict": "tumor"}, headers=headers, timeout=60)
    assert first.status_code == 201, first.text
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    process, url = start()
    try:
        second = requests.post(f"{url}/v1/feedback", json={**body, "verdict": "cant_tell"}, headers=headers, timeout=60)
        assert second.status_code == 201, second.text
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    kept = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}").verdicts()
    assert [v["verdict"] for v in kept] == ["tumor", "cant_tell"]


@pytest.mark.slow  # a PostgreSQL server
def test_two_replicas_writing_one_postgresql_lose_nothing(tmp_path):
    """Two stores (two replicas' engines) on one PostgreSQL database, each recording answers and verdicts from
    four threads at once: every row arrives."""
    with postgres() as url:
        replicas = [FeedbackStore(url) for _ in range(2)]

        def work(replica: FeedbackStore, worker: int) -> None:
            for k in range(25):
                request_id = f"{worker:02d}{k:030d}"
                scan = f"{worker:02d}{k:062d}"
                model = {"name": "m", "version": "1", "model_sha256": "0" * 64}
                replica.record_answers(request_id, "site", model, [{"scan_sha256": scan, "status": "read"}])
                replica.add(Verdict(request_id=request_id, scan_sha256=scan, verdict="tumor"), f"reader{worker}")

        threads = [threading.Thread(target=work, args=(replicas[w % 2], w)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        kept = replicas[0].verdicts()
        for replica in replicas:
            replica.close()
    assert len(kept) == 8 * 25 and len({(v["request_id"], v["key_id"]) for v in kept}) == 200


def test_the_pixels_of_a_scan_read_as_tumor_or_not_are_kept_and_nothing_else(service, tmp_path):
    client, keys, store = service
    reader = {"X-API-Key": keys["reader-a"]}
    assert client.get("/v1/model", headers=reader).json()["keeps_scans"] is True  # the page says so
    answer = ask(client, keys["reader-a"], ("Doe_Jane.png", SCAN))
    (scan,) = answer["results"]
    body = {"request_id": answer["request_id"], "scan_sha256": scan["scan_sha256"]}
    unsure = client.post("/v1/feedback", json={**body, "verdict": "cant_tell"}, headers=reader).json()
    assert unsure["scan_kept"] is False and not (tmp_path / "kept").exists()  # can't tell: nothing kept
    read = client.post("/v1/feedback", json={**body, "verdict": "tumor"}, headers=reader).json()
    assert read["scan_kept"] is True
    (written,) = (tmp_path / "kept").iterdir()
    assert written.name == f"{scan['scan_sha256']}.png" and store.verdicts()[-1]["kept"] == written.name
    image = Image.open(written)
    assert image.mode == "L" and not image.text  # pixels only: no text chunk
    seen = prepare(np.asarray(Image.open(io.BytesIO(SCAN))), 48)[..., 0]
    assert np.array_equal(np.asarray(image), seen)  # the model's input, as it was scored


def test_scans_past_the_memory_budget_are_not_kept_and_the_verdict_says_so(tmp_path):
    kept = KeptScans(tmp_path / "kept", budget_mb=0.01)  # 10 KiB: one 96 px slice and a bit
    first, second = np.zeros((1, 96, 96), np.uint8), np.ones((1, 96, 96), np.uint8)
    kept.hold("r1", "a" * 64, first)
    kept.hold("r2", "b" * 64, second)
    assert kept.keep("r1", "a" * 64) is None  # dropped, oldest first
    assert kept.keep("r2", "b" * 64) == "b" * 64 + ".png"
    kept.hold("r3", "c" * 64, np.stack([first[0], second[0]])[:, :40, :40])  # a series: one file a slice
    assert kept.keep("r3", "c" * 64) == "c" * 64
    assert sorted(p.name for p in (tmp_path / "kept" / ("c" * 64)).iterdir()) == ["slice-000.png", "slice-001.png"]
