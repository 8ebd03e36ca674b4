"""The watch on a shift we can make (issue 44 §3): three sites send real scans through a real `braintumor serve`.

The served model never saw Kaggle 2020's `Testing/` collection: the train and evaluate stages run on the split
without it (`benchmarks/split_without.py`). Three keys are three sites:

- site A sends that model's own test split (the scans its reference, shipped in model.json, was taken from);
- site B sends the brain-MR scans of Kaggle 2020 `Testing/` (a collection the model never trained on), and its
  readers post their verdicts (the scans' labels) through `POST /v1/feedback`;
- site C sends what is not brain MR: the head CT files a reviewer found in the mirror, scikit-image's
  photographs, blank, noise and text images (`ood_gate.py`'s sets).

Each distinct scan goes through the API once (its original file, as an upload). Then, from the server's own audit
log, `--weeks` weeks of `--size` scans per site are drawn (with replacement, a seeded draw a week) into a new log,
and `serve.watch.watch` reads it with the verdicts: the share of weeks each site alerts on (drift for A and B,
refusals for C), and how far site B's estimated specificity is from the measured one, week by week -- estimated
from the model's own calibration (CBPE, the watch without verdicts) and recalibrated on the site's verdicts of
scans outside the week (the watch with them). Beside them, the noise floor: how often the collection's own
specificity (all its scans) lands within 0.10 of a week's measured one. With `--judged N`, readers judge only N
of site B's scans, sent first in a week of their own; the weeks after draw from its other scans, so each week's
estimate stands on those N verdicts alone (how many a site needs), its measured figures from all labels.

    python benchmarks/site_watch.py --model runs/without/models --split-dir runs/without/split
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import requests
from sklearn.metrics import roc_auc_score

from braintumor.atomic import write_json
from braintumor.cli import quiet_libraries
from braintumor.data.datasets import load_split
from braintumor.quality.generalize import HOLD_OUTS, every_image, scored_rows
from braintumor.serve.access import add_key
from braintumor.serve.predict import load
from braintumor.serve.watch import reference_of, watch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ood_gate import mirror_head_ct, photographs, synthetic  # noqa: E402

from fixtures.servers import BIN, free_port, serving  # noqa: E402

log = logging.getLogger("site_watch")
BATCH = 16
SITES = ("site-a", "site-b", "site-c")


def files_of(paths: list[str]) -> list[tuple[str, bytes]]:
    return [(Path(p).name, Path(p).read_bytes()) for p in paths]


def send(url: str, key: str, files: list[tuple[str, bytes]]) -> list[dict]:
    """Every file through `POST /v1/predict`, BATCH at a time; each result with its request id."""
    results = []
    for start in range(0, len(files), BATCH):
        batch = [("files", (f"scan-{start + k}.png", data)) for k, (_, data) in enumerate(files[start : start + BATCH])]
        answer = requests.post(f"{url}/v1/predict", files=batch, headers={"X-API-Key": key}, timeout=300)
        answer.raise_for_status()
        body = answer.json()
        results += [{**r, "request_id": body["request_id"]} for r in body["results"]]
    return results


def weekly_log(audit: Path, out: Path, weeks: int, size: int, seed: int, judged: set[str]) -> None:
    """`weeks` weeks per site, each `size` scans drawn with replacement from what the site sent (audit lines).
    Scans in `judged` come first, once each, in a week of their own (week 0), and are not drawn again."""
    scans: dict[str, list[dict]] = {}
    for line in audit.read_text().splitlines():
        record = json.loads(line)
        if record.get("endpoint") == "predict":
            scans.setdefault(record["key_id"], []).extend(record["scans"])
    rng = random.Random(seed)
    start = datetime.datetime(2026, 1, 5, 9, tzinfo=datetime.UTC)  # a Monday

    def line(week: int, site: str, drawn: list[dict]) -> str:
        when = (start + datetime.timedelta(weeks=week)).isoformat()
        return json.dumps({"time": when, "key_id": site, "endpoint": "predict", "scans": drawn}) + "\n"

    with open(out, "w") as log_file:
        for site, sent in sorted(scans.items()):
            first = [s for s in sent if s.get("scan_sha256", s["input_sha256"]) in judged]
            if first:
                log_file.write(line(0, site, first))
            scans[site] = [s for s in sent if s.get("scan_sha256", s["input_sha256"]) not in judged]
        for week in range(1, weeks + 1):
            for site, sent in sorted(scans.items()):
                log_file.write(line(week, site, [rng.choice(sent) for _ in range(size)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the models/ folder of the model never given site B")
    parser.add_argument("--split-dir", type=Path, required=True, help="the split it was trained on (site A's scans)")
    parser.add_argument("--full-split", type=Path, default=Path("artifacts/split"), help="where site B's scans are")
    parser.add_argument("--hold-out", default="kaggle2020_testing", choices=sorted(HOLD_OUTS))
    parser.add_argument("--weeks", type=int, default=100)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--judged",
        type=int,
        default=0,
        help="readers judge only the first N of site B's scans (a seeded order), sent in a week of their own "
        "before the others; 0: every scan is judged, each week's estimate from the verdicts outside it",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/data/site_watch"))
    args = parser.parse_args()
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    site_a = [str(p) for p in load_split(args.split_dir, "test", "binary")["path"]]
    everything = every_image(args.full_split)
    rows = scored_rows(everything, args.hold_out) & (everything["modality"] == "mr")
    site_b, labels_b = [str(p) for p in everything["path"][rows]], everything["label"][rows]
    photos, _ = photographs()
    made = synthetic()
    site_c = list(mirror_head_ct(Path("labels/modality_review.csv")).values()) + list(photos.values())
    site_c += [data for kind in made.values() for data in kind.values()]
    log.info(
        "site A %d scans, site B %d (%d healthy), site C %d",
        len(site_a),
        len(site_b),
        (labels_b == 0).sum(),
        len(site_c),
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys = {
            site: add_key(root / "keys.json", site, ["predict", "feedback"]) for site in ("site-a", "site-b", "site-c")
        }
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [str(BIN / "braintumor"), "serve", "--model", str(args.model / "model.keras"), "--port", str(port)]
        command += ["--keys", str(root / "keys.json"), "--audit-log", str(root / "audit.jsonl")]
        command += ["--rate-limit", "100000", "--burst", "1000"]
        with serving(command, f"{url}/readyz", root / "serve.log"):
            send(url, keys["site-a"], files_of(site_a))
            answered_b = send(url, keys["site-b"], files_of(site_b))
            truth = {
                r["scan_sha256"]: "tumor" if label else "no_tumor"
                for r, label in zip(answered_b, labels_b, strict=True)
            }
            judging = np.random.default_rng(args.seed).permutation(len(answered_b))[: args.judged or None]
            verdicts = {}
            for result in (answered_b[k] for k in judging):
                verdict = truth[result["scan_sha256"]]
                body = {"request_id": result["request_id"], "scan_sha256": result["scan_sha256"], "verdict": verdict}
                posted = requests.post(
                    f"{url}/v1/feedback", json=body, headers={"X-API-Key": keys["site-b"]}, timeout=60
                )
                posted.raise_for_status()
                verdicts[result["scan_sha256"]] = verdict
            send(url, keys["site-c"], [("x.png", data) for data in site_c])
        read_b = [k for k, r in enumerate(answered_b) if r.get("probability") is not None]
        auc_b = roc_auc_score(labels_b[read_b], [answered_b[k]["probability"] for k in read_b])
        weekly = args.out / "weekly_audit.jsonl"
        weekly_log(
            root / "audit.jsonl", weekly, args.weeks, args.size, args.seed, set(verdicts) if args.judged else set()
        )

    reference = reference_of(load(str(args.model / "model.keras")))
    report = watch(weekly, reference, "week", verdicts, seed=args.seed)
    plain = {(e["site"], e["period"]): e for e in watch(weekly, reference, "week", None, seed=args.seed)["sites"]}
    on_all_labels = report if verdicts == truth else watch(weekly, reference, "week", truth, seed=args.seed)
    # each week's measured figures on all its scans, whichever the readers judged
    measured_by = {(e["site"], e["period"]): e.get("measured", {}) for e in on_all_labels["sites"]}
    called_b = np.array([answered_b[k]["probability"] >= reference.threshold for k in read_b])
    healthy_b = labels_b[read_b] == 0
    collection_specificity = float((healthy_b & ~called_b).sum() / healthy_b.sum())
    first_week = min(e["period"] for e in report["sites"])
    summary = {}
    for site in SITES:
        weeks = [e for e in report["sites"] if e["site"] == site and not (args.judged and e["period"] == first_week)]
        row = {
            "weeks": len(weeks),
            "alerted": sum(bool(e["alerts"]) for e in weeks),
            "drift_alerts": sum(any(a.endswith("_drift") for a in e["alerts"]) for e in weeks),
            "refusal_alerts": sum("refusals" in e["alerts"] for e in weeks),
            "refusal_rate_mean": round(float(np.mean([e["refusal_rate"] for e in weeks])), 4),
        }
        compared = [e for e in weeks if "estimated" in e and "specificity" in measured_by[site, e["period"]]]
        if compared and site == "site-b":
            measured = np.array([measured_by[site, e["period"]]["specificity"] for e in compared])
            row["specificity_measured_mean"] = round(float(measured.mean()), 4)
            for name, estimates in (
                ("cbpe", [plain[(site, e["period"])]["estimated"] for e in compared]),
                ("recalibrated_on_other_weeks_verdicts", [e["estimated"] for e in compared]),
            ):
                gaps = np.array([est["specificity"] for est in estimates]) - measured
                inside = [
                    low <= m <= high
                    for m, (low, high) in zip(measured, (est["specificity_ci95"] for est in estimates), strict=True)
                ]
                row[f"specificity_estimated_minus_measured_{name}"] = {
                    "mean": round(float(gaps.mean()), 4),
                    "mean_absolute": round(float(np.abs(gaps).mean()), 4),
                    "within_0.10": round(float(np.mean(np.abs(gaps) <= 0.10)), 4),
                    "range": [round(float(gaps.min()), 4), round(float(gaps.max()), 4)],
                    "measured_inside_ci95": round(float(np.mean(inside)), 4),
                }
            row["collection_specificity_within_0.10_of_a_week"] = round(
                float(np.mean(np.abs(collection_specificity - measured) <= 0.10)), 4
            )
        summary[site] = row
    summary["site-b"]["roc_auc_on_scans_read"] = round(float(auc_b), 4)
    summary["site-b"]["scans_read"] = len(read_b)
    summary["site-b"]["collection_specificity"] = round(collection_specificity, 4)
    summary["site-b"]["verdicts"] = len(verdicts)
    write_json(
        args.out / (f"summary-judged{args.judged}-seed{args.seed}.json" if args.judged else "summary.json"),
        {"weeks": args.weeks, "size": args.size, "judged": args.judged, "sites": summary},
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
