"""Our recipe beside a public peer on a collection neither trained on: `detect-tumor` 0.1.1 (PyPI; a VGG16 in
ONNX, 240 px RGB, four classes whose names match a larger public four-class collection that, as far as we can
tell, holds no Kaggle 2018 tumor scans), run offline through its own `TumorDetector`, as a new user would.

Its P(tumor) is 1 - P(notumor). Both are scored on the same held-out images: the generalize stage's
predictions (`artifacts/generalize/predictions.csv`, the recipe trained without that collection) or any CSV
with path, label and p_tumor. Kaggle 2018 is the fair hold-out; the peer's training collection likely
contains Kaggle 2020's images, so its figures there are not out-of-collection. Figures: ROC AUC with 95 %
bootstrap intervals, their paired difference, and recall / specificity at the peer's own decision (argmax)
and at the best specificity that keeps recall at or above 0.95.

    pip install -e '.[peer]'
    python benchmarks/peer.py --predictions artifacts/generalize/predictions.csv --hold-out kaggle2018
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from braintumor.atomic import write_json
from braintumor.quality.evaluate import binary_metrics, threshold_for_recall


def peer_scores(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(P(tumor), called tumor by argmax) of `detect-tumor` for each image file."""
    from detect_tumor import TumorDetector

    detector = TumorDetector()
    p, called = [], []
    for path in tqdm(paths, desc="detect-tumor", unit="image"):
        result = detector.predict(path)
        p.append(1.0 - result.probabilities["notumor"] / 100.0)
        called.append(result.predicted_class != "notumor")
    return np.array(p), np.array(called)


def at_recall(y: np.ndarray, p: np.ndarray, recall: float) -> dict:
    """The operating point evaluate would place for `recall` (its best specificity there)."""
    threshold = threshold_for_recall(y, p, recall)
    scores = binary_metrics(y, p, threshold)
    return {"threshold": round(threshold, 6), "recall": scores["recall"], "specificity": scores["specificity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", default="artifacts/generalize/predictions.csv")
    parser.add_argument("--hold-out", default="kaggle2018")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--out", default="metrics/peer.json")
    args = parser.parse_args()
    ours = pd.read_csv(args.predictions)
    if "hold_out" in ours:
        ours = ours[ours.hold_out == args.hold_out]
    y, p_ours = ours.label.to_numpy(), ours.p_tumor.to_numpy()
    p_peer, called = peer_scores(ours.path.tolist())
    rng = np.random.default_rng(0)
    aucs = []
    while len(aucs) < args.resamples:
        rows = rng.integers(0, len(y), len(y))
        if y[rows].min() != y[rows].max():
            aucs.append([roc_auc_score(y[rows], p_ours[rows]), roc_auc_score(y[rows], p_peer[rows])])
    aucs = np.array(aucs)
    ci = lambda v: [round(float(q), 4) for q in np.percentile(v, [2.5, 97.5])]  # noqa: E731
    results = {
        "hold_out": args.hold_out,
        "images": len(y),
        "no_tumor": int((y == 0).sum()),
        "ours": {
            "roc_auc": round(roc_auc_score(y, p_ours), 4),
            "roc_auc_ci95": ci(aucs[:, 0]),
            "at_recall_0.95": at_recall(y, p_ours, 0.95),
        },
        "peer": {
            "roc_auc": round(roc_auc_score(y, p_peer), 4),
            "roc_auc_ci95": ci(aucs[:, 1]),
            "at_recall_0.95": at_recall(y, p_peer, 0.95),
            "at_argmax": {
                "recall": round(float(called[y == 1].mean()), 4),
                "specificity": round(float(1 - called[y == 0].mean()), 4),
            },
        },
        "ours_minus_peer_auc_ci95": ci(aucs[:, 0] - aucs[:, 1]),
    }
    write_json(args.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
