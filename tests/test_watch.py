"""`braintumor watch`: per site and period, drift against the model's reference at a known false-alarm rate,
performance estimated from calibrated probabilities (and measured where verdicts exist), a refusal-rate alert,
and a log read while it is being written."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from braintumor import cli
from braintumor.model.calibration import logit
from braintumor.serve.access import AuditLog, read_keys
from braintumor.serve.service import Access, create_app
from braintumor.serve.watch import PLATT_C, Reference, platt_fits, watch

from conftest import png_bytes
from fixtures.split import synthetic_scan

START = datetime.datetime(2026, 11, 30, 9, tzinfo=datetime.UTC)  # a Monday


def reference(rng: np.random.Generator) -> Reference:
    """A model's reference: mostly confident answers, gate distances well inside 1, 2 % refused."""
    p = np.clip(np.concatenate([rng.beta(8, 1.5, 700), rng.beta(1.2, 8, 300)]), 0, 1)
    return Reference(p, rng.gamma(4, 0.08, 1000), 0.02, 0.5)


def records(site: str, p: np.ndarray, gate: np.ndarray, refused: int = 0, week: int = 0) -> list[dict]:
    scans = [
        {
            "input_sha256": f"{site}{week:03d}{k:057d}",
            "status": "read",
            "probability": float(v),
            "gate_distance": float(g),
        }
        for k, (v, g) in enumerate(zip(p, gate, strict=True))
    ]
    scans += [
        {"input_sha256": f"{site}{week:03d}r{k:056d}", "status": "out_of_distribution", "gate_distance": 3.0}
        for k in range(refused)
    ]
    time = (START + datetime.timedelta(weeks=week)).isoformat()
    return [
        {"request_id": f"{k:032x}", "time": time, "key_id": site, "endpoint": "predict", "scans": [scan]}
        for k, scan in enumerate(scans)
    ]


def write(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_reference_like_site_rarely_alerts_a_shifted_one_always_and_refusals_alert(tmp_path):
    rng = np.random.default_rng(0)
    ref = reference(rng)
    flagged = {"A": 0, "B": 0}
    for draw in range(20):  # 20 weeks of 200 scans from each site
        pick = rng.integers(0, 1000, 200)
        rows = records("A", ref.probability[pick], ref.gate_distance[pick], refused=4, week=draw)
        shifted = np.clip(rng.beta(2, 2, 200), 0, 1)  # an unseen collection: less confident answers
        rows += records("B", shifted, rng.gamma(4, 0.12, 200), refused=4, week=draw)
        write(tmp_path / "audit.jsonl", rows)
        report = watch(tmp_path / "audit.jsonl", ref, seed=draw)
        for entry in report["sites"]:
            flagged[entry["site"]] += bool(entry["alerts"])
            drifted = any(alert.endswith("_drift") for alert in entry["alerts"])
            assert ("caution" in entry["estimated"]) == drifted  # no confidence-based estimate taken on trust
    assert flagged["B"] == 20 and flagged["A"] <= 1  # 2 statistics at 1 % and the refusal check: ~3 % expected

    write(tmp_path / "audit.jsonl", records("C", ref.probability[:100], ref.gate_distance[:100], refused=40))
    (site,) = watch(tmp_path / "audit.jsonl", ref)["sites"]
    assert "refusals" in site["alerts"] and site["refusal_rate"] == pytest.approx(40 / 140, abs=1e-4)


def test_estimated_specificity_matches_the_measured_one_on_a_shifted_site(tmp_path):
    rng = np.random.default_rng(1)
    p = np.clip(rng.beta(2, 2, 400), 0, 1)  # calibrated: each scan a tumor with its own P
    tumor = rng.random(400) < p
    rows = records("B", p, rng.gamma(4, 0.1, 400))
    write(tmp_path / "audit.jsonl", rows)
    verdicts = {
        row["scans"][0]["input_sha256"]: "tumor" if t else "no_tumor" for row, t in zip(rows, tumor, strict=True)
    }
    (site,) = watch(tmp_path / "audit.jsonl", reference(rng), verdicts=verdicts)["sites"]
    low, high = site["estimated"]["specificity_ci95"]
    assert low <= site["measured"]["specificity"] <= high
    assert abs(site["estimated"]["specificity"] - site["measured"]["specificity"]) <= 0.10
    assert site["measured"]["verdicts"] == 400


def test_a_site_s_own_verdicts_recalibrate_an_estimate_its_drift_made_optimistic(tmp_path):
    """An unseen collection: the model is confidently wrong there (a scan it calls 0.95 is a tumor 3 times in
    4). CBPE, trusting the model's calibration, overstates specificity; recalibrated on the site's verdicts of
    earlier weeks, the estimate for a week without verdicts lands on what that week measures, inside its
    interval. A period's own verdicts never enter its own estimate."""
    rng = np.random.default_rng(3)
    ref = reference(rng)
    p = np.clip(rng.beta(0.6, 0.6, 1200), 1e-4, 1 - 1e-4)  # confident answers
    tumor = rng.random(1200) < 1 / (1 + np.exp(-0.4 * np.log(p / (1 - p))))  # what they are: far less sure
    rows = []  # 400 scans a week; readers judged those of the first two weeks only
    for week in range(3):
        rows += records("B", p[400 * week : 400 * (week + 1)], ref.gate_distance[:400], week=week)
    write(tmp_path / "audit.jsonl", rows)
    digests = [r["scans"][0]["input_sha256"] for r in rows]
    verdicts = {d: "tumor" if t else "no_tumor" for d, t in zip(digests[:800], tumor[:800], strict=True)}

    plain = watch(tmp_path / "audit.jsonl", ref)["sites"][2]["estimated"]
    judged = watch(tmp_path / "audit.jsonl", ref, verdicts=verdicts)["sites"]
    last = judged[2]["estimated"]
    healthy, called = ~tumor[800:], p[800:] >= ref.threshold
    measured = (healthy & ~called).sum() / healthy.sum()
    assert plain["specificity"] - measured > 0.10 and "recalibrated_on" not in plain
    assert abs(last["specificity"] - measured) <= 0.05
    assert last["specificity_ci95"][0] <= measured <= last["specificity_ci95"][1]
    assert last["recalibrated_on"]["verdicts"] == 800
    assert judged[0]["estimated"]["recalibrated_on"]["verdicts"] == 400  # weeks 0 and 1: each the other's

    only_own = dict(list(verdicts.items())[:400])  # week 0's
    first = watch(tmp_path / "audit.jsonl", ref, verdicts=only_own)["sites"][0]
    assert "recalibrated_on" not in first["estimated"] and first["measured"]["verdicts"] == 400


def test_the_batched_platt_fit_is_scikit_learn_s_fit():
    """The watch refits a site's calibration hundreds of times a period, all rows at once; each row's fit must be
    the one LogisticRegression(C=PLATT_C) finds, on easy, skewed, small and perfectly separable verdicts."""
    from scipy.special import expit
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(4)
    cases = []
    for _ in range(60):
        n = int(rng.integers(30, 300))
        z = logit(np.clip(rng.beta(*rng.uniform(0.3, 3, 2), n), 1e-5, 1 - 1e-5))
        tumor = rng.random(n) < expit(rng.uniform(-0.5, 4) * z + rng.uniform(-3, 3))
        cases.append((z, tumor))
    z = np.linspace(-4, 4, 40)
    cases.append((z, z > 0))  # separable: only the penalty keeps the slope finite
    for z, tumor in cases:
        ((slope, intercept),) = platt_fits(z[None], tumor[None])
        theirs = LogisticRegression(C=PLATT_C, tol=1e-10, max_iter=10_000).fit(z[:, None], tumor)
        assert np.abs(expit(slope * z + intercept) - theirs.predict_proba(z[:, None])[:, 1]).max() < 1e-5


def test_a_torn_last_line_is_skipped_and_rotated_logs_are_read_whole(tmp_path):
    rng = np.random.default_rng(2)
    ref = reference(rng)
    write(tmp_path / "audit.jsonl.1", records("A", ref.probability[:30], ref.gate_distance[:30], week=0))
    write(tmp_path / "audit.jsonl", records("A", ref.probability[30:60], ref.gate_distance[30:60], week=1))
    with open(tmp_path / "audit.jsonl", "a") as log:
        log.write('{"request_id": "abc", "time": "2026-')  # the writer was here
    report = watch(tmp_path / "audit.jsonl", ref)
    assert report["unreadable_lines"] == 1 and report["records"] == 60
    assert [(s["period"], s["scans"]) for s in report["sites"]] == [("2026-W49", 30), ("2026-W50", 30)]


def test_the_command_watches_what_the_service_logged(trained_states, tmp_path):
    """The real service writes the audit log; `braintumor watch` reads it against the model's test split."""
    workspace = trained_states["seed_cnn"][0]
    model = str(workspace / "models/model.keras")
    with TestClient(create_app(model, access=Access(audit=AuditLog(tmp_path / "audit.jsonl")))) as client:
        for k in range(30):
            image = png_bytes(synthetic_scan(100 + k, k % 2 == 0, 64)[..., 0])
            answer = client.post("/v1/predict", files=[("files", (f"Doe_{k}.png", image))])
            assert answer.status_code == 200
        health = client.get("/v1/site-health").json()  # what the page's strip shows
        assert (health["site"], health["scans"]) == ("anonymous", 30)
    info = json.loads((workspace / "models/model.json").read_text())
    assert len(info["reference"]["p_tumor_quantiles"]) == 101  # evaluate ships the reference with the model
    out = tmp_path / "watch"
    code = cli.main(["watch", "--model", model, "--audit-log", str(tmp_path / "audit.jsonl"), "--out", str(out)])
    report = json.loads((tmp_path / "watch/watch.json").read_text())
    assert code == (1 if report["alerts"] else 0)
    (site,) = report["sites"]
    assert site["site"] == "anonymous" and site["scans"] == 30 and report["reference"]["scans_read"] > 0
    assert (tmp_path / "watch/site-anonymous.png").is_file()
    assert "Doe_" not in (tmp_path / "watch/watch.json").read_text()


@pytest.mark.slow
def test_three_sites_through_the_api_alert_as_they_differ_from_the_reference(tmp_path):
    """A model trained as the pipeline trains it (on the scans as the split stage prepares their files) serves
    three keys in one week: site A sends scans like its test split, site B the same kind of scan nine in ten of
    them tumors (its answers move: drift), site C colour photographs and noise (a refusal alert). The watch reads
    the audit log against the reference the model ships: only B drifts, only C alerts on refusals."""
    from braintumor.serve.access import add_key
    from braintumor.serve.predict import load
    from braintumor.serve.watch import reference_of

    from fixtures.servers import trained_state
    from fixtures.split import make_split

    workspace, _ = trained_state(tmp_path / "state", "seed_cnn", make_split(tmp_path / "split", prepared=True))
    model = str(workspace / "models/model.keras")
    keys = tmp_path / "keys.json"
    tokens = {site: add_key(keys, site, ["predict"]) for site in ("site-a", "site-b", "site-c")}
    noise = np.random.default_rng(5)
    scans = {
        "site-a": [synthetic_scan(30_000 + k, k % 2 == 0, 48) for k in range(200)],
        "site-b": [synthetic_scan(40_000 + k, k % 10 != 0, 48) for k in range(200)],
        "site-c": [noise.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(100)],
    }
    scans["site-c"] += [np.stack([s[..., 0], s[..., 0] // 2, 255 - s[..., 0]], axis=2) for s in scans["site-a"][:100]]
    access = Access(keys=read_keys(keys), audit=AuditLog(tmp_path / "audit.jsonl"))
    with TestClient(create_app(model, access=access)) as client:
        for site, images in scans.items():
            for start in range(0, len(images), 50):
                files = [
                    ("files", (f"Doe_{k}.png", png_bytes(i, "RGB"))) for k, i in enumerate(images[start : start + 50])
                ]
                answer = client.post("/v1/predict", files=files, headers={"X-API-Key": tokens[site]})
                assert answer.status_code == 200, answer.text
    sites = {e["site"]: e for e in watch(tmp_path / "audit.jsonl", reference_of(load(model)))["sites"]}
    assert sites["site-a"]["alerts"] == []
    assert "p_tumor_drift" in sites["site-b"]["alerts"] and "refusals" not in sites["site-b"]["alerts"]
    assert "refusals" in sites["site-c"]["alerts"] and sites["site-c"]["refusal_rate"] > 0.9


def test_the_site_health_strip_alerts_on_refusals_once_a_site_has_enough_scans():
    from braintumor.serve.watch import SiteHealth

    health = SiteHealth()
    health.observe([{"status": "read"}] * 10 + [{"status": "out_of_distribution"}] * 5, "site-a")
    assert health.summary("site-a", 0.01)["alerts"] == []  # 15 scans: too few to say
    health.observe([{"status": "read"}] * 10 + [{"status": "uncertain"}] * 5, "site-a")
    summary = health.summary("site-a", 0.01)
    assert (summary["scans"], summary["refusal_rate"], summary["uncertain_rate"]) == (
        30,
        round(5 / 30, 4),
        round(5 / 30, 4),
    )
    assert len(summary["alerts"]) == 1 and "not read" in summary["alerts"][0]
    health.observe([{"status": "read"}] * 30, "site-b")
    assert health.summary("site-b", 0.01)["alerts"] == [] and health.summary("site-c", 0.01)["scans"] == 0


def test_the_site_health_strip_alerts_on_drift_of_p_tumor_from_the_reference():
    from braintumor.serve.watch import SiteHealth

    rng = np.random.default_rng(3)
    ref = reference(rng)
    health = SiteHealth()
    health.observe([{"status": "read", "probability": v} for v in rng.choice(ref.probability, 15)], "like")
    assert "p_tumor_ks" not in health.summary("like", 0.02, ref)  # 15 scans: too few to say
    health.observe([{"status": "read", "probability": v} for v in rng.choice(ref.probability, 185)], "like")
    like = health.summary("like", 0.02, ref)
    assert like["alerts"] == [] and like["p_tumor_ks"] <= like["p_tumor_ks_limit"]
    shifted = np.clip(rng.choice(ref.probability, 200) * 0.6 + 0.3, 0, 1)  # an unseen scanner: unsure answers
    health.observe([{"status": "read", "probability": float(v)} for v in shifted], "shifted")
    alerts = health.summary("shifted", 0.02, ref)["alerts"]
    assert len(alerts) == 1 and alerts[0].startswith("drift: this week's P(tumor)")
    assert health.summary("shifted", 0.02)["alerts"] == []  # a model that ships no reference: no drift figure


def test_the_ks_statistic_is_scipy_s_on_ties_and_all():
    from scipy.stats import ks_2samp

    from braintumor.serve.watch import ks_statistic

    rng = np.random.default_rng(5)
    for _ in range(100):
        reference = np.round(rng.random(rng.integers(5, 300)), int(rng.integers(1, 4)))  # rounded: ties too
        sample = np.round(rng.random(rng.integers(1, 100)), int(rng.integers(1, 4)))
        assert ks_statistic(sample, reference) == pytest.approx(ks_2samp(sample, reference).statistic, abs=1e-12)


def test_the_batched_two_sample_ks_is_scipy_s_row_by_row():
    from scipy.stats import ks_2samp

    from braintumor.serve.watch import two_sample_ks

    rng = np.random.default_rng(6)
    for _ in range(30):
        n, m, digits = int(rng.integers(1, 60)), int(rng.integers(1, 200)), int(rng.integers(1, 4))
        a, b = np.round(rng.random((8, n)), digits), np.round(rng.random((8, m)) ** 1.3, digits)  # ties, shifted
        expected = [ks_2samp(x, y).statistic for x, y in zip(a, b, strict=True)]
        np.testing.assert_allclose(two_sample_ks(a, b), expected, atol=1e-12)


def test_a_small_reference_is_a_sample_too():
    """Sites drawn from the population a 32-scan reference was drawn from: a limit that takes the reference as
    exact fires far above its stated rate; the two-sample limit keeps to it."""
    from braintumor.serve.watch import FALSE_ALARM, ks_statistic, ks_threshold

    rng = np.random.default_rng(7)
    exact, sampled, trials = 0, 0, 300
    for _ in range(trials):
        reference, site = rng.beta(2, 5, 32), rng.beta(2, 5, 200)
        statistic = ks_statistic(site, reference)
        exact += statistic > ks_threshold(reference, 200, rng, draws=200)
        sampled += statistic > ks_threshold(reference, 200, rng, draws=200, reference_size=32)
    assert exact / trials > 5 * FALSE_ALARM and sampled / trials <= 3 * FALSE_ALARM


def test_the_refusal_alert_fires_at_the_stated_false_alarm_rate():
    from braintumor.serve.watch import FALSE_ALARM, too_many_refusals

    rng = np.random.default_rng(4)
    for reference_refused, scans in ((0.0139, 200), (0.05, 60), (0.0, 500)):
        like = rng.binomial(scans, reference_refused, 4000)  # weeks of a site refusing as the reference did
        alarms = np.mean([too_many_refusals(int(k), scans, reference_refused) for k in like])
        assert alarms <= FALSE_ALARM
        worse = rng.binomial(scans, max(reference_refused, 0.01) * 5, 400)  # five times the reference's rate
        assert np.mean([too_many_refusals(int(k), scans, reference_refused) for k in worse]) > 0.5
