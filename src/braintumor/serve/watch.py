"""`braintumor watch`: how the model is doing where it is used, per site (key id) and period, from the audit log.

For each site and day or week: the volume; the refusal and uncertain rates; whether the calibrated P(tumor) and
the gate distances of the scans read still look like the model's reference (its answers on its own test split),
as a Kolmogorov-Smirnov statistic with a threshold placed by resampling the reference (a site that looks like
the reference alerts at the stated false-alarm rate); recall, specificity and the positive rate estimated from
the calibrated probabilities alone (confidence-based performance estimation, the form NannyML calls CBPE), with
intervals; and the measured ones where readers' verdicts exist. A refusal count that a site refusing like the
reference reaches with probability below the same false-alarm rate is an alert too.

CBPE trusts the model's calibration, which is what an unseen collection breaks: there the model is confidently
wrong on healthy scans and the estimate is optimistic exactly where drift fires. So once a site's readers have
given enough verdicts, the estimate for a period is taken from probabilities recalibrated on that site's own
verdicts on scans *outside* the period (Platt scaling of the logit, two parameters: few verdicts suffice), its
interval from refitting on resampled verdicts; without them it stays CBPE, with a caution where drift fired.

The log is read as it is being written: a torn last line (or any line that is not JSON) is skipped and counted,
never fatal; rotated logs (`audit.jsonl.1`, ...) are read whole beside the current one. Nothing identifying is
read or written: key ids, counts and numbers only.
"""

from __future__ import annotations

import datetime
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from braintumor.model.calibration import logit

READ = ("read", "uncertain")
FALSE_ALARM = 0.01  # the share of reference-like samples of a site's size that alert, per statistic
MIN_SCANS = 20  # fewer scans read in a period: no drift statistic (too few to say)
MIN_VERDICTS = 30  # verdicts of a site needed to recalibrate its estimate on them (and MIN_CLASS of each class)
MIN_CLASS = 5


@dataclass
class Reference:
    """The model's answers on scans like those it was validated on: calibrated P(tumor) and gate distances of
    the scans read, the share refused, and the operating threshold."""

    probability: np.ndarray
    gate_distance: np.ndarray
    refused: float
    threshold: float
    scans: int | None = None  # the scans read to make it, when its arrays are a smoothed stand-in (quantiles)


def audit_lines(path: Path) -> tuple[list[dict], int]:
    """The records of `path` and its rotated copies (`path.N`, the highest N the oldest), and how many lines
    could not be read (a torn last line of a log being written, anything that is not a JSON record)."""
    rotated = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
    files = sorted(rotated, key=lambda p: int(p.suffix[1:]), reverse=True) + [path]
    records, torn = [], 0
    for file in files:
        if not file.is_file():
            continue
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("scans"), list) and "time" in record:
                records.append(record)
            else:
                torn += 1
    return records, torn


def shipped_reference(loaded) -> Reference | None:
    """The reference a loaded model (`serve.predict.load`) ships in model.json: its answers on the test split
    it was evaluated on, as quantiles (`evaluate.answer_reference`); None for a model without one."""
    shipped = loaded.info.get("reference")
    if not (shipped and shipped.get("p_tumor_quantiles")):
        return None
    levels = np.linspace(0, 1, 1000)
    grid = np.linspace(0, 1, len(shipped["p_tumor_quantiles"]))
    gate = shipped.get("gate_distance_quantiles") or []
    return Reference(
        np.interp(levels, grid, shipped["p_tumor_quantiles"]),
        np.interp(levels, np.linspace(0, 1, len(gate)), gate) if gate else np.array([]),
        float(shipped["refused"]),
        float(loaded.threshold),
        round(shipped["images"] * (1 - shipped["refused"])) if shipped.get("images") else None,
    )


def reference_of(loaded, split: Path | None = None) -> Reference:
    """The reference of a loaded model: the one it ships, else its answers on the test split `split`."""
    shipped = shipped_reference(loaded)
    if shipped is not None:
        return shipped
    if split is None:
        raise FileNotFoundError("the model ships no reference (model.json `reference`): give --split")
    from braintumor.data.datasets import load_split
    from braintumor.model.assessment import score

    images = load_split(split, "test", "binary")["x"]
    answers = loaded.assessor.answers(score(loaded.scorer, images, loaded.info["class_names"]))
    read = [a for a in answers if a["status"] in READ]
    return Reference(
        np.array([a["probability"] for a in read]),
        np.array([a["gate_distance"] for a in read if "gate_distance" in a]),
        1 - len(read) / len(answers),
        float(loaded.threshold),
        len(read),
    )


def plot_site(entries: list[dict], reference: Reference, path: Path) -> None:
    """One picture per site: volume and rates per period, and the KS statistics against their limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    periods = [e["period"] for e in entries]
    fig, (rates, drift) = plt.subplots(1, 2, figsize=(11, 3.6))
    rates.bar(periods, [e["scans"] for e in entries], color="#cfd8dc", label="scans")
    twin = rates.twinx()
    twin.plot(periods, [e["refusal_rate"] for e in entries], "o-", color="#c62828", label="refused")
    twin.plot(periods, [e["uncertain_rate"] for e in entries], "s-", color="#ef6c00", label="uncertain")
    twin.axhline(reference.refused, color="#c62828", ls=":", lw=1)
    twin.set_ylim(0, 1)
    rates.set_title(f"site {entries[0]['site']}: volume and rates")
    twin.legend(loc="upper right", fontsize=8)
    for name, colour in (("p_tumor", "#1565c0"), ("gate_distance", "#6a1b9a")):
        shown = [e for e in entries if f"{name}_ks" in e]
        drift.plot([e["period"] for e in shown], [e[f"{name}_ks"] for e in shown], "o-", color=colour, label=name)
        drift.plot([e["period"] for e in shown], [e[f"{name}_ks_limit"] for e in shown], ":", color=colour)
    drift.set_title(f"drift: KS against the reference (dotted: {FALSE_ALARM:.0%} false-alarm limit)")
    drift.legend(fontsize=8)
    for axis in (rates, drift):
        axis.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def period_of(time: str, period: str) -> str:
    moment = datetime.datetime.fromisoformat(time)
    if period == "day":
        return moment.date().isoformat()
    year, week, _ = moment.isocalendar()
    return f"{year}-W{week:02d}"


def ks_statistics(samples: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The largest gap between each row's empirical distribution function and the reference's (the two-sample
    Kolmogorov-Smirnov statistic, exactly: the gap is widest at, or just before, a point of the row)."""
    rows = np.sort(samples, axis=1)
    n, ordered = rows.shape[1], np.sort(reference)
    at = np.searchsorted(ordered, rows, side="right") / len(ordered)
    before = np.searchsorted(ordered, rows, side="left") / len(ordered)
    rank = np.arange(n)
    return np.maximum(((rank + 1) / n - at).max(axis=1), (before - rank / n).max(axis=1))


def ks_statistic(sample: np.ndarray, reference: np.ndarray) -> float:
    return float(ks_statistics(sample[None, :], reference)[0]) if len(sample) else 0.0


def too_many_refusals(refused: int, scans: int, reference_refused: float) -> bool:
    """Whether `refused` of `scans` is more than a site refused like the reference (at `reference_refused`,
    floored at 0.1 %: a reference that refused nothing) reaches with probability FALSE_ALARM (binomial tail)."""
    from scipy.stats import binom

    return bool(binom.sf(refused - 1, scans, max(reference_refused, 1e-3)) < FALSE_ALARM)


def two_sample_ks(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The two-sample KS statistic of each row of `a` against the same row of `b`, ties counted as scipy's
    `ks_2samp` counts them (the distribution functions compared only where a run of equal values ends)."""
    both = np.concatenate([a, b], axis=1)
    order = np.argsort(both, axis=1, kind="stable")
    values = np.take_along_axis(both, order, axis=1)
    from_a = order < a.shape[1]
    gap = np.abs(np.cumsum(from_a, axis=1) / a.shape[1] - np.cumsum(~from_a, axis=1) / b.shape[1])
    run_ends = np.ones_like(values, dtype=bool)
    run_ends[:, :-1] = values[:, 1:] != values[:, :-1]
    return np.where(run_ends, gap, 0).max(axis=1)


def ks_threshold(
    reference: np.ndarray, size: int, rng: np.random.Generator, draws: int = 400, reference_size: int | None = None
) -> float:
    """The KS statistic that a site of `size` scans like the reference's exceeds with probability FALSE_ALARM.
    With `reference_size` (the scans the reference was made of: a test split of a few hundred), the reference is
    a sample too: the limit is that of two samples, of both sizes, drawn from one population (a limit for the
    site's sample alone fired on 90 % of 300 sites drawn like a 32-scan reference, the two-sample one on 0.7 %)."""
    if reference_size is None:
        stats = ks_statistics(rng.choice(reference, (draws, size)), reference)
    else:
        stats = two_sample_ks(rng.choice(reference, (draws, size)), rng.choice(reference, (draws, reference_size)))
    return float(np.quantile(stats, 1 - FALSE_ALARM))


def estimated_performance(p: np.ndarray, threshold: float, rng: np.random.Generator, draws: int = 400) -> dict:
    """Recall, specificity and positive rate expected from calibrated probabilities alone, and a 95 % interval
    from labels drawn as the probabilities say (each scan a tumor with its own P)."""
    called = p >= threshold

    def figures(y: np.ndarray) -> tuple[float, float]:
        recall = (called & y).sum() / max(y.sum(), 1)
        specificity = (~called & ~y).sum() / max((~y).sum(), 1)
        return recall, specificity

    expected_recall = float((p * called).sum() / max(p.sum(), 1e-9))
    expected_specificity = float(((1 - p) * ~called).sum() / max((1 - p).sum(), 1e-9))
    drawn = np.array([figures(y) for y in rng.random((draws, len(p))) < p])
    low, high = np.percentile(drawn, [2.5, 97.5], axis=0)
    return {
        "recall": round(expected_recall, 4),
        "recall_ci95": [round(float(low[0]), 4), round(float(high[0]), 4)],
        "specificity": round(expected_specificity, 4),
        "specificity_ci95": [round(float(low[1]), 4), round(float(high[1]), 4)],
        "positive_rate": round(float(called.mean()), 4),
    }


PLATT_C = 1e4  # inverse L2 strength on the slope, as scikit-learn's LogisticRegression(C=...) takes it


def platt_fits(z: np.ndarray, tumor: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Slope and intercept of a logistic regression of `tumor` on `z` for each row of (fits, scans) arrays at once:
    Newton's method with step halving on the 2-parameter log-loss, the slope L2-penalised as scikit-learn's
    LogisticRegression(C=PLATT_C) does (`tests/test_watch.py` holds it to scikit-learn's fit). scikit-learn fits
    one row at a time: 200 bootstrap refits a period made a 100-week watch take 249 s instead of 5."""
    from scipy.special import expit

    y = tumor.astype(float)

    def loss(slope, intercept):
        u = slope[:, None] * z + intercept[:, None]
        return (np.logaddexp(0, u) - y * u).sum(1) + slope**2 / (2 * PLATT_C)

    slope, intercept = np.ones(len(z)), np.zeros(len(z))  # the identity: the model's calibration as it is
    current = loss(slope, intercept)
    for _ in range(iterations):
        q = expit(slope[:, None] * z + intercept[:, None])
        w = q * (1 - q)
        g_slope, g_intercept = ((q - y) * z).sum(1) + slope / PLATT_C, (q - y).sum(1)
        h_ss, h_si, h_ii = (w * z * z).sum(1) + 1 / PLATT_C, (w * z).sum(1), w.sum(1) + 1e-12
        det = h_ss * h_ii - h_si**2
        step_slope = (h_ii * g_slope - h_si * g_intercept) / det
        step_intercept = (h_ss * g_intercept - h_si * g_slope) / det
        size = np.ones(len(z))
        for _ in range(40):  # halve each row's step until its loss does not rise
            trial = loss(slope - size * step_slope, intercept - size * step_intercept)
            worse = trial > current + 1e-12
            if not worse.any():
                break
            size = np.where(worse, size / 2, size)
        slope, intercept = slope - size * step_slope, intercept - size * step_intercept
        current = loss(slope, intercept)
        if np.abs(size * step_slope).max() < 1e-9 and np.abs(size * step_intercept).max() < 1e-9:
            break
    return np.stack([slope, intercept], axis=1)


def recalibrated_performance(
    p: np.ndarray, threshold: float, known_p: np.ndarray, known_tumor: np.ndarray, rng: np.random.Generator, draws=400
) -> dict | None:
    """Recall, specificity and positive rate expected at a site from the model's P recalibrated (Platt scaling of
    logit P) on the site's verdicts (`known_p`, `known_tumor`: scans other than these); the 95 % interval from
    refitting on verdicts resampled with replacement, then drawing labels as each refit says. None without
    enough verdicts."""
    from scipy.special import expit

    if len(known_tumor) < MIN_VERDICTS or min(known_tumor.sum(), (~known_tumor).sum()) < MIN_CLASS:
        return None
    known_z, z, called = logit(known_p), logit(p), p >= threshold
    pick = np.vstack([np.arange(len(known_p)), rng.integers(0, len(known_p), (draws, len(known_p)))])
    drawn_tumors = known_tumor[pick].sum(1)  # a resample of one class only has no calibration to fit
    usable = (drawn_tumors > 0) & (drawn_tumors < len(known_tumor))  # the first row, the verdicts as they are, is
    fits = platt_fits(known_z[pick[usable]], known_tumor[pick[usable]])
    q = expit(fits[:, :1] * z + fits[:, 1:])
    y = rng.random(q[1:].shape) < q[1:]
    drawn_recall = (called & y).sum(1) / np.maximum(y.sum(1), 1)
    drawn_specificity = (~called & ~y).sum(1) / np.maximum((~y).sum(1), 1)
    (recall_low, recall_high), (spec_low, spec_high) = (
        np.percentile(d, [2.5, 97.5]) for d in (drawn_recall, drawn_specificity)
    )
    return {
        "recall": round(float((q[0] * called).sum() / max(q[0].sum(), 1e-9)), 4),
        "recall_ci95": [round(float(recall_low), 4), round(float(recall_high), 4)],
        "specificity": round(float(((1 - q[0]) * ~called).sum() / max((1 - q[0]).sum(), 1e-9)), 4),
        "specificity_ci95": [round(float(spec_low), 4), round(float(spec_high), 4)],
        "positive_rate": round(float(called.mean()), 4),
        "recalibrated_on": {"verdicts": len(known_p), "no_tumor": int((~known_tumor).sum())},
    }


def measured_performance(scans: list[dict], verdicts: dict[str, str], threshold: float) -> dict | None:
    """Recall and specificity against readers' verdicts (tumor / no tumor) where they exist."""
    pairs = [(s["probability"] >= threshold, verdicts[s["scan"]] == "tumor") for s in scans if s["scan"] in verdicts]
    if not pairs:
        return None
    called, tumor = (np.array(v) for v in zip(*pairs, strict=True))
    out = {"verdicts": len(pairs)}
    if tumor.any():
        out["recall"] = round(float((called & tumor).sum() / tumor.sum()), 4)
    if (~tumor).any():
        out["specificity"] = round(float((~called & ~tumor).sum() / (~tumor).sum()), 4)
    return out


def watch(
    audit: Path, reference: Reference, period: str = "week", verdicts: dict[str, str] | None = None, seed: int = 0
) -> dict:
    """Per site and period: volume, rates, drift statistics and alerts, estimated and measured performance."""
    records, torn = audit_lines(audit)
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        if record.get("endpoint", "predict") not in ("predict", "predict_study"):
            continue
        key = (str(record.get("key_id")), period_of(record["time"], period))
        for scan in record["scans"]:
            scan = {**scan, "scan": scan.get("scan_sha256") or scan.get("input_sha256")}
            groups.setdefault(key, []).append(scan)
    known: dict[str, dict[str, tuple[float, bool]]] = {}  # site: {scan: (P, tumor)} for the scans readers judged
    for (site, _), scans in groups.items():
        for s in scans:
            if s["scan"] in (verdicts or {}) and s.get("status") in READ and s.get("probability") is not None:
                known.setdefault(site, {})[s["scan"]] = (float(s["probability"]), verdicts[s["scan"]] == "tumor")
    sites, limits = [], {}
    for (site, when), scans in sorted(groups.items()):
        read = [s for s in scans if s.get("status") in READ and s.get("probability") is not None]
        refused = sum(s.get("status") not in READ for s in scans)
        p = np.array([s["probability"] for s in read], dtype=float)
        gate = np.array([s["gate_distance"] for s in read if s.get("gate_distance") is not None], dtype=float)
        entry = {
            "site": site,
            "period": when,
            "scans": len(scans),
            "read": len(read),
            "refusal_rate": round(refused / len(scans), 4),
            "uncertain_rate": round(sum(s.get("status") == "uncertain" for s in scans) / len(scans), 4),
        }
        alerts = []
        if too_many_refusals(refused, len(scans), reference.refused):
            alerts.append("refusals")
        for kind, (name, values, ref) in enumerate(
            (("p_tumor", p, reference.probability), ("gate_distance", gate, reference.gate_distance))
        ):
            if len(values) >= MIN_SCANS and len(ref):
                statistic = ks_statistic(values, ref)
                if (name, len(values)) not in limits:  # a function of the statistic and the size alone
                    drawn = np.random.default_rng([seed, kind, len(values)])
                    limits[name, len(values)] = ks_threshold(ref, len(values), drawn, reference_size=reference.scans)
                limit = limits[name, len(values)]
                entry[f"{name}_ks"], entry[f"{name}_ks_limit"] = round(statistic, 4), round(limit, 4)
                if statistic > limit:
                    alerts.append(f"{name}_drift")
        here = {s["scan"] for s in scans}
        outside = [v for scan, v in known.get(site, {}).items() if scan not in here]  # never this period's labels
        recalibrated = None
        if len(p) and outside:
            known_p, known_tumor = (np.array(v) for v in zip(*outside, strict=True))
            recalibrated = recalibrated_performance(p, reference.threshold, known_p, known_tumor, rng)
        if recalibrated:
            entry["estimated"] = recalibrated
        elif len(p):
            entry["estimated"] = estimated_performance(p, reference.threshold, rng)
            if any(alert.endswith("_drift") for alert in alerts):  # CBPE holds only where calibration does
                entry["estimated"]["caution"] = (
                    "the answers drifted from the reference: the estimate assumes the model's calibration holds "
                    f"here, which drift puts in doubt; with {MIN_VERDICTS} readers' verdicts ({MIN_CLASS} of each "
                    "class) on other scans of this site it is recalibrated on them"
                )
        measured = measured_performance(read, verdicts or {}, reference.threshold)
        if measured:
            entry["measured"] = measured
        entry["alerts"] = alerts
        sites.append(entry)
    return {
        "period": period,
        "false_alarm_rate_per_statistic": FALSE_ALARM,
        "records": len(records),
        "unreadable_lines": torn,
        "reference": {
            "scans_read": len(reference.probability),
            "refusal_rate": round(reference.refused, 4),
            "threshold": reference.threshold,
        },
        "sites": sites,
        "alerts": sum(bool(s["alerts"]) for s in sites),
    }


class SiteHealth:
    """This week's answers per site (key id), counted as the service gives them, for the page's strip: volume,
    refusal and uncertain rates; a refusal alert against the share of the model's own held-out images its gate
    refused (`model.json` gate `out_of_fold_refused`); and a drift alert when this week's calibrated P(tumor)
    differ from the model's reference (`model.json` reference) by more than samples of the reference itself
    do at the FALSE_ALARM rate -- each once a site has MIN_SCANS scans this week."""

    KEPT = 5000  # P(tumor) kept per site and week: enough for the KS statistic, bounded in memory

    def __init__(self):
        self.counts: dict[tuple[str, str], list[int]] = {}  # (key id, week): [scans, refused, uncertain]
        self.read: dict[tuple[str, str], list[float]] = {}  # (key id, week): P(tumor) of the scans read
        self.limits: dict[tuple, float] = {}  # (reference, grid size, reference size): KS limit
        self.lock = threading.Lock()

    def observe(self, results: list[dict], key_id: str) -> None:
        week = period_of(datetime.datetime.now(datetime.UTC).isoformat(), "week")
        with self.lock:
            counts = self.counts.setdefault((key_id, week), [0, 0, 0])
            read = self.read.setdefault((key_id, week), [])
            for result in results:
                counts[0] += 1
                counts[1] += result.get("status") not in READ
                counts[2] += result.get("status") == "uncertain"
                if result.get("status") in READ and result.get("probability") is not None and len(read) < self.KEPT:
                    read.append(float(result["probability"]))

    def limit(self, reference: np.ndarray, size: int, reference_size: int | None = None) -> float:
        """The KS limit at the largest size of a doubling grid (MIN_SCANS, 2 x, 4 x, ...) not above `size`:
        the limit falls as the size grows, so this errs towards fewer alarms, and each (reference, grid size)
        is resampled once, not on every call of the page (400 resamples of 5,000 scans took 1 s)."""
        grid = MIN_SCANS * 2 ** int(np.log2(size / MIN_SCANS))
        key = (hash(reference.tobytes()), grid, reference_size)
        with self.lock:
            known = self.limits.get(key)
        if known is None:  # resampled outside the lock: answers keep being counted meanwhile
            known = ks_threshold(reference, grid, np.random.default_rng(0), reference_size=reference_size)
            with self.lock:
                self.limits[key] = known
        return known

    def summary(self, key_id: str, reference_refused: float | None, reference: Reference | None = None) -> dict:
        week = period_of(datetime.datetime.now(datetime.UTC).isoformat(), "week")
        with self.lock:
            scans, refused, uncertain = self.counts.get((key_id, week), [0, 0, 0])
            p = np.array(self.read.get((key_id, week), []))
        out = {
            "site": key_id,
            "week": week,
            "scans": scans,
            "refusal_rate": round(refused / scans, 4) if scans else None,
            "uncertain_rate": round(uncertain / scans, 4) if scans else None,
            "reference_refusal_rate": reference_refused,
            "alerts": [],
        }
        if reference_refused is not None and scans >= MIN_SCANS:
            if too_many_refusals(refused, scans, reference_refused):
                out["alerts"].append(
                    f"refusals: {refused / scans:.0%} of this week's scans not read, against "
                    f"{reference_refused:.1%} of the model's held-out images"
                )
        if reference is not None and len(reference.probability) and len(p) >= MIN_SCANS:
            statistic = ks_statistic(p, reference.probability)
            limit = self.limit(reference.probability, len(p), reference.scans)
            out["p_tumor_ks"], out["p_tumor_ks_limit"] = round(statistic, 4), round(limit, 4)
            if statistic > limit:
                out["alerts"].append(
                    f"drift: this week's P(tumor) unlike the model's test scans' (KS {statistic:.2f} above "
                    f"{limit:.2f}, which {FALSE_ALARM:.0%} of samples like them exceed)"
                )
        return out
