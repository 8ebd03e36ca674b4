"""What the shipped ensemble's size buys, and what it costs at the point of use: the figures for a decision.

Serving spends most of its CPU in the network: 5 fold models x 2 views (the image and its mirror) a scan. This
scores smaller ensembles cut from the shipped one, each exactly as `evaluate` scores the shipped one:
- out of fold: each fold model on the fold it was held out from (on both views where the variant mirrors), the
  threshold at `evaluate.target_recall`, specificity there;
- test split: the variant's P(tumor), recall / specificity at that threshold, ROC AUC, and the paired bootstrap
  interval of its AUC and specificity minus the shipped ensemble's (same images);
- speed: the variant's scoring graph exported as evaluate exports it, in ONNX Runtime as the server runs it (one
  thread a call): images/s at batch 1, and two calls side by side at batch 8.

    python benchmarks/ensemble_cost.py [--model models/model.keras] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from onnx_graph import images_per_s, onnx_scorer  # benchmarks/ is on the path of a script run from it
from sklearn.metrics import roc_auc_score

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def paired(y: np.ndarray, p: np.ndarray, base: np.ndarray, t: float, t_base: float, resamples: int) -> dict:
    """95 % bootstrap intervals (over test images) of AUC and specificity, variant minus shipped."""
    rng = np.random.default_rng(0)
    auc, spec = [], []
    for _ in range(resamples):
        rows = rng.integers(0, len(y), len(y))
        yy = y[rows]
        if yy.min() == yy.max():
            continue
        auc.append(roc_auc_score(yy, p[rows]) - roc_auc_score(yy, base[rows]))
        healthy = yy == 0
        spec.append((p[rows][healthy] < t).mean() - (base[rows][healthy] < t_base).mean())
    return {name: np.percentile(v, [2.5, 97.5]).round(3).tolist() for name, v in (("auc", auc), ("spec", spec))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/model.keras")
    parser.add_argument("--split-dir", default="artifacts/split")
    parser.add_argument("--oof", default="artifacts/train/oof.npz")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()

    from braintumor.data.datasets import load_split
    from braintumor.model.inference import average_of, inference_graph, load_model, members_of, tumor_probability
    from braintumor.model.scoring import export_onnx, scoring_model
    from braintumor.model.train import cross_validation_pool
    from braintumor.params import load_params
    from braintumor.quality.evaluate import binary_metrics, threshold_for_recall

    target = load_params()["evaluate"]["target_recall"]
    members, _ = members_of(inference_graph(load_model(args.model)))
    names = ["no_tumor", "tumor"]
    with np.load(args.oof) as data:
        oof = {key: data[key] for key in data.files}
    pool = cross_validation_pool(args.split_dir, "binary")
    where = {path: row for row, path in enumerate(pool["path"])}
    rows = np.array([where[path] for path in oof["path"]])
    test = load_split(args.split_dir, "test", "binary")
    y = test["label"]

    variants = {
        f"{len(members)} fold models x 2 views (shipped)": (members, True),
        f"{len(members)} fold models, no mirror": (members, False),
        "3 fold models x 2 views": (members[:3], True),
        "3 fold models, no mirror": (members[:3], False),
    }
    shipped = None
    for label, (chosen, mirrored) in variants.items():
        placing = np.zeros(len(oof["fold"]), bool)
        held = np.full(len(oof["fold"]), np.nan)
        for k, member in enumerate(chosen):
            fold = oof["fold"] == k
            one = average_of([member], mirrored=True) if mirrored else member
            held[fold] = tumor_probability(one, pool["x"][rows[fold]], names)
            placing |= fold
        threshold = threshold_for_recall(oof["label"][placing], held[placing], target)
        out_of_fold = binary_metrics(oof["label"][placing], held[placing], threshold)
        ensemble = average_of(chosen, mirrored) if (mirrored or len(chosen) > 1) else chosen[0]
        p = tumor_probability(ensemble, test["x"], names)
        on_test = binary_metrics(y, p, threshold)
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "scoring.onnx"
            export_onnx(scoring_model(ensemble, with_features=True), path)
            run = onnx_scorer(path, test["x"].shape[1], 1).predict_on_batch
            x = np.asarray(test["x"][:8], dtype="float32")
            one_a_call = images_per_s(run, x[:1], args.seconds)
            two_calls = images_per_s(run, x, args.seconds, callers=2)
        line = (
            f"{label}: threshold {threshold:.4f}; out of fold ({placing.sum()} images) specificity "
            f"{out_of_fold['specificity']:.3f} at recall {out_of_fold['recall']:.3f}; test recall "
            f"{on_test['recall']:.3f}, specificity {on_test['specificity']:.3f}, AUC {on_test['roc_auc']:.4f}; "
            f"ONNX Runtime, one thread: batch 1 {one_a_call:.0f} images/s, two calls of 8 side by side "
            f"{two_calls:.0f} images/s"
        )
        if shipped is None:
            shipped = (p, threshold)
        else:
            interval = paired(y, p, shipped[0], threshold, shipped[1], args.resamples)
            line += f"; minus shipped: test AUC {interval['auc']}, test specificity {interval['spec']} (95 %)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
