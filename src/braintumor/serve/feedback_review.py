"""From readers' verdicts to reviewed data: `braintumor feedback export` proposes, a reviewer accepts or rejects.

Nothing a reader said reaches training by itself. `export` reads the verdict store (each reader's latest verdict
on each scan) and writes `labels/proposals.csv`, one row per proposal where the readers of a scan agree:

- add: a kept scan (`serve --keep-feedback-scans`) that is not in the data yet, read as tumor or no tumor ->
  accepted, its pixels go to `data/site-<site>/<class>/<digest>.png` (a series read as no tumor: a folder of its
  slices, one group). A series read as tumor is not proposed: which of its slices show the tumor was not said.
- relabel: a scan whose bytes are an image already in the data (the fetch manifest's sha256) that readers put in
  the other class -> accepted, a row of `labels/overrides.csv`.
- exclude: an image of the data that readers call not a brain MR -> accepted, an `exclude` row there.

Readers who disagree, and "can't tell", propose nothing (the export counts them). `accept` (proposal ids, or
all) applies proposals, `reject` declines them; both append each decision, with the reviewer's name and the
time, to `labels/feedback_decisions.csv`, and a decided proposal is not proposed again. The site is the key id
that asked for the answer. Then `dvc add data` (data.dvc) and `dvc repro` train on the accepted scans.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import re
import shutil
from pathlib import Path

import pandas as pd

from braintumor.atomic import write_csv
from braintumor.data.overrides import COLUMNS as OVERRIDE_COLUMNS
from braintumor.data.overrides import read_overrides
from braintumor.errors import SourceError
from braintumor.labels import SITE_PREFIX
from braintumor.serve.feedback import FeedbackStore

PROPOSAL_COLUMNS = ["id", "kind", "image", "label", "site", "readers", "model_answer", "kept", "proposed"]
DECISION_COLUMNS = ["id", "kind", "image", "label", "site", "readers", "decision", "reviewer", "time"]
CLASS_OF = {"tumor": 1, "no_tumor": 0}


def site_folder(site: str) -> str:
    """`site-<key id>`, reduced to characters that are safe in a folder name."""
    return SITE_PREFIX + (re.sub(r"[^A-Za-z0-9_.-]", "_", site) or "unnamed")


def proposal_id(kind: str, image: str, label: str) -> str:
    return hashlib.sha256(f"{kind}:{image}:{label}".encode()).hexdigest()[:12]


def read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns) != columns:
        raise SourceError(f"{path}: the header must be `{','.join(columns)}` (got `{','.join(table.columns)}`)")
    return table


def export(store: FeedbackStore, kept: Path | None, manifest: Path, proposals: Path, decisions: Path) -> dict:
    """Write the proposals the readers' latest verdicts support (see the module docstring); their counts."""
    by_scan = store.latest_by_scan()
    known = _manifest_labels(manifest)
    decided = set(read_table(decisions, DECISION_COLUMNS).id)
    counts = {"scans": len(by_scan), "disagreements": 0, "cant_tell": 0, "tumor_series": 0, "not_kept": 0}
    rows = []
    for scan, said in sorted(by_scan.items()):
        codes = {v["verdict"] for v in said}
        if len(codes) > 1:
            counts["disagreements"] += 1
            continue
        (code,) = codes
        subtypes = {v["subtype"] for v in said}
        label = subtypes.pop() if code == "tumor" and len(subtypes) == 1 and None not in subtypes else code
        first = said[0]
        readers = ";".join(f"{v['key_id']}={v['verdict']}" + (f"/{v['subtype']}" if v["subtype"] else "") for v in said)
        answer = f"{first['model_name'] or 'local'} v{first['model_version']}: {first['status']}"
        if first["probability"] is not None:
            answer += f", P(tumor) {first['probability']:.3f}"
        site = store.answer(first["request_id"], scan)["asked_by"]
        if code == "cant_tell":
            counts["cant_tell"] += 1
            continue
        if scan in known:
            if code == "not_brain_mr":
                kind, label = "exclude", "exclude"
            elif known[scan] != CLASS_OF[code]:
                kind = "relabel"
            else:
                continue  # the readers agree with the data
            rows.append((kind, scan, label, site, readers, answer, ""))
            continue
        if code == "not_brain_mr":
            continue  # not in the data: nothing to exclude
        path = next((v["kept"] for v in said if v["kept"]), None)
        if path is None or kept is None or not (kept / path).exists():
            counts["not_kept"] += 1
            continue
        if (kept / path).is_dir() and code == "tumor":
            counts["tumor_series"] += 1
            continue
        rows.append(("add", scan, label, site, readers, answer, path))
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    table = pd.DataFrame(
        [[proposal_id(kind, image, label), kind, image, label, *rest, now] for kind, image, label, *rest in rows],
        columns=PROPOSAL_COLUMNS,
    )
    table = table[~table.id.isin(decided)]
    earlier = read_table(proposals, PROPOSAL_COLUMNS).set_index("id").proposed.to_dict()
    table["proposed"] = [earlier.get(i, now) for i in table.id]  # a standing proposal keeps its first date
    proposals.parent.mkdir(parents=True, exist_ok=True)
    write_csv(proposals, table)
    return counts | {kind: int((table.kind == kind).sum()) for kind in ("add", "relabel", "exclude")}


def _manifest_labels(manifest: Path) -> dict[str, int]:
    """sha256 -> label of every image the last fetch took (none before the first fetch)."""
    if not manifest.is_file():
        return {}
    frame = pd.read_csv(manifest, usecols=["sha256", "label"], dtype={"sha256": str})
    return dict(zip(frame.sha256, frame.label.astype(int), strict=True))


def decide(
    ids: list[str] | None,
    decision: str,
    reviewer: str,
    proposals: Path,
    decisions: Path,
    kept: Path | None = None,
    data: Path | None = None,
    overrides: Path | None = None,
) -> list[dict]:
    """Accept (apply) or reject the proposals `ids` (None: all); each decision is appended to `decisions`."""
    if not reviewer.strip():
        raise SourceError("give --reviewer: every decision names who took it")
    table = read_table(proposals, PROPOSAL_COLUMNS)
    chosen = table if ids is None else table[table.id.isin(ids)]
    missing = sorted(set(ids or []) - set(table.id))
    if missing:
        raise SourceError(f"{proposals}: no proposal {', '.join(missing)} (run `braintumor feedback export`)")
    applied = []
    for row in chosen.to_dict("records"):
        if decision == "accepted":
            _apply(row, reviewer, kept, data, overrides)
        applied.append(row)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    ledger = pd.DataFrame(
        [
            {**{k: r[k] for k in DECISION_COLUMNS if k in r}, "decision": decision, "reviewer": reviewer, "time": now}
            for r in applied
        ],
        columns=DECISION_COLUMNS,
    )
    write_csv(decisions, pd.concat([read_table(decisions, DECISION_COLUMNS), ledger], ignore_index=True))
    write_csv(proposals, table[~table.id.isin([r["id"] for r in applied])])
    return applied


def _apply(row: dict, reviewer: str, kept: Path | None, data: Path | None, overrides: Path | None) -> None:
    if row["kind"] == "add":
        if kept is None or data is None:
            raise SourceError("accepting an added scan needs --kept (the server's kept scans) and --data")
        source = kept / row["kept"]
        if not source.exists():
            raise SourceError(f"{source}: the kept scan of proposal {row['id']} is gone")
        target = data / site_folder(row["site"]) / row["label"] / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(source, target)
        return
    if overrides is None:
        raise SourceError("accepting a relabel or an exclusion needs --overrides")
    existing = read_overrides(overrides)
    if row["image"] in set(existing.image):
        raise SourceError(f"{overrides}: image {row['image'][:12]}… is decided there already; edit that row instead")
    reason = f"readers {row['readers']} (proposal {row['id']}; the model: {row['model_answer']})"
    new = not overrides.is_file()
    with open(overrides, "a", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        if new:
            writer.writerow(OVERRIDE_COLUMNS)
        writer.writerow([row["image"], row["label"], reason, reviewer])
    read_overrides(overrides)  # still a valid decisions file
