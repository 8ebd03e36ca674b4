"""The `evaluate` stage: choose the operating threshold out of fold, measure the test split, ship the model.

The decision threshold aims at `evaluate.target_recall` (a missed tumor is the costly error) with the best
specificity. The validation split alone holds too few healthy scans to place it, so the threshold comes
from the out-of-fold predictions the train stage saved: every train+val image scored by the fold model
that did not see it, i.e. by the members of the very ensemble that ships. The spread of the per-fold
thresholds is reported. Test metrics are given at the chosen threshold and at 0.5. The deployable copy of
the model, with the threshold in its `model.json`, is written to `models/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn import metrics as skm

from braintumor import paths
from braintumor.atomic import atomic_path, write_csv, write_json
from braintumor.data.datasets import load_split
from braintumor.model.inference import load_model, members_of, tumor_probability
from braintumor.params import validate_evaluate

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def threshold_for_recall(y: np.ndarray, p: np.ndarray, target_recall: float) -> float:
    """The highest threshold whose recall is at least `target_recall` (so the best specificity there)."""
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        raise ValueError("no tumor images to place the threshold on")
    needed = min(positives.size, math.ceil(target_recall * positives.size - 1e-9))
    return float(positives[needed - 1])


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, predicted, labels=[0, 1]).ravel()
    both = len(np.unique(y)) == 2
    result = {
        "accuracy": (tp + tn) / len(y),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "f1": skm.f1_score(y, predicted, zero_division=0),
        "roc_auc": skm.roc_auc_score(y, p) if both else float("nan"),
        "pr_auc": skm.average_precision_score(y, p) if both else float("nan"),
        "brier": skm.brier_score_loss(y, p),
        "tp": int(tp),
        "fn": int(fn),
        "tn": int(tn),
        "fp": int(fp),
    }
    return {k: (round(float(v), 4) if isinstance(v, float | np.floating) else v) for k, v in result.items()}


def bootstrap_intervals(y: np.ndarray, p: np.ndarray, threshold: float, resamples: int, seed: int) -> dict:
    """95 % percentile intervals of recall, specificity, accuracy and ROC AUC over `resamples` bootstrap resamples
    of the test set. With 30-odd healthy test scans, one scan moves specificity by about 3 points: the interval
    says how far apart two models must be before a difference means anything.

    Args:
        y: true labels (1 = tumor).
        p: P(tumor).
        threshold: the operating threshold.
        resamples: bootstrap resamples.
        seed: the bootstrap's seed.
    """
    rng = np.random.default_rng(seed)
    predicted = p >= threshold
    values = {"recall": [], "specificity": [], "accuracy": [], "roc_auc": []}
    for _ in range(resamples):
        pick = rng.integers(0, len(y), len(y))
        yy, pp = y[pick], predicted[pick]
        if (yy == 1).any():
            values["recall"].append(pp[yy == 1].mean())
        if (yy == 0).any():
            values["specificity"].append(1 - pp[yy == 0].mean())
        if 0 < yy.sum() < len(yy):
            values["roc_auc"].append(skm.roc_auc_score(yy, p[pick]))
        values["accuracy"].append((pp == yy).mean())
    return {
        name: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
        for name, v in values.items()
        if v
    }


def evaluate(
    params: dict,
    split_dir: str | Path = paths.SPLIT_DIR,
    train_dir: str | Path = paths.TRAIN_DIR,
    model_dir: str | Path = paths.MODEL_DIR,
    metrics_path: str | Path = paths.STAGE_METRICS["evaluate"],
    plots_dir: str | Path = paths.EVALUATE_PLOTS,
    predictions_path: str | Path = paths.TEST_PREDICTIONS,
) -> dict:
    """Run the evaluate stage (see the module docstring). The test predictions, one row an image, let
    `braintumor compare` set two experiments side by side on the same images.

    Args:
        params: the whole params.yaml.
        split_dir: the split stage's output (the test split).
        train_dir: the train stage's output (model and out-of-fold predictions).
        model_dir: where the deployable model and model.json go.
        metrics_path: the stage's metrics JSON.
        plots_dir: DVC plot data and the gallery.
        predictions_path: one row per test image.
    """
    config = validate_evaluate(params)
    train_dir, plots_dir = Path(train_dir), Path(plots_dir)
    info = json.loads((train_dir / "model.json").read_text())
    model = load_model(train_dir / "model.keras")
    names = info["class_names"]
    with np.load(train_dir / "oof.npz") as data:
        oof = {key: data[key] for key in data.files}
    target = config["target_recall"]
    placing = oof["fold"] >= 0  # fold -1: left out of training by `train.clean_learning`, so out of placement too
    threshold = threshold_for_recall(oof["label"][placing], oof["probability"][placing], target)
    folds = sorted(set(oof["fold"][placing].tolist()))
    fold_thresholds = [
        threshold_for_recall(oof["label"][oof["fold"] == f], oof["probability"][oof["fold"] == f], target)
        for f in folds
    ]

    test = load_split(split_dir, "test", info["task"])
    p = tumor_probability(model, test["x"], names)
    y = test["label"]
    chosen = binary_metrics(y, p, threshold)
    manifest = pd.read_csv(Path(split_dir) / "manifest.csv", keep_default_na=False)
    sources = manifest.set_index("path").loc[test["path"].astype(object), "source"].to_numpy()
    result = {
        "model_sha256": file_sha256(train_dir / "model.keras"),  # what register checks models/ against
        **{
            k: chosen[k] for k in ("recall", "accuracy", "specificity", "precision", "f1", "roc_auc", "pr_auc", "brier")
        },
        "threshold": round(threshold, 6),
        "test_images": len(y),
        "confusion": {k: chosen[k] for k in ("tp", "fn", "tn", "fp")},
        "ci95": bootstrap_intervals(y, p, threshold, config["bootstrap"], params["seed"]),
        "at_0.5": binary_metrics(y, p, 0.5),
        "threshold_selection": {
            "target_recall": target,
            "folds": len(folds),
            "images": int(placing.sum()),
            **({"left_out_by_clean_learning": int((~placing).sum())} if not placing.all() else {}),
            "fold_thresholds": [round(t, 6) for t in fold_thresholds],
            "fold_threshold_spread": round(max(fold_thresholds) - min(fold_thresholds), 6),
            "out_of_fold": {  # every train+val image as labelled, any left out of placement too
                k: v
                for k, v in binary_metrics(oof["label"], oof["probability"], threshold).items()
                if k in ("recall", "specificity", "accuracy", "roc_auc")
            },
        },
        "per_source": {
            source: binary_metrics(y[sources == source], p[sources == source], threshold)
            for source in sorted(set(sources))
        },
    }
    if info["task"] == "multiclass":
        probs = model.predict(test["x"].astype("float32"), verbose=0)
        result["multiclass_accuracy"] = round(float((probs.argmax(1) == test["y"]).mean()), 4)

    with atomic_path(model_dir) as staging:
        staging.mkdir()
        shutil.copy(train_dir / "model.keras", staging / "model.keras")
        (staging / "model.json").write_text(
            json.dumps(
                {
                    **info,
                    "model_sha256": result["model_sha256"],
                    "mirror_average": members_of(model)[1],
                    "threshold": threshold,
                    "target_recall": target,
                    "test_metrics": {k: result[k] for k in ("recall", "accuracy", "specificity", "roc_auc")},
                },
                indent=2,
            )
            + "\n"
        )
    write_csv(predictions_path, pd.DataFrame({"path": test["path"], "label": y, "probability": p}))
    write_json(metrics_path, result)
    write_plots(plots_dir, y, p, threshold, test["x"], test["path"], config["gallery"])
    log.info(
        "evaluate: threshold %.4f (folds %s); test recall %.4f, specificity %.4f, accuracy %.4f "
        "(at 0.5: %.4f / %.4f / %.4f)",
        threshold,
        result["threshold_selection"]["fold_thresholds"],
        result["recall"],
        result["specificity"],
        result["accuracy"],
        result["at_0.5"]["recall"],
        result["at_0.5"]["specificity"],
        result["at_0.5"]["accuracy"],
    )
    return result


def image_grid(count: int, width: float, height: float) -> tuple[plt.Figure, np.ndarray]:
    """A figure of `count` image cells (at least one), up to 8 a row, each `width` x `height` inches, axes off;
    returns it and its axes in reading order."""
    columns = max(1, min(8, count))
    rows = max(1, math.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes.ravel()


def write_plots(plots_dir: Path, y, p, threshold, images, paths, gallery: int) -> None:
    """DVC plot data (confusion, ROC, PR) and a gallery PNG of misclassified test images.

    Args:
        plots_dir: folder for the plot files.
        y: true labels of the test split.
        p: its P(tumor).
        threshold: the operating threshold.
        images: the test images.
        paths: their files.
        gallery: misclassified images to show.
    """
    label = np.array(["no_tumor", "tumor"])
    fpr, tpr, _ = skm.roc_curve(y, p)
    precision, recall, _ = skm.precision_recall_curve(y, p)
    with atomic_path(plots_dir) as staging:
        staging.mkdir()
        (staging / "confusion.json").write_text(
            json.dumps(
                [
                    {"actual": a, "predicted": b}
                    for a, b in zip(label[y], label[(p >= threshold).astype(int)], strict=True)
                ]
            )
        )
        (staging / "roc.json").write_text(
            json.dumps([{"fpr": round(float(f), 5), "tpr": round(float(t), 5)} for f, t in zip(fpr, tpr, strict=True)])
        )
        (staging / "pr.json").write_text(
            json.dumps(
                [
                    {"recall": round(float(r), 5), "precision": round(float(q), 5)}
                    for r, q in zip(recall, precision, strict=True)
                ]
            )
        )
        wrong = np.flatnonzero((p >= threshold).astype(int) != y)
        wrong = wrong[np.argsort(-np.abs(p[wrong] - threshold))][:gallery]
        fig, axes = image_grid(len(wrong), 1.8, 2.0)
        for ax, index in zip(axes, wrong, strict=False):  # more axes than images
            ax.imshow(images[index][..., 0], cmap="gray")
            ax.set_title(
                f"true {label[y[index]]}\nP(tumor)={p[index]:.2f}\n{Path(str(paths[index])).name[:18]}", fontsize=6
            )
        fig.suptitle(
            f"misclassified test images at threshold {threshold:.3f} ({len(wrong)} shown, most confident first)"
            if len(wrong)
            else "no misclassified test images",
            fontsize=8,
        )
        fig.tight_layout()
        fig.savefig(staging / "misclassified.png", dpi=110)
        plt.close(fig)
