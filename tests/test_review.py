"""The review stage: cleanlab's likely label errors ranked for a person, relabelling nothing."""

import json

import numpy as np
import pandas as pd
from PIL import Image

from braintumor.data.datasets import load_split
from braintumor.quality.review import review

from fixtures.split import make_split, tiny_params


def scores(labels: np.ndarray, wrong: np.ndarray, rng) -> np.ndarray:
    """Held-out P(tumor) that agree with the labels, except at `wrong`, where they are confidently opposite."""
    p = np.where(labels == 1, rng.uniform(0.6, 0.95, len(labels)), rng.uniform(0.05, 0.4, len(labels)))
    p[wrong] = 1 - labels[wrong] * 0.98 - 0.01
    return p


def test_review_ranks_the_confidently_contradicted_labels_first_and_changes_nothing(in_tmp):
    split = make_split(in_tmp / "artifacts/split", size=32)
    rng = np.random.default_rng(0)
    pool = {k: np.concatenate([load_split(split, n, "binary")[k] for n in ("train", "val")]) for k in ("path", "label")}
    wrong = np.array([3, 10, 40, 77])
    (in_tmp / "artifacts/train").mkdir(parents=True)
    np.savez(
        in_tmp / "artifacts/train/oof.npz",
        path=pool["path"],
        label=pool["label"],
        probability=scores(pool["label"], wrong, rng),
        fold=np.zeros(len(pool["path"]), np.int8),
    )
    test = load_split(split, "test", "binary")
    (in_tmp / "artifacts/evaluate").mkdir(parents=True)
    pd.DataFrame({"path": test["path"], "label": test["label"], "probability": scores(test["label"], [5], rng)}).to_csv(
        in_tmp / "artifacts/evaluate/test_predictions.csv", index=False
    )
    before = {p.name: p.read_bytes() for p in split.iterdir()}
    metrics = review(tiny_params())

    table = pd.read_csv(in_tmp / "artifacts/review/label_issues.csv", keep_default_na=False)
    pool_rows = table[table.set == "train+val"]
    assert set(pool_rows.path[pool_rows.flagged]) == set(pool["path"][wrong])
    assert pool_rows.flagged.iloc[:4].all() and pool_rows["rank"].tolist() == list(range(1, len(pool_rows) + 1))
    assert (pool_rows.label_quality.iloc[:4] < 0.05).all() and pool_rows.sha256.str.len().eq(64).all()
    assert table.path[(table.set == "test") & table.flagged].tolist() == [test["path"][5]]
    assert metrics["flagged"]["train_val"]["flagged"] == 4 and metrics["flagged"]["test"]["flagged"] == 1
    placement = metrics["threshold_placement"]
    test_p = pd.read_csv(in_tmp / "artifacts/evaluate/test_predictions.csv").probability.to_numpy()
    errors = np.flatnonzero((test_p >= placement["all"]["threshold"]).astype(int) != test["label"])
    assert metrics["test_errors"] == {"misclassified": len(errors), "flagged": int(5 in errors)}
    assert placement["without_flagged"]["threshold"] != placement["all"]["threshold"]
    assert json.loads((in_tmp / "metrics/review.json").read_text()) == metrics
    Image.open(in_tmp / "plots/review/label_issues.png").verify()  # a readable PNG
    assert {p.name: p.read_bytes() for p in split.iterdir()} == before  # nothing is relabelled
