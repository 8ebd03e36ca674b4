"""Leave-one-collection-out (the optional generalize stage): a held-out collection leaves training whole, its
copies in other sources too; the stage heads its metrics with the worst hold-out and shows its worst errors."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from braintumor.errors import ParamError
from braintumor.model.train import fit_folds
from braintumor.quality.generalize import every_image, generalize, leave_out, validate_generalize

from fixtures.split import make_split, tiny_params


@pytest.mark.slow  # k-fold trainings
def test_a_held_out_source_is_scored_by_models_that_never_saw_its_clusters(in_tmp, monkeypatch):
    split = make_split(in_tmp / "split", size=32, members=8)
    manifest = pd.read_csv(split / "manifest.csv")
    # every third cluster comes from kaggle2018; a member of one of them sits in kaggle2020 (a cross-source copy)
    manifest["source"] = np.where(manifest.cluster % 3 == 0, "kaggle2018", "kaggle2020")
    copy = manifest.index[(manifest.cluster % 3 == 0) & ~manifest.representative][0]
    manifest.loc[copy, "source"] = "kaggle2020"
    manifest.to_csv(split / "manifest.csv", index=False)
    seen = []

    def fit_folds_seen(params, pool, verbose=0):
        seen.append(pool["path"].copy())
        return fit_folds(params, pool, verbose=verbose)

    monkeypatch.setattr("braintumor.quality.generalize.fit_folds", fit_folds_seen)
    params = tiny_params("seed_fsm", epochs=1)
    params["split"]["image_size"] = 32
    result, rows = leave_out(params, split, "kaggle2018")

    everything = every_image(split)
    target = everything["path"][(everything["source"] == "kaggle2018") & everything["representative"]]
    assert result["images"] == len(target) and result["tumor"] + result["no_tumor"] == len(target)
    held_clusters = set(manifest.cluster[manifest.source == "kaggle2018"])
    trained = manifest.set_index("path").loc[seen[0]]
    assert not set(trained.cluster) & held_clusters  # nor the kaggle2020 copy of a held-out scan
    assert result["trained_on"] == len(seen[0])
    assert set(result["ci95"]) == {"recall", "specificity", "accuracy", "roc_auc"}
    assert sorted(rows.path) == sorted(target)
    # the figures are those of the rows it lists: each image's score, at the threshold it names
    assert result["roc_auc"] == pytest.approx(roc_auc_score(rows.label, rows.p_tumor), abs=1e-3)
    called = rows.p_tumor >= rows.threshold
    assert result["recall"] == pytest.approx(called[rows.label == 1].mean(), abs=1e-3)


def two_collection_split(root):
    """A split whose clusters alternate between the two hold-outs' collections."""
    split = make_split(root, size=32, members=4)
    manifest = pd.read_csv(split / "manifest.csv")
    half = manifest.cluster // 2 % 2 == 0  # labels alternate cluster by cluster: pairs of clusters keep both
    manifest["source"] = np.where(half, "kaggle2018", "kaggle2020")
    folder = np.where(manifest.label == 1, "Testing/glioma_tumor/", "Testing/no_tumor/")
    manifest["original"] = np.where(half, manifest.original, folder + manifest.path.str.rsplit("/", n=1).str[1])
    manifest.to_csv(split / "manifest.csv", index=False)
    return split


@pytest.mark.slow  # k-fold trainings
def test_the_stage_heads_its_metrics_with_the_worst_hold_out_and_shows_its_errors(in_tmp):
    split = two_collection_split(in_tmp / "split")
    manifest = pd.read_csv(split / "manifest.csv")  # some healthy scans of each collection are head CT
    manifest.loc[(manifest.label == 0) & (manifest.cluster % 5 == 0), "modality"] = "ct"
    manifest.to_csv(split / "manifest.csv", index=False)
    params = tiny_params("seed_fsm", epochs=1)
    params["split"]["image_size"] = 32
    params["generalize"] = {"hold_outs": ["kaggle2018", "kaggle2020_testing"], "folds": 2, "gallery": 4}
    metrics = generalize(params, split, in_tmp / "out", in_tmp / "m.json", in_tmp / "worst.png")
    assert json.loads((in_tmp / "m.json").read_text()) == metrics
    aucs = {name: metrics[name]["brain_mr"]["roc_auc"] for name in ("kaggle2018", "kaggle2020_testing")}
    assert metrics["worst_roc_auc"] == min(aucs.values()) and aucs[metrics["worst_hold_out"]] == min(aucs.values())
    assert metrics["folds"] == 2
    predictions = pd.read_csv(in_tmp / "out/predictions.csv")
    assert predictions.groupby("hold_out").size().to_dict() == {n: metrics[n]["images"] for n in aucs}
    for name, rows in predictions.groupby("hold_out"):  # all images, and the brain MR among them
        mr = rows[rows.modality == "mr"]
        assert 0 < len(mr) < len(rows) and metrics[name]["brain_mr"]["images"] == len(mr)
        assert metrics[name]["brain_mr"]["no_tumor"] == (mr.label == 0).sum()
        healthy = rows[rows.label == 0]
        assert metrics[name]["not_brain_mr_share"] == {
            "tumor": 0.0,
            "no_tumor": round((healthy.modality != "mr").mean(), 4),
        }
    assert Image.open(in_tmp / "worst.png").format == "PNG"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hold_outs": ["kaggle2019"]}, "generalize.hold_outs"),
        ({"folds": 1}, "generalize.folds"),
        ({"gallery": -1}, "generalize.gallery"),
    ],
)
def test_generalize_params_are_validated(change, message):
    params = tiny_params()
    params["generalize"] |= change
    with pytest.raises(ParamError, match=message):
        validate_generalize(params)
