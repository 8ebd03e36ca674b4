"""How much of the class the model input's intensities alone give away: a shortcut probe.

A logistic regression sees nothing of an image but its head's 32-bin intensity histogram, the head's mean,
spread and area (no spatial information at all). In these public sets the classes come from different
sources, scanners and sequences, so it separates tumor from healthy far better than chance in distribution
(5-fold, grouped by dedup cluster) and falls to chance on a collection it never saw: what it learns is the
collection. The probe runs on the model input as it reaches the network's first layer: the raw 0..255 arrays
(the baseline) and the same arrays after `HeadStandardization` (`train.standardize`). The closer the
in-distribution AUC gets to 0.5, the less of the shortcut the input still offers.

    python benchmarks/histogram_probe.py            # after `dvc repro split`; writes metrics/histogram_probe.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from braintumor.atomic import write_json
from braintumor.data.images import foreground
from braintumor.model.intensity import HeadStandardization
from braintumor.params import SPLIT_NAMES
from braintumor.quality.generalize import HOLD_OUTS, every_image, held_out

BINS = 32


def features(images: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Per image: the head's 32-bin histogram (shares), mean, standard deviation and area share."""
    rows = []
    for gray, mask in zip(images, head, strict=True):
        pixels = gray[mask] if mask.any() else gray.ravel()
        share = np.histogram(pixels, bins=BINS, range=(0, 256))[0] / pixels.size
        rows.append([*share, pixels.mean() / 255, pixels.std() / 255, mask.mean()])
    return np.asarray(rows)


def probe(x: np.ndarray, y: np.ndarray, group: np.ndarray, sources: dict[str, np.ndarray], seed: int) -> dict:
    """5-fold grouped AUC of the probe, and its AUC on each held-out collection when trained on the rest."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    folds = StratifiedGroupKFold(5, shuffle=True, random_state=seed)
    p = cross_val_predict(model, x, y, groups=group, cv=folds, method="predict_proba")[:, 1]
    result = {"in_distribution_auc": round(roc_auc_score(y, p), 4)}
    for name, rows in sources.items():
        fitted = model.fit(x[~rows], y[~rows])
        result[f"{name}_held_out_auc"] = round(roc_auc_score(y[rows], fitted.predict_proba(x[rows])[:, 1]), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split-dir", default="artifacts/split")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="metrics/histogram_probe.json")
    args = parser.parse_args()
    data = every_image(args.split_dir)
    reps = data["representative"]
    raw = np.asarray(data["x"])[reps]
    y, group = data["label"][reps], data["group"][reps]
    sources = {name: held_out(data, *HOLD_OUTS[name])[reps] for name in sorted(HOLD_OUTS)}
    standardized = np.concatenate(
        [np.asarray(HeadStandardization()(raw[i : i + 256].astype("float32"))) for i in range(0, len(raw), 256)]
    )
    inputs = {
        "raw": features(raw[..., 0], np.stack([foreground(g) for g in raw[..., 0]])),
        "standardized": features(standardized[..., 0], standardized[..., 0] > 0),
    }
    results = {name: probe(x, y, group, sources, args.seed) for name, x in inputs.items()}
    excess = {name: r["in_distribution_auc"] - 0.5 for name, r in results.items()}
    results["images"] = int(len(y))
    results["splits"] = list(SPLIT_NAMES)
    results["standardized_over_raw_excess_auc"] = round(excess["standardized"] / excess["raw"], 3)
    write_json(args.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
