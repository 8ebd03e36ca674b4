"""`braintumor feedback export / accept / reject`: readers' verdicts become proposals, and only a reviewer's
decision turns them into data (`data/site-<site>/<class>/`) or label decisions (`labels/overrides.csv`)."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from braintumor import cli
from braintumor.data.fetch import fetch
from braintumor.data.overrides import read_overrides
from braintumor.serve.feedback import FeedbackStore, Verdict
from braintumor.serve.feedback_review import PROPOSAL_COLUMNS

from conftest import brain_image, local_only_params, save

MODEL = {"name": "m", "version": "3", "model_sha256": "0" * 64}


def digest(k: int) -> str:
    return hashlib.sha256(f"scan {k}".encode()).hexdigest()


@pytest.fixture
def site(in_tmp):
    """A verdict store as a site's server leaves it, its kept scans, and a fetch manifest of the data so far."""
    store = FeedbackStore(f"sqlite:///{in_tmp / 'feedback.db'}")
    kept = in_tmp / "kept"
    said = {  # scan: (status the model gave, [(reader, verdict, subtype)], what was kept)
        1: ("read", [("ann", "no_tumor", None), ("bob", "no_tumor", None)], "image"),  # agreed, new: add
        2: ("read", [("ann", "tumor", "glioma")], "image"),  # new, with a subtype: add as glioma
        3: ("read", [("ann", "tumor", None), ("bob", "no_tumor", None)], "image"),  # readers disagree: nothing
        4: ("uncertain", [("ann", "cant_tell", None)], None),  # can't tell: nothing
        5: ("read", [("ann", "no_tumor", None)], "series"),  # a healthy series: its slices, one group
        6: ("read", [("ann", "tumor", None)], "series"),  # a tumor series: which slices, not said
        7: ("read", [("ann", "tumor", None)], None),  # in the data as no tumor: relabel
        8: ("out_of_distribution", [("bob", "not_brain_mr", None)], None),  # in the data: exclude
        9: ("read", [("ann", "tumor", None), ("ann", "no_tumor", None)], "image"),  # ann corrected herself: add
    }
    for k, (status, verdicts, what) in said.items():
        request = f"{k:032x}"
        store.record_answers(request, "st-marys", MODEL, [{"scan_sha256": digest(k), "status": status}])
        path = None
        if what == "image":
            path = save(kept / f"{digest(k)}.png", brain_image(k)).name
        elif what == "series":
            for s in range(3):
                save(kept / digest(k) / f"slice-{s:03d}.png", brain_image(10 * k + s))
            path = digest(k)
        for reader, verdict, subtype in verdicts:
            store.add(
                Verdict(request_id=request, scan_sha256=digest(k), verdict=verdict, subtype=subtype), reader, path
            )
    manifest = in_tmp / "artifacts/fetch/manifest.csv"
    manifest.parent.mkdir(parents=True)
    pd.DataFrame({"sha256": [digest(7), digest(8), digest(1) + "x"], "label": [0, 1, 0]}).to_csv(manifest, index=False)
    return in_tmp


def export() -> pd.DataFrame:
    assert cli.main(["feedback", "export", "--kept", "kept"]) == 0
    return pd.read_csv("labels/proposals.csv", dtype=str, keep_default_na=False)


def test_export_proposes_only_what_readers_agree_on(site, capsys):
    proposals = export()
    assert list(proposals.columns) == PROPOSAL_COLUMNS
    got = {(row.kind, row.image, row.label, row.site) for row in proposals.itertuples()}
    assert got == {
        ("add", digest(1), "no_tumor", "st-marys"),
        ("add", digest(2), "glioma", "st-marys"),
        ("add", digest(5), "no_tumor", "st-marys"),
        ("relabel", digest(7), "tumor", "st-marys"),
        ("exclude", digest(8), "exclude", "st-marys"),
        ("add", digest(9), "no_tumor", "st-marys"),
    }
    assert "1 where readers disagree, 1 can't tell, 1 series read as tumor" in capsys.readouterr().out
    assert not (site / "data").exists() and not (site / "labels/overrides.csv").exists()  # nothing applied yet


def test_accepted_proposals_become_data_and_decisions_and_are_not_proposed_again(site, monkeypatch):
    proposals = export()
    relabel = proposals[proposals.kind == "relabel"].id.item()
    assert cli.main(["feedback", "reject", relabel, "--reviewer", "Dr. Ray"]) == 0
    assert cli.main(["feedback", "accept", "--all", "--kept", "kept"]) == 2  # no reviewer: refused, nothing done
    assert cli.main(["feedback", "accept", "--all", "--kept", "kept", "--reviewer", "Dr. Ray"]) == 0
    assert (site / "data/site-st-marys/no_tumor" / f"{digest(1)}.png").is_file()
    assert (site / "data/site-st-marys/glioma" / f"{digest(2)}.png").is_file()
    assert len(list((site / "data/site-st-marys/no_tumor" / digest(5)).iterdir())) == 3
    decided = read_overrides(site / "labels/overrides.csv")
    assert list(decided.image) == [digest(8)] and list(decided.label) == ["exclude"]  # the relabel was rejected
    assert decided.reviewer.item() == "Dr. Ray" and "bob=not_brain_mr" in decided.reason.item()
    ledger = pd.read_csv(site / "labels/feedback_decisions.csv", dtype=str)
    assert sorted(ledger.decision) == ["accepted"] * 5 + ["rejected"] and set(ledger.reviewer) == {"Dr. Ray"}
    assert export().empty  # decided proposals are not proposed again

    # fetch takes the site's folder as any user's images; the slices of one series share a group
    params = local_only_params()
    params["fetch"]["sources"]["local"]["path"] = "data"
    monkeypatch.chdir(site)
    fetch(params)
    manifest = pd.read_csv(site / "artifacts/fetch/manifest.csv", dtype=str, keep_default_na=False)
    series = manifest[manifest.original.str.contains(digest(5))]
    assert len(series) == 3 and series.group.nunique() == 1 and series.group.iloc[0].startswith("scan-")
    assert set(manifest.original.str.split("/").str[0]) == {"site-st-marys"}


def test_a_misspelt_class_folder_inside_a_site_folder_is_still_an_error(in_tmp):
    save(in_tmp / "data/site-a/no_tumour/x.png", brain_image(1))
    params = local_only_params()
    params["fetch"]["sources"]["local"]["path"] = "data"
    from braintumor.errors import SourceError

    with pytest.raises(SourceError, match="no_tumour: unknown class folder"):
        fetch(params)
