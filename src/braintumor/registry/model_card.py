"""The model card attached to every registered model version: what the model saw, how it scored, what it is for."""

from __future__ import annotations

import json
from pathlib import Path

from braintumor import paths


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def site_table(sites: dict) -> str:
    """The test figures of each site with scans in the test split (`data/site-<name>/`), at the threshold."""
    if not sites:
        return ""
    rows = "\n".join(
        f"| {name} | {s['images']} | {s['recall']:.4f} | {s['specificity']:.4f} | {s['roc_auc']:.4f} |"
        for name, s in sites.items()
    )
    return f"""
### Per site (its own scans in the test split; register will not give up a site's recall silently)
| site | test images | recall | specificity | ROC AUC |
| --- | --- | --- | --- | --- |
{rows}
"""


def model_card(
    model_dir: Path = Path(paths.MODEL_DIR), metrics_dir: Path = Path(paths.METRICS_DIR), fingerprint: str = ""
) -> str:
    """Markdown built from the pipeline's own outputs (models/model.json and metrics/*.json)."""
    info = _read(model_dir / "model.json")
    fetched, dedup, split = (_read(metrics_dir / f"{name}.json") for name in ("fetch", "dedup", "split"))
    result, training = _read(metrics_dir / "evaluate.json"), _read(metrics_dir / "train.json")
    ci = result.get("ci95", {})
    at_half = result.get("at_0.5", {})

    def interval(name: str) -> str:
        low, high = ci.get(name, (float("nan"), float("nan")))
        return f"{result.get(name, float('nan')):.4f} (95 % CI {low:.4f}–{high:.4f})"

    sources = "\n".join(
        f"| {name} | {counts.get('images', 0)} | {counts.get('tumor', 0)} | {counts.get('no_tumor', 0)} | "
        f"{dedup.get('per_source', {}).get(name, {}).get('images_out', 0)} |"
        for name, counts in fetched.get("per_source", {}).items()
    )
    splits = "\n".join(
        f"| {name} | {s['images']} | {s['tumor']} | {s['no_tumor']} |" for name, s in split.get("per_split", {}).items()
    )
    selection = result.get("threshold_selection", {})
    mirrored = (
        " on the image and on its left-right mirror (test-time augmentation)" if info.get("mirror_average") else ""
    )
    subtypes = (
        ", which is 1 − P(no tumor) of a four-way head that also learnt the tumor type (glioma, meningioma, "
        "pituitary) where the source gives it"
        if info.get("subtypes")
        else ""
    )
    return f"""# Brain-tumor MRI classifier: {info.get("model", "?")} ({info.get("task", "?")})

> **Not a diagnostic device.** A research model trained on public Kaggle MRI collections. It must not be used
> to diagnose, triage or rule out disease; every output needs review by a qualified radiologist.

## Intended use
Flags 2-D brain MRI slices (JPEG/PNG, any size, grayscale or colour) that probably show a tumor, for research,
teaching and pipeline development. Input: the image, converted to grayscale, cropped to its content, padded
square and resized to {info.get("image_size", "?")}×{info.get("image_size", "?")}
(`braintumor.data.images.model_input`).
Output: P(tumor){subtypes}; the label is *tumor* when P(tumor) ≥ the threshold below. Out of scope: 3-D volumes,
non-brain images, paediatric scans, any modality or scanner unlike the training sources.

## Data
Data fingerprint `{fingerprint}` (pixel digests, labels and split of the deduplicated images).

| source | fetched | tumor | no tumor | kept after dedup |
| --- | --- | --- | --- | --- |
{sources}

Deduplication (pHash ≤ {dedup.get("thresholds", {}).get("phash", "?")} and dHash ≤
{dedup.get("thresholds", {}).get("dhash", "?")} of {dedup.get("thresholds", {}).get("hash_size", 16) ** 2} bits):
{dedup.get("images_in", "?")} images in, {dedup.get("exact_duplicates", "?")} exact and
{dedup.get("near_duplicates", "?")} near duplicates removed ({dedup.get("cross_source_duplicates", "?")} across
sources), {dedup.get("label_conflicts", "?")} label conflicts dropped, {dedup.get("images_out", "?")} kept.

Group-aware split (no near-duplicate in two splits; leakage test in train: {split.get("leakage", {})}):

| split | images | tumor | no tumor |
| --- | --- | --- | --- |
{splits}

## Test metrics ({result.get("test_images", "?")} held-out images)
Threshold **{result.get("threshold", float("nan")):.6f}**, placed on out-of-fold predictions for tumor recall
{selection.get("target_recall", "?")} (fold thresholds {selection.get("fold_thresholds", "?")}).

| metric | at the threshold | at 0.5 |
| --- | --- | --- |
| recall (sensitivity) | {interval("recall")} | {at_half.get("recall", float("nan")):.4f} |
| accuracy | {interval("accuracy")} | {at_half.get("accuracy", float("nan")):.4f} |
| specificity | {interval("specificity")} | {at_half.get("specificity", float("nan")):.4f} |
| precision | {result.get("precision", float("nan")):.4f} | {at_half.get("precision", float("nan")):.4f} |
| ROC AUC | {interval("roc_auc")} | |
| PR AUC | {result.get("pr_auc", float("nan")):.4f} | |
| Brier score | {result.get("brier", float("nan")):.4f} | |
{site_table(result.get("per_site", {}))}
## Training
The mean of {training.get("folds", "?")} {info.get("model", "?")} models{mirrored}, each trained on the other
folds of train+val and early-stopped on its own, with Keras {info.get("keras_version", "?")} on the
{info.get("keras_backend", "?")} backend: epochs per fold {[m.get("epochs_run") for m in training.get("members", [])]}
(best {[m.get("best_epoch") for m in training.get("members", [])]}), {training.get("params", "?")} parameters in
all, class weights {training.get("class_weight", {})}, out-of-fold ROC AUC {training.get("out_of_fold_auc", "?")}.

## Limitations
The healthy class is small (about one scan in eight after deduplication), so specificity has wide
uncertainty. The sources are public collections of unknown scanners and protocols, with JPEG artefacts;
performance on clinical data is unknown.
"""
