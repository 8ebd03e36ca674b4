"""The REST API of `braintumor serve`, against the real app on tiny trained models (FastAPI's TestClient)."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from braintumor import cli
from braintumor.data.images import prepare
from braintumor.errors import AccessError
from braintumor.registry.register import CHAMPION
from braintumor.serve.access import (
    ApiKey,
    AuditLog,
    RateLimit,
    add_key,
    check_exposure,
    digest,
    find_key,
    read_keys,
    revoke_key,
)
from braintumor.serve.predict import load, predict
from braintumor.serve.service import Access, Limits, create_app

from conftest import EPS, bomb_png, brain_image, png_bytes, save
from fixtures.servers import register_states
from fixtures.split import synthetic_scan


@pytest.fixture(scope="module", params=["onnx", "keras"])
def local_client(trained_states, request):
    """The app over a shipped models/ folder (model.keras with model.json and its ONNX export), on each runtime."""
    workspace = trained_states["seed_cnn"][0]
    with TestClient(
        create_app(
            str(workspace / "models/model.keras"),
            Limits(max_body_bytes=2 << 20, max_file_bytes=1 << 20),
            runtime=request.param,
        )
    ) as client:
        assert client.get("/v1/model").json()["model"]["runtime"] == request.param
        yield client, workspace


def test_several_files_keep_their_order_and_match_the_command_line(local_client, tmp_path):
    client, workspace = local_client
    files = [
        save(tmp_path / "a.png", brain_image(1, 120)),
        save(tmp_path / "b.jpg", brain_image(2, 90), "RGB"),
        save(tmp_path / "c.png", brain_image(3, 64), "I;16"),
    ]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    upload = [files[0], broken, files[1], files[2]]
    answer = client.post("/v1/predict", files=[("files", (p.name, p.read_bytes())) for p in upload])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [r["filename"] for r in body["results"]] == ["a.png", "broken.jpg", "b.jpg", "c.png"]
    assert body["results"][1]["error"].startswith(("truncated_or_corrupt", "not_an_image"))
    runtime = client.get("/v1/model").json()["model"]["runtime"]
    loaded = load(str(workspace / "models/model.keras"), runtime)
    expected, _ = predict(loaded, files)  # what `braintumor predict` says for the same files, on the same runtime
    got = [r for r in body["results"] if "error" not in r]
    assert [r["label"] for r in got] == [e["label"] for e in expected]
    assert [r["status"] for r in got] == [e["status"] for e in expected]
    assert [r.get("probability", -1) for r in got] == pytest.approx(
        [e.get("probability", -1) for e in expected], abs=1e-5
    )
    assert body["model"]["threshold"] == loaded.threshold and body["model"]["image_size"] == 48


def test_bad_requests_get_a_json_4xx(local_client):
    client, _ = local_client
    no_files = client.post("/v1/predict", data={"other": "x"})
    assert no_files.status_code == 400 and "files" in no_files.json()["detail"]
    too_big = client.post("/v1/predict", files=[("files", ("big.png", b"\0" * (3 << 20)))])
    assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]
    assert client.get("/healthz").json() == {"status": "ok"}  # the process is still up


def test_a_bomb_and_foreign_formats_are_refused_per_file(local_client):
    client, _ = local_client
    answer = client.post(
        "/v1/predict",
        files=[
            ("files", ("bomb.png", bomb_png(10_000))),
            ("files", ("poster.jpg", EPS)),
            ("files", ("fine.png", png_bytes(synthetic_scan(1, True, 120)[..., 0]))),
        ],
    )
    assert answer.status_code == 200
    results = {r["filename"]: r for r in answer.json()["results"]}
    assert results["bomb.png"]["error"].startswith("too_large")
    assert results["poster.jpg"]["error"].startswith("unsupported_format")
    assert [r["filename"] for r in answer.json()["results"]] == ["bomb.png", "poster.jpg", "fine.png"]
    # a plain tumor like those the test model learnt from: read, and called a tumor, beside the refused files
    assert results["fine.png"]["status"] == "read" and results["fine.png"]["label"] == 1


def test_a_file_over_the_per_file_limit_is_refused_by_name_and_the_others_answered(local_client):
    client, _ = local_client
    large = b"\0" * (3 << 19)  # 1.5 MiB: inside the request's 2 MiB, over a file's 1 MiB
    scans = [("files", ("large.png", large)), ("files", ("fine.png", png_bytes(brain_image(5))))]
    results = client.post("/v1/predict", files=scans).json()["results"]
    assert [r["filename"] for r in results] == ["large.png", "fine.png"]
    assert results[0]["error"].startswith("too_large") and str(1 << 20) in results[0]["error"]  # names the limit
    assert "error" not in results[1]
    explain = client.post("/v1/explain", files={"file": ("large.png", large)})
    assert explain.status_code == 422 and "large.png" in explain.json()["detail"]
    assert "too_large" in explain.json()["detail"]


def test_explain_answers_the_scan_beside_its_overlay(local_client):
    client, _ = local_client
    answer = client.post("/v1/explain", files={"file": ("a.png", png_bytes(brain_image(4)))})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    panel = Image.open(io.BytesIO(answer.content))
    side = panel.height  # the scan and its overlay side by side, each a square
    assert panel.width >= 2 * side
    left = np.asarray(panel.convert("RGB").crop((0, 0, side, side))).astype(int)
    right = np.asarray(panel.convert("RGB").crop((panel.width - side, 0, panel.width, side))).astype(int)
    assert (left[..., 0] == left[..., 2]).all() and (right[..., 0] != right[..., 2]).any()  # gray scan, colour map
    seen = prepare(brain_image(4), side)[..., 0].astype(float)  # the scan that was sent, as the model reads it
    assert np.corrcoef(left[..., 0].ravel(), seen.ravel())[0, 1] > 0.9
    bad = client.post("/v1/explain", files={"file": ("x.png", b"nope")})
    assert bad.status_code == 422 and "x.png" in bad.json()["detail"]


def test_explain_draws_the_slice_of_the_series_it_is_asked_for(local_client):
    """Loose DICOM of two series: `series` picks one (by the name the predict answer gave it) and `slice` one of
    its slices, drawn as it was scored; a missing choice, an unknown series or slice gets a 422 that says so,
    without the files' names."""
    from pydicom.uid import generate_uid

    from fixtures.dicom import dicom_bytes, mr_dataset

    client, _ = local_client
    uploads = []
    for series in (generate_uid(), generate_uid()):
        for k in range(3):
            position = {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "ImagePositionPatient": [0.0, 0.0, float(k)]}
            ds = mr_dataset(brain_image(len(uploads)).astype("uint16"), SeriesInstanceUID=series, **position)
            uploads.append(("files", (f"IM{len(uploads)}", dicom_bytes(ds))))
    answered = client.post("/v1/predict", files=uploads).json()["results"]
    names = [result["series"] for result in answered]
    assert len(names) == 2
    panels = []
    for name in names:
        for k in (0, 2):
            answer = client.post("/v1/explain", files=uploads, data={"series": name, "slice": str(k)})
            assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
            panels.append(answer.content)
    assert len(set(panels)) == 4  # four different slices, four different panels
    unnamed = client.post("/v1/explain", files=uploads)
    assert unnamed.status_code == 422 and "no_single_scan" in unnamed.json()["detail"]
    assert "IM0" not in unnamed.json()["detail"]  # loose DICOM names may carry a patient's: not echoed
    unknown = client.post("/v1/explain", files=uploads, data={"series": "series-0000", "slice": "0"})
    assert unknown.status_code == 422 and "series-0000" in unknown.json()["detail"]
    with_broken = uploads + [("files", ("broken.jpg", b"\xff\xd8\xff\xe0 cut short"))]
    unknown = client.post("/v1/explain", files=with_broken, data={"series": "series-0000", "slice": "0"})
    assert unknown.status_code == 422 and "no series 'series-0000'" in unknown.json()["detail"]
    past = client.post("/v1/explain", files=uploads, data={"series": names[0], "slice": "3"})
    assert past.status_code == 422 and "slice 3 of 3" in past.json()["detail"]


def test_the_page_and_its_assets_are_served_from_the_app(local_client):
    client, _ = local_client
    page = client.get("/")
    assert page.status_code == 200 and '<script src="app.js">' in page.text
    assert "not a diagnostic device" in page.text
    for asset in ("app.js", "app.css"):
        assert client.get(f"/{asset}").status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from a CDN
    assert client.get("/docs").status_code == 200 and "/v1/predict" in client.get("/openapi.json").text


@pytest.fixture
def two_versions(mlflow_server, trained_states, tmp_path, monkeypatch):
    """Both tiny states registered as versions 1 and 2 of `serve-model`, the alias on version 1."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # the tracking server is the registry
    client = register_states(trained_states, "serve", "serve-model", mlflow_server, tmp_path)
    client.set_registered_model_alias("serve-model", CHAMPION, "1")
    return client


def test_a_moved_alias_is_served_from_the_next_answer_on(two_versions, tmp_path):
    scan = save(tmp_path / "a.png", brain_image(9))
    with TestClient(create_app("models:/serve-model@champion", poll_seconds=0)) as client:
        first = client.post("/v1/predict", files=[("files", ("a.png", scan.read_bytes()))]).json()
        assert first["model"] == {**first["model"], "name": "serve-model", "version": "1", "alias": "champion"}
        info = client.get("/v1/model").json()
        assert info["model_card"] and set(info["test_metrics"]) >= {"recall", "specificity"}
        two_versions.set_registered_model_alias("serve-model", CHAMPION, "2")
        assert client.post("/v1/reload").json()["reloaded"] is True
        second = client.post("/v1/predict", files=[("files", ("a.png", scan.read_bytes()))]).json()
        assert second["model"]["version"] == "2"
        assert client.post("/v1/reload").json()["reloaded"] is False  # nothing moved since


def test_the_poll_notices_a_moved_alias_by_itself(two_versions):
    import time

    with TestClient(create_app("models:/serve-model@champion", poll_seconds=0.5)) as client:
        assert client.get("/readyz").json()["model"]["version"] == "1"
        two_versions.set_registered_model_alias("serve-model", CHAMPION, "2")
        deadline = time.monotonic() + 60
        while client.get("/readyz").json()["model"]["version"] != "2":
            assert time.monotonic() < deadline, "the alias move was not noticed within a minute"
            time.sleep(0.5)


def test_a_bad_reference_stops_at_start_up(tmp_path):
    from braintumor.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        create_app(str(Path(tmp_path) / "missing.keras"))


@pytest.fixture(scope="module")
def keyed(trained_states, tmp_path_factory):
    """The app with two keys (a reader: predict and explain; an operator: reload), a rate limit these tests do
    not reach, and an audit log."""
    root = tmp_path_factory.mktemp("keyed")
    reader = add_key(root / "keys.json", "reader", ["predict", "explain"])
    operator = add_key(root / "keys.json", "operator", ["reload"])
    access = Access(read_keys(root / "keys.json"), RateLimit(6000, 100), AuditLog(root / "audit.jsonl"))
    workspace = trained_states["seed_cnn"][0]
    with TestClient(create_app(str(workspace / "models/model.keras"), access=access)) as client:
        yield client, {"reader": reader, "operator": operator}, root / "audit.jsonl"


def test_keys_are_asked_for_checked_and_scoped(keyed):
    client, keys, _ = keyed
    scan = ("files", ("a.png", png_bytes(brain_image(1))))
    missing = client.post("/v1/predict", files=[scan])
    assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
    wrong = client.post("/v1/predict", files=[scan], headers={"X-API-Key": keys["reader"] + "x"})
    assert wrong.status_code == 401
    assert client.post("/v1/reload", headers={"X-API-Key": keys["reader"]}).status_code == 403
    assert client.post("/v1/predict", files=[scan], headers={"X-API-Key": keys["operator"]}).status_code == 403
    assert client.post("/v1/reload", headers={"X-API-Key": keys["operator"]}).status_code == 200
    assert client.get("/healthz").status_code == 200  # open, for the orchestrator
    answer = client.post("/v1/predict", files=[scan], headers={"X-API-Key": keys["reader"]})
    assert answer.status_code == 200
    body = answer.json()
    assert body["not_for_diagnosis"] is True and len(body["request_id"]) == 32
    assert {"name", "version", "run_id", "model_sha256", "threshold", "calibration", "gate"} <= set(body["model"])


def test_a_key_past_its_rate_waits_and_the_others_do_not(keyed, trained_states, tmp_path):
    client, keys, _ = keyed
    workspace = trained_states["seed_cnn"][0]
    other = add_key(tmp_path / "keys.json", "other", ["predict"])
    access = Access(read_keys(tmp_path / "keys.json") + keyed_keys(keys), RateLimit(60, 3))
    with TestClient(create_app(str(workspace / "models/model.keras"), access=access)) as limited:
        scans = [("files", (f"{k}.png", png_bytes(brain_image(k)))) for k in range(3)]
        assert limited.post("/v1/predict", files=scans, headers={"X-API-Key": keys["reader"]}).status_code == 200
        refused = limited.post("/v1/predict", files=scans[:1], headers={"X-API-Key": keys["reader"]})
        assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 2
        assert limited.post("/v1/predict", files=scans[:1], headers={"X-API-Key": other}).status_code == 200


def keyed_keys(keys: dict) -> list:
    return [ApiKey(name, digest(token), ("predict", "explain")) for name, token in keys.items()]


def test_the_audit_log_keeps_numbers_and_digests_never_names(keyed):
    client, keys, audit = keyed
    name, data = "DOE_JOHN_1970-01-01.png", png_bytes(brain_image(7))
    answer = client.post(
        "/v1/predict",
        files=[("files", (name, data)), ("files", ("SMITH_ANN.jpg", b"\xff\xd8 cut short"))],
        headers={"X-API-Key": keys["reader"]},
    )
    assert answer.status_code == 200
    text = audit.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    record = next(line for line in lines if line["request_id"] == answer.json()["request_id"])
    assert record["key_id"] == "reader" and record["endpoint"] == "predict"
    assert record["scans"][0]["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert record["scans"][0]["status"] == answer.json()["results"][0]["status"]
    assert record["scans"][1]["status"] == "error" and ":" not in record["scans"][1]["error"]
    for secret in ("DOE", "SMITH", keys["reader"], keys["operator"], "testclient", "127.0.0.1"):
        assert secret not in text


def test_a_keys_file_is_checked_and_keys_are_stored_as_digests(tmp_path):
    token = add_key(tmp_path / "keys.json", "a", ["predict"])
    stored = (tmp_path / "keys.json").read_text()
    assert token not in stored and digest(token) in stored
    assert find_key(read_keys(tmp_path / "keys.json"), token).id == "a"
    assert find_key(read_keys(tmp_path / "keys.json"), None) is None
    with pytest.raises(AccessError, match="exists"):
        add_key(tmp_path / "keys.json", "a", ["predict"])
    (tmp_path / "bad.json").write_text(json.dumps({"keys": [{"id": "x", "sha256": "abc", "scopes": ["predict"]}]}))
    with pytest.raises(AccessError, match="no SHA-256"):
        read_keys(tmp_path / "bad.json")
    revoke_key(tmp_path / "keys.json", "a")
    assert read_keys(tmp_path / "keys.json") == []


def test_serve_will_not_listen_beyond_loopback_without_keys(capsys):
    assert cli.main(["serve", "--model", "models/model.keras", "--host", "0.0.0.0"]) == 2
    assert "--keys" in capsys.readouterr().err
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    check_exposure("0.0.0.0", [])  # a keys file, even an empty one, means every call needs a key


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_requests_share_model_calls_and_get_their_own_rows(workers):
    """The micro-batcher: 8 requests in flight at once take fewer model calls than requests, each gets back
    exactly its own rows, and a failing call fails the requests of its batch only; with one worker a core."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from braintumor.serve.runner import MicroBatcher

    calls, gate = [], threading.Barrier(8)

    def run(images):
        calls.append(len(images))
        if (images < 0).any():
            raise ValueError("a bad image in this batch")
        return [images * 2, images.sum(axis=1)]

    batcher = MicroBatcher(run, max_images=64, max_wait_s=0.2, workers=workers)

    def request(k: int):
        with batcher.request():
            gate.wait()
            return batcher(np.full((k + 1, 3), k, dtype=np.int64))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(request, range(8)))
    assert len(calls) < 8 and sum(calls) == sum(range(1, 9))
    for k, (doubled, summed) in enumerate(answers):
        assert doubled.shape == (k + 1, 3) and (doubled == 2 * k).all() and (summed == 3 * k).all()
    with pytest.raises(ValueError, match="bad image"):
        batcher(np.full((1, 3), -1))
    started = time.perf_counter()
    assert (batcher(np.ones((2, 3), dtype=np.int64))[0] == 2).all()  # the loop lives on
    assert time.perf_counter() - started < 0.15  # alone, a request does not wait out the 0.2 s window


def test_the_workers_of_a_micro_batcher_run_their_batches_side_by_side():
    """Two workers: two model calls at once (never more), so two cores each run one single-threaded call; a
    request larger than a batch is shared between them and gets its rows back in order."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from braintumor.serve.runner import MicroBatcher

    running, most, counting = [0], [0], threading.Lock()

    def run(images):
        with counting:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with counting:
            running[0] -= 1
        return [images]

    batcher = MicroBatcher(run, max_images=1, max_wait_s=0.2, workers=2)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda k: batcher(np.full((1, 2), k))[0], range(6)))
    assert [int(a[0, 0]) for a in answers] == list(range(6)) and most[0] == 2
    most[0] = 0
    large = np.arange(12).reshape(6, 2)
    assert (batcher(large)[0] == large).all() and most[0] == 2
