"""The `review` stage: rank likely label errors for a person to decide on; never relabel anything itself.

Train+val images are ranked on their out-of-fold scores (the fold model that never saw them), the test split
on the shipped model's. Writes every ranked image with its label quality and cleanlab's flag to
`artifacts/review/label_issues.csv` (with the sha256 and source path an entry of the overrides file takes),
the flagged ones to a gallery, and to `metrics/review.json` what placing the threshold without the flagged
train+val images would do to the test figures: a measurement, not a change (`train.clean_learning` is the
opt-in that acts on the flags, judged by `dvc exp`).

The review loop (README "Reviewing labels"): look at the gallery, decide, and write the decisions into
`labels/overrides.csv`, which the fetch stage applies and records.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from braintumor import paths
from braintumor.atomic import atomic_path, write_csv, write_json
from braintumor.data.datasets import load_split, read_manifest
from braintumor.labels import collection_of
from braintumor.params import SPLIT_NAMES, validate_evaluate, validate_review
from braintumor.quality.evaluate import binary_metrics, image_grid, threshold_for_recall
from braintumor.quality.label_issues import label_issues

log = logging.getLogger(__name__)

COLUMNS = [
    "set",
    "rank",
    "flagged",
    "label_quality",
    "label",
    "p_tumor",
    "source",
    "collection",
    "original",
    "sha256",
    "path",
]


def ranked(name: str, paths: np.ndarray, labels: np.ndarray, p: np.ndarray, manifest: pd.DataFrame) -> pd.DataFrame:
    """One set's images, flagged ones first, each group from the least likely label up.

    Args:
        name: the set's name (train+val or test).
        paths: its image files.
        labels: their labels.
        p: their out-of-sample P(tumor).
        manifest: the split manifest (source and collection of each file).
    """
    flagged, quality = label_issues(labels, p)
    rows = manifest.loc[paths.astype(object)]
    frame = pd.DataFrame(
        {
            "set": name,
            "flagged": flagged,
            "label_quality": np.round(quality, 6),
            "label": labels,
            "p_tumor": np.round(p, 6),
            "source": rows.source.to_numpy(),
            "collection": [collection_of(s, o) for s, o in zip(rows.source, rows.original, strict=True)],
            "original": rows.original.to_numpy(),
            "sha256": rows.sha256.to_numpy(),
            "path": paths,
        }
    ).sort_values(["flagged", "label_quality", "path"], ascending=[False, True, True], kind="stable")
    return frame.assign(rank=np.arange(1, len(frame) + 1))[COLUMNS]


def review(
    params: dict,
    split_dir: str | Path = paths.SPLIT_DIR,
    train_dir: str | Path = paths.TRAIN_DIR,
    predictions_path: str | Path = paths.TEST_PREDICTIONS,
    out_dir: str | Path = paths.REVIEW_DIR,
    metrics_path: str | Path = paths.STAGE_METRICS["review"],
    gallery_path: str | Path = paths.REVIEW_GALLERY,
) -> dict:
    """Run the review stage; returns its metrics.

    Args:
        params: the whole params.yaml.
        split_dir: the split stage's output.
        train_dir: the train stage's output (out-of-fold predictions).
        predictions_path: evaluate's test predictions.
        out_dir: where the flagged-image tables go.
        metrics_path: the stage's metrics JSON.
        gallery_path: the gallery PNG.
    """
    config, target = validate_review(params), validate_evaluate(params)["target_recall"]
    manifest = read_manifest(Path(split_dir) / "manifest.csv").set_index("path")
    with np.load(Path(train_dir) / "oof.npz") as oof:
        pool = ranked("train+val", oof["path"], oof["label"], oof["probability"], manifest)
    test = pd.read_csv(predictions_path)
    tested = ranked("test", test.path.to_numpy(), test.label.to_numpy(), test.probability.to_numpy(), manifest)
    table = pd.concat([pool, tested], ignore_index=True)

    clean = pool[~pool.flagged]
    thresholds = {
        "all": threshold_for_recall(pool.label.to_numpy(), pool.p_tumor.to_numpy(), target),
        "without_flagged": threshold_for_recall(clean.label.to_numpy(), clean.p_tumor.to_numpy(), target),
    }
    y, p = test.label.to_numpy(), test.probability.to_numpy()
    wrong = set(test.path[(p >= thresholds["all"]).astype(int) != y])  # at the shipped model's threshold
    metrics = {
        "flagged": {
            name: {
                "images": int(len(part)),
                "flagged": int(part.flagged.sum()),
                "flagged_tumor": int((part.flagged & (part.label == 1)).sum()),
                "flagged_no_tumor": int((part.flagged & (part.label == 0)).sum()),
                "by_collection": {
                    "/".join(filter(None, key)): int(n)
                    for key, n in part[part.flagged].groupby(["source", "collection"]).size().items()
                },
            }
            for name, part in (("train_val", pool), ("test", tested))
        },
        "test_errors": {"misclassified": len(wrong), "flagged": int(tested.path[tested.flagged].isin(wrong).sum())},
        "threshold_placement": {  # what clean learning's threshold would do; the shipped one uses every image
            placed: {
                "threshold": round(threshold, 6),
                **{k: v for k, v in binary_metrics(y, p, threshold).items() if k in ("recall", "specificity")},
            }
            for placed, threshold in thresholds.items()
        },
    }
    with atomic_path(out_dir) as staging:
        staging.mkdir()
        write_csv(staging / "label_issues.csv", table)
    write_json(metrics_path, metrics)
    gallery(table[table.flagged], split_dir, config["gallery"], gallery_path)
    log.info(
        "review: cleanlab flags %d of %d train+val and %d of %d test images (%d of the %d test errors); a "
        "threshold placed without the flagged would be %.3f (test recall %.4f, specificity %.4f) instead of %.3f",
        metrics["flagged"]["train_val"]["flagged"],
        len(pool),
        metrics["flagged"]["test"]["flagged"],
        len(tested),
        metrics["test_errors"]["flagged"],
        metrics["test_errors"]["misclassified"],
        thresholds["without_flagged"],
        metrics["threshold_placement"]["without_flagged"]["recall"],
        metrics["threshold_placement"]["without_flagged"]["specificity"],
        thresholds["all"],
    )
    return metrics


def gallery(flagged: pd.DataFrame, split_dir: str | Path, count: int, path: str | Path) -> None:
    """The first `count` flagged images of each set, least likely label first, with what a reviewer needs."""
    picks = flagged.groupby("set", sort=False).head(count)
    images = {}
    for name in SPLIT_NAMES:  # read from the memory-mapped splits only the images shown
        data = load_split(split_dir, name, "binary", lazy=True)
        shown = np.flatnonzero(np.isin(data["path"], picks.path))
        images.update(zip(data["path"][shown], np.asarray(data["x"][shown]), strict=True))
    fig, axes = image_grid(len(picks), 1.9, 2.3)
    label = ("no_tumor", "tumor")
    for ax, row in zip(axes, picks.itertuples(), strict=False):  # more axes than images
        ax.imshow(images[row.path][..., 0], cmap="gray")
        ax.set_title(
            f"{row.set} #{row.rank}: labelled {label[row.label]}\nP(tumor)={row.p_tumor:.2f} "
            f"q={row.label_quality:.2f}\n{row.source} {row.sha256[:10]}",
            fontsize=5.5,
        )
    fig.suptitle(
        f"likely label errors (cleanlab), {len(picks)} shown; decide each in labels/overrides.csv (sha256)"
        if len(picks)
        else "cleanlab flags no image",
        fontsize=8,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
