"""Leave-one-source-out: a held-out collection leaves training whole, its copies in other sources too."""

import numpy as np
import pandas as pd

from braintumor.model.train import fit_folds
from braintumor.quality.generalization import every_image, leave_out

from fixtures.split import make_split, tiny_params


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

    monkeypatch.setattr("braintumor.quality.generalization.fit_folds", fit_folds_seen)
    params = tiny_params("seed_fsm", epochs=1)
    params["split"]["image_size"] = 32
    result = leave_out(params, split, "kaggle2018")

    everything = every_image(split)
    target = everything["path"][(everything["source"] == "kaggle2018") & everything["representative"]]
    assert result["images"] == len(target) and result["tumor"] + result["no_tumor"] == len(target)
    held_clusters = set(manifest.cluster[manifest.source == "kaggle2018"])
    trained = manifest.set_index("path").loc[seen[0]]
    assert not set(trained.cluster) & held_clusters  # nor the kaggle2020 copy of a held-out scan
    assert result["trained_on"] == len(seen[0]) and 0 <= result["roc_auc"] <= 1
    assert set(result["ci95"]) == {"recall", "specificity", "accuracy", "roc_auc"}
