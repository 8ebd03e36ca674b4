"""Leave-one-source-out evaluation: how a model trained without a collection does on that collection.

A random split scores a model on the scanners, protocols and curation of the images it trained on; the field's
honest figure is the score on a collection it never saw. For each hold-out (a source, or one sub-collection of a
source such as Kaggle 2020's `Testing/` folder), every cluster that it contains leaves the training pool — its
members too, wherever their copies came from — the train stage's k-fold recipe trains on the rest and places its
threshold out of fold at `evaluate.target_recall`, and the held-out images are scored at that threshold.

It trains `train.folds` models per hold-out, so it is not a stage of `dvc repro`: run it with
`python benchmarks/leave_one_source_out.py` (see there); `metrics/generalization.json` is listed in dvc.yaml's
top-level metrics, so `dvc exp show` shows it beside the pipeline's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from braintumor.data.datasets import load_splits
from braintumor.model.inference import average_of, tumor_probability
from braintumor.model.train import cross_validation_pool, fit_folds, output_names
from braintumor.params import SPLIT_NAMES, validate_evaluate, validate_train
from braintumor.quality.evaluate import binary_metrics, bootstrap_intervals, threshold_for_recall

log = logging.getLogger(__name__)

# name -> (source, sub-collection or None for the whole source)
HOLD_OUTS = {"kaggle2018": ("kaggle2018", None), "kaggle2020_testing": ("kaggle2020", "Testing")}


def held_out(data: dict, source: str, collection: str | None) -> np.ndarray:
    """Rows of `data` from `source` (and its sub-collection `collection`, when given)."""
    rows = data["source"] == source
    return rows & (data["collection"] == collection) if collection else rows


def every_image(split_dir: str | Path) -> dict[str, np.ndarray]:
    """All three splits as one set (binary task), the images left in their files until scored: a hold-out
    takes its images from each split."""
    return load_splits(split_dir, SPLIT_NAMES, "binary", lazy=True)


def leave_out(params: dict, split_dir: str | Path, name: str, verbose: int = 0) -> dict:
    """Train on the train+val pool without hold-out `name`'s clusters; score its images (representatives)."""
    train_config, evaluate_config = validate_train(params), validate_evaluate(params)
    source, collection = HOLD_OUTS[name]
    everything = every_image(split_dir)
    target_rows = held_out(everything, source, collection) & everything["representative"]
    target = {key: value[target_rows] for key, value in everything.items()}
    if not len(target["y"]) or target["label"].min() == target["label"].max():
        raise ValueError(f"hold-out {name}: needs tumor and healthy images of {source} in {split_dir}")
    pool = cross_validation_pool(split_dir, train_config["task"])
    keep = ~np.isin(pool["group"], target["group"])
    pool = {key: value[keep] for key, value in pool.items()}
    started = time.perf_counter()
    members, _, oof, _ = fit_folds(params, pool, verbose=verbose)
    seconds = time.perf_counter() - started
    threshold = threshold_for_recall(pool["label"][pool["representative"]], oof, evaluate_config["target_recall"])
    model = average_of(members, mirrored=train_config["mirror_average"])
    p = tumor_probability(model, target["x"], output_names(train_config))
    y = target["label"]
    scores = binary_metrics(y, p, threshold)
    in_distribution = binary_metrics(pool["label"][pool["representative"]], oof, threshold)
    log.info(
        "generalization: %s held out (%d images): ROC AUC %.4f, recall %.4f, specificity %.4f at %.3f "
        "(out of fold on the rest: AUC %.4f)",
        name,
        len(y),
        scores["roc_auc"],
        scores["recall"],
        scores["specificity"],
        threshold,
        in_distribution["roc_auc"],
    )
    return {
        "images": len(y),
        "tumor": int(y.sum()),
        "no_tumor": int((y == 0).sum()),
        **{k: scores[k] for k in ("roc_auc", "recall", "specificity", "accuracy")},
        "threshold": round(threshold, 6),
        "ci95": bootstrap_intervals(y, p, threshold, evaluate_config["bootstrap"], params["seed"]),
        "at_0.5": {k: v for k, v in binary_metrics(y, p, 0.5).items() if k in ("recall", "specificity", "accuracy")},
        "trained_on": int(keep.sum()),
        "out_of_fold_on_the_rest": {k: in_distribution[k] for k in ("roc_auc", "recall", "specificity")},
        "train_seconds": round(seconds, 1),
    }
