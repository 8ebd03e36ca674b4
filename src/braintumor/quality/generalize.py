"""Leave-one-collection-out: how the training recipe does on a collection it never saw.

A random split scores a model on the scanners, protocols and curation of the images it trained on; the field's
honest figure is the score on a collection it never saw. For each hold-out (a source, or one sub-collection of a
source such as Kaggle 2020's `Testing/` folder), every cluster that it contains leaves the training pool — its
members too, wherever their copies came from — the train stage's k-fold recipe trains on the rest and places its
threshold out of fold at `evaluate.target_recall`, and the held-out images are scored at that threshold: all of
them, and the brain MR among them (what the product reads: with `fetch.modalities: [mr, ct, other]` the split
holds head CT too). The headline is the worst hold-out's ROC AUC on brain MR: what a user with another scanner
should expect at least.

It trains `generalize.folds` (default `train.folds`) models per hold-out, so it is not part of `dvc repro`: it is
the `generalize` stage of `benchmarks/dvc.yaml`, run with `dvc exp run benchmarks/dvc.yaml` (see the README).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from braintumor import paths
from braintumor.atomic import atomic_path, write_csv, write_json
from braintumor.data.datasets import load_splits
from braintumor.errors import ParamError
from braintumor.labels import MR
from braintumor.model.inference import average_of, tumor_probability
from braintumor.model.train import cross_validation_pool, fit_folds, output_names
from braintumor.params import SPLIT_NAMES, check_known, validate_evaluate, validate_train
from braintumor.quality.evaluate import binary_metrics, bootstrap_intervals, image_grid, threshold_for_recall

log = logging.getLogger(__name__)

# name -> (source, sub-collection or None for the whole source)
HOLD_OUTS = {"kaggle2018": ("kaggle2018", None), "kaggle2020_testing": ("kaggle2020", "Testing")}


def validate_generalize(params: dict) -> dict:
    """The `generalize` section, checked before any training starts."""
    check_known(params, "generalize")
    config = params.get("generalize")
    if not isinstance(config, dict):
        raise ParamError("params.yaml: the `generalize` section is missing")
    names = config.get("hold_outs")
    if not isinstance(names, list) or not names or not set(names) <= set(HOLD_OUTS):
        known = ", ".join(HOLD_OUTS)
        raise ParamError(f"params.yaml: `generalize.hold_outs` must list some of {known} (got {names!r})")
    folds = config.get("folds")
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= 10):
        raise ParamError(f"params.yaml: `generalize.folds` must be null (= train.folds) or 2..10 (got {folds!r})")
    gallery = config.get("gallery")
    if isinstance(gallery, bool) or not isinstance(gallery, int) or not 0 <= gallery <= 64:
        raise ParamError(f"params.yaml: `generalize.gallery` must be an integer 0..64 (got {gallery!r})")
    return config


def held_out(data: dict, source: str, collection: str | None) -> np.ndarray:
    """Rows of `data` from `source` (and its sub-collection `collection`, when given)."""
    rows = data["source"] == source
    return rows & (data["collection"] == collection) if collection else rows


def scored_rows(data: dict, name: str) -> np.ndarray:
    """Rows of `data` that hold-out `name` scores: its collection's images, one per dedup cluster."""
    return held_out(data, *HOLD_OUTS[name]) & data["representative"]


def every_image(split_dir: str | Path) -> dict[str, np.ndarray]:
    """All three splits as one set (binary task), the images left in their files until scored: a hold-out
    takes its images from each split."""
    return load_splits(split_dir, SPLIT_NAMES, "binary", lazy=True)


def leave_out(params: dict, split_dir: str | Path, name: str, verbose: int = 0) -> tuple[dict, pd.DataFrame]:
    """Train on the train+val pool without hold-out `name`'s clusters; score its images (representatives).
    Returns the metrics and one row per held-out image (path, label, P(tumor))."""
    train_config, evaluate_config = validate_train(params), validate_evaluate(params)
    source = HOLD_OUTS[name][0]
    everything = every_image(split_dir)
    target = {key: value[scored_rows(everything, name)] for key, value in everything.items()}
    mr_labels = target["label"][target["modality"] == MR]
    if not len(mr_labels) or mr_labels.min() == mr_labels.max():
        raise ParamError(f"hold-out {name}: needs tumor and healthy brain MR images of {source} in {split_dir}")
    pool = cross_validation_pool(split_dir, train_config["task"])
    keep = ~np.isin(pool["group"], target["group"])
    pool = {key: value[keep] for key, value in pool.items()}
    started = time.perf_counter()
    members, _, oof, _ = fit_folds(params, pool, verbose=verbose)
    seconds = time.perf_counter() - started
    threshold = threshold_for_recall(pool["label"][pool["representative"]], oof, evaluate_config["target_recall"])
    model = average_of(members, mirrored=train_config["mirror_average"])
    p = tumor_probability(model, target["x"], output_names(train_config))
    y, brain_mr = target["label"], target["modality"] == MR
    scores = held_out_scores(y, p, threshold, evaluate_config["bootstrap"], params["seed"])
    on_mr = held_out_scores(y[brain_mr], p[brain_mr], threshold, evaluate_config["bootstrap"], params["seed"])
    in_distribution = binary_metrics(pool["label"][pool["representative"]], oof, threshold)
    log.info(
        "generalize: %s held out (%d images, %d brain MR): ROC AUC %.4f on brain MR (%.4f on all), recall %.4f, "
        "specificity %.4f at %.3f (out of fold on the rest: AUC %.4f)",
        name,
        len(y),
        brain_mr.sum(),
        on_mr["roc_auc"],
        scores["roc_auc"],
        on_mr["recall"],
        on_mr["specificity"],
        threshold,
        in_distribution["roc_auc"],
    )
    metrics = {
        **scores,
        "threshold": round(threshold, 6),
        "brain_mr": on_mr,
        "not_brain_mr_share": {  # of each class: what the product would not read
            "tumor": round(float(1 - brain_mr[y == 1].mean()), 4),
            "no_tumor": round(float(1 - brain_mr[y == 0].mean()), 4),
        },
        "trained_on": int(keep.sum()),
        "trained_on_not_brain_mr": int((pool["modality"][pool["representative"]] != MR).sum()),
        "out_of_fold_on_the_rest": {k: in_distribution[k] for k in ("roc_auc", "recall", "specificity")},
        "train_seconds": round(seconds, 1),
    }
    rows = pd.DataFrame({"hold_out": name, "path": target["path"], "modality": target["modality"], "label": y})
    return metrics, rows.assign(p_tumor=np.round(p, 6), threshold=round(threshold, 6), image=list(range(len(y))))


def held_out_scores(y: np.ndarray, p: np.ndarray, threshold: float, resamples: int, seed: int) -> dict:
    """Counts, ROC AUC, recall, specificity and accuracy at `threshold` (and at 0.5), with bootstrap intervals."""
    scores = binary_metrics(y, p, threshold)
    return {
        "images": len(y),
        "tumor": int(y.sum()),
        "no_tumor": int((y == 0).sum()),
        **{k: scores[k] for k in ("roc_auc", "recall", "specificity", "accuracy")},
        "ci95": bootstrap_intervals(y, p, threshold, resamples, seed),
        "at_0.5": {k: v for k, v in binary_metrics(y, p, 0.5).items() if k in ("recall", "specificity", "accuracy")},
    }


def worst_errors(frame: pd.DataFrame, images: dict[str, np.ndarray], count: int, path: Path) -> None:
    """A gallery of the held-out images the recipe got most confidently wrong, over all hold-outs."""
    wrong = frame[(frame.p_tumor >= frame.threshold).astype(int) != frame.label]
    wrong = wrong.assign(margin=(wrong.p_tumor - wrong.threshold).abs()).nlargest(count, "margin")
    fig, axes = image_grid(len(wrong), 1.9, 2.5)  # three title lines above each image
    for ax, row in zip(axes, wrong.itertuples(), strict=False):
        ax.imshow(images[row.hold_out][row.image][..., 0], cmap="gray")
        truth = "tumor" if row.label else "no_tumor"
        ax.set_title(f"{row.hold_out}\ntrue {truth}, P={row.p_tumor:.2f}\n{Path(row.path).name[:18]}", fontsize=6)
    fig.suptitle(
        f"held-out collections: the {len(wrong)} most confident errors at each hold-out's threshold", fontsize=8
    )
    fig.tight_layout()
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=110, format="png")
    plt.close(fig)


def generalize(
    params: dict,
    split_dir: str | Path = paths.SPLIT_DIR,
    out_dir: str | Path = paths.GENERALIZE_DIR,
    metrics_path: str | Path = paths.GENERALIZE_METRICS,
    gallery_path: str | Path = paths.GENERALIZE_GALLERY,
) -> dict:
    """Run the generalize stage: every hold-out of `generalize.hold_outs`; returns its metrics.

    Args:
        params: the whole params.yaml (generalize, train, evaluate, seed).
        split_dir: the split stage's output.
        out_dir: where predictions.csv (one row per held-out image) goes.
        metrics_path: the stage's metrics JSON, headed by the worst hold-out.
        gallery_path: the gallery of the most confident errors.
    """
    config = validate_generalize(params)
    folds = config["folds"] or validate_train(params)["folds"]
    recipe = {**params, "train": {**params["train"], "folds": folds}}
    validate_train(recipe)
    validate_evaluate(recipe)
    results, frames = {}, []
    for name in config["hold_outs"]:
        results[name], rows = leave_out(recipe, split_dir, name)
        frames.append(rows)
    worst = min(results, key=lambda name: results[name]["brain_mr"]["roc_auc"])
    metrics = {
        "worst_roc_auc": results[worst]["brain_mr"]["roc_auc"],
        "worst_hold_out": worst,
        "folds": folds,
        **results,
    }
    predictions = pd.concat(frames, ignore_index=True)
    with atomic_path(out_dir) as staging:
        staging.mkdir()
        write_csv(staging / "predictions.csv", predictions.drop(columns="image"))
    everything = every_image(split_dir)
    images = {name: np.asarray(everything["x"][scored_rows(everything, name)]) for name in config["hold_outs"]}
    worst_errors(predictions, images, config["gallery"], Path(gallery_path))
    write_json(metrics_path, metrics)
    log.info("generalize: worst held-out collection %s, ROC AUC %.4f on brain MR", worst, metrics["worst_roc_auc"])
    return metrics
