"""`GET /metrics`: Prometheus' text format, read back by the client library's own parser; the counts follow the
answers given, the scope is checked, and no label holds a file name, a digest or a series name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from braintumor.serve.access import add_key, read_keys
from braintumor.serve.metrics import answer_kind
from braintumor.serve.service import Access, create_app

from conftest import png_bytes
from fixtures.split import synthetic_scan


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the exposition text."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def served(trained_states, tmp_path):
    keys = {
        "reader": add_key(tmp_path / "keys.json", "reader", ["predict"]),
        "prometheus": add_key(tmp_path / "keys.json", "prometheus", ["metrics"]),
    }
    model = str(trained_states["seed_cnn"][0] / "models/model.keras")
    with TestClient(create_app(model, access=Access(read_keys(tmp_path / "keys.json")))) as client:
        yield client, keys


def test_metrics_count_the_answers_by_kind_and_reason_and_name_nothing(served):
    client, keys = served
    rng = np.random.default_rng(0)
    photo = np.stack([rng.integers(0, 256, (64, 64)), np.zeros((64, 64)), rng.integers(0, 256, (64, 64))], -1)
    files = [
        ("Doe_Jane_scan.png", png_bytes(synthetic_scan(1, True, 120)[..., 0])),  # read
        ("noise.png", png_bytes(rng.integers(0, 256, (96, 96)).astype(np.uint8))),  # the gate refuses it
        ("photo.png", png_bytes(photo.astype(np.uint8), "RGB")),  # colour: refused before scoring
        ("broken.png", b"not an image"),  # unreadable
    ]
    answer = client.post("/v1/predict", files=[("files", f) for f in files], headers={"X-API-Key": keys["reader"]})
    results = answer.json()["results"]
    assert [answer_kind(r) for r in results[1:]] == ["not_read", "not_read", "unreadable"]

    assert client.get("/metrics", headers={"X-API-Key": keys["reader"]}).status_code == 403  # its own scope
    assert client.get("/metrics").status_code == 401
    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {keys['prometheus']}"})  # as Prometheus
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    got = samples(scraped.text)
    version = str(answer.json()["model"]["version"])
    first = answer_kind(results[0])
    assert first in ("tumor_suspected", "no_tumor", "uncertain")

    def count(name: str, **labels) -> float:
        return got.get((name, tuple(sorted({**labels, "key_id": "reader", "model_version": version}.items()))), 0)

    assert count("braintumor_answers_total", answer=first) == 1
    assert count("braintumor_answers_total", answer="not_read") == 2
    assert count("braintumor_answers_total", answer="unreadable") == 1
    assert [r.get("refusal") for r in results[1:3]] == ["gate", "colour"]  # the answers name their codes
    assert count("braintumor_refusals_total", reason="gate") == 1
    assert count("braintumor_refusals_total", reason="colour") == 1
    assert count("braintumor_refusals_total", reason=results[3]["error"].split(":")[0]) == 1
    assert count("braintumor_p_tumor_count") == 1 and count("braintumor_gate_distance_count") == 2
    assert got[("braintumor_requests_total", (("code", "200"), ("endpoint", "/v1/predict")))] == 1
    assert got[("braintumor_request_seconds_count", (("endpoint", "/v1/predict"),))] == 1
    info = [labels for (name, labels), value in got.items() if name == "braintumor_model_info" and value == 1]
    assert len(info) == 1 and dict(info[0])["model_sha256"] == answer.json()["model"]["model_sha256"]
    for secret in ("Doe_Jane", "noise.png", "photo", "broken", keys["reader"], keys["prometheus"]):
        assert secret not in scraped.text
    assert not any(r["scan_sha256"] in scraped.text for r in results if "scan_sha256" in r)


def test_every_refusal_carries_the_code_its_maker_gave_it():
    """Each way the product refuses an input, made for real, names its code beside its sentence: the metrics and
    the audit log count by the code, never by reading the sentence back."""
    from pydicom.data import get_testdata_file
    from skimage.data import shepp_logan_phantom

    from braintumor.data.scans import read_scans
    from braintumor.model.series_verdict import series_answer
    from braintumor.serve.predict import refused

    rng = np.random.default_rng(0)
    photo = np.stack([rng.integers(0, 256, (64, 64)), np.zeros((64, 64)), rng.integers(0, 256, (64, 64))], -1)
    phantom = (shepp_logan_phantom() / shepp_logan_phantom().max() * 255).astype(np.uint8)
    ct = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    entries = [
        ("photo.png", "photo.png", png_bytes(photo.astype(np.uint8), "RGB")),
        ("h.png", "h.png", png_bytes(phantom)),
    ]
    series, errors = read_scans(entries + [("ct.dcm", "ct.dcm", ct)], max_pixels=None)
    assert errors == [] and [s.refusal.code for s in series] == ["colour", "head_ct", "not_mr_modality"]
    assert [refused(s.refusal)["refusal"] for s in series] == ["colour", "head_ct", "not_mr_modality"]
    assert all(refused(s.refusal)["reason"] == s.refusal.text for s in series)
    none_read = series_answer([{"status": "out_of_distribution", "label": None, "refusal": "gate"}] * 2)
    assert none_read["refusal"] == "no_slice_read"


def test_no_metrics_when_switched_off(trained_states):
    model = str(trained_states["seed_cnn"][0] / "models/model.keras")
    with TestClient(create_app(model, with_metrics=False)) as client:
        assert client.get("/metrics").status_code == 404
