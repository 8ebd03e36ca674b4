"""A reviewer's label decisions (labels/overrides.csv): validated, applied by fetch, each one recorded."""

import hashlib
import json

import pandas as pd
import pytest

from braintumor.data.fetch import fetch
from braintumor.errors import SourceError

from conftest import brain_image, local_only_params, save


@pytest.fixture
def local(in_tmp):
    """Three local scans, one of them twice (same bytes in two class folders)."""
    for folder, seed in (("tumor", 1), ("no_tumor", 2), ("no_tumor", 3), ("glioma", 3)):
        save(in_tmp / f"data/{folder}/s{seed}.png", brain_image(seed))
    params = local_only_params()
    params["fetch"]["overrides"] = str(in_tmp / "labels/overrides.csv")
    (in_tmp / "labels").mkdir()
    return params


def decisions(in_tmp, *rows: str) -> None:
    (in_tmp / "labels/overrides.csv").write_text("image,label,reason,reviewer\n" + "".join(r + "\n" for r in rows))


def test_a_reviewer_s_decisions_relabel_exclude_and_are_recorded(in_tmp, local):
    copied = hashlib.sha256((in_tmp / "data/glioma/s3.png").read_bytes()).hexdigest()
    decisions(
        in_tmp,
        "local/tumor/s1.png,no_tumor,no lesion on review,A. Reviewer",
        f"{copied},exclude,scan appears twice with two labels,B. Reviewer",
        "local/tumor/missing.png,tumor,typo in the path,C. Reviewer",
        "local/no_tumor/gone.png,exclude,decided on a file no longer there,D. Reviewer",
    )
    metrics = fetch(local)

    manifest = pd.read_csv(in_tmp / "artifacts/fetch/manifest.csv", keep_default_na=False).set_index("original")
    assert manifest.loc["tumor/s1.png", ["label", "subtype"]].tolist() == [0, "none"]
    assert sorted(manifest.index) == ["no_tumor/s2.png", "tumor/s1.png"]  # both copies of s3 excluded
    skipped = pd.read_csv(in_tmp / "artifacts/fetch/skipped.csv")
    assert sorted(skipped.original[skipped.reason == "excluded_by_review"]) == ["glioma/s3.png", "no_tumor/s3.png"]
    assert (
        skipped.detail[skipped.reason == "excluded_by_review"] == "scan appears twice with two labels (B. Reviewer)"
    ).all()
    assert not list((in_tmp / "artifacts/fetch/images/local").rglob("s3.png"))
    applied = pd.read_csv(in_tmp / "artifacts/fetch/overrides_applied.csv", keep_default_na=False)
    assert len(applied) == 5 and applied.loc[applied.image == "local/tumor/missing.png", "path"].item() == ""
    assert applied.loc[applied.image == "local/no_tumor/gone.png", "path"].item() == ""
    assert applied.loc[applied.decision == "no_tumor", ["label_was", "subtype_was"]].values.tolist() == [
        ["1", "unknown"]
    ]
    assert metrics["overrides"] == {"relabelled": 1, "excluded": 2, "unmatched": 2}
    assert json.loads((in_tmp / "metrics/fetch.json").read_text())["per_source"]["local"]["no_tumor"] == 2


def test_no_decisions_change_nothing(in_tmp, local):
    fetch(local)
    before = (in_tmp / "artifacts/fetch/manifest.csv").read_bytes()
    decisions(in_tmp)
    fetch(local)
    assert (in_tmp / "artifacts/fetch/manifest.csv").read_bytes() == before


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("local/tumor/s1.png,cancer,x,A", "line 2: label 'cancer' must be one of tumor, no_tumor"),
        ("s1.png,tumor,x,A", "neither a sha256 nor <source>/<path in the source>"),
        ("local/tumor/s1.png,tumor,,A", "line 2: give the reason and the reviewer"),
    ],
)
def test_a_bad_decision_stops_fetch_before_any_work_naming_its_line(in_tmp, local, row, message):
    decisions(in_tmp, row)
    with pytest.raises(SourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fetch(local)
    assert not (in_tmp / "artifacts/fetch").exists()


def test_a_repeated_image_or_a_wrong_header_is_refused(in_tmp, local):
    decisions(in_tmp, "local/tumor/s1.png,tumor,x,A", "local/tumor/s1.png,exclude,y,B")
    with pytest.raises(SourceError, match="decided twice"):
        fetch(local)
    (in_tmp / "labels/overrides.csv").write_text("path,label\nlocal/tumor/s1.png,tumor\n")
    with pytest.raises(SourceError, match="the header must be `image,label,reason,reviewer`"):
        fetch(local)
