"""`braintumor compare A B`: is experiment B really better than A, or is the difference noise?

With 30-odd healthy test scans one scan moves specificity by 3.3 points, so two experiments' figures side by
side in `dvc exp show` cannot tell a gain from luck. Both were scored on the same images (the same test split,
the same train+val pool out of fold), so the difference is measured pairwise: the images are resampled with
replacement, and on each resample both models' recall, specificity (each at its own threshold) and ROC AUC
are computed on the same images; the 2.5th and 97.5th percentiles of B − A are the 95 % interval of the
difference. An interval that holds 0 says the data cannot tell the two apart.

Where both revisions ran the leave-one-collection-out stage (`dvc exp run benchmarks/dvc.yaml`), each collection
both held out is compared the same way, each side at its own hold-out threshold: the figure a recipe change is
meant to move, on the images the two recipes never trained on.

A and B are anything `dvc.api` reads: an experiment name, a git revision, or `workspace` for the working tree.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from braintumor import paths
from braintumor.errors import CompareError

METRICS = ("recall", "specificity", "roc_auc")
HELD_OUT_PREDICTIONS = f"{paths.GENERALIZE_DIR}/predictions.csv"  # written by quality/generalize.py
WORKSPACE = "workspace"


def read(path: str, rev: str, mode: str = "r", missing_ok: bool = False):
    """The file at `path` in revision `rev`; None for a path that revision never had, when `missing_ok`."""
    import dvc.api
    from dvc.exceptions import PathMissingError

    try:
        return dvc.api.read(path, rev=None if rev == WORKSPACE else rev, mode=mode)
    except PathMissingError:
        if missing_ok:
            return None
        raise CompareError(f"{rev}: has no {path}; run `dvc repro` there") from None
    except Exception as err:  # noqa: BLE001 - dvc raises many kinds; the user needs the path and the revision
        raise CompareError(
            f"{rev}: cannot read {path} ({type(err).__name__}: {err}); run `dvc repro` there, or `dvc pull` its outputs"
        ) from err


def predictions(rev: str) -> dict:
    """The per-image scores of revision `rev`: its test predictions and out-of-fold predictions (path, label,
    probability), and the threshold evaluate placed (unrounded, as the shipped model.json holds it)."""
    shipped = json.loads(read(paths.MODEL_INFO, rev))
    test = pd.read_csv(io.StringIO(read(paths.TEST_PREDICTIONS, rev)))
    with np.load(io.BytesIO(read(paths.OUT_OF_FOLD, rev, mode="rb"))) as oof:
        out_of_fold = pd.DataFrame({"path": oof["path"], "label": oof["label"], "probability": oof["probability"]})
    return {"threshold": float(shipped["threshold"]), "test": test, "out_of_fold": out_of_fold}


def held_out_predictions(rev: str) -> pd.DataFrame | None:
    """Revision `rev`'s leave-one-collection-out scores (hold_out, path, label, p_tumor, threshold), or None
    when it never ran that stage."""
    text = read(HELD_OUT_PREDICTIONS, rev, missing_ok=True)
    return None if text is None else pd.read_csv(io.StringIO(text))


def held_out_differences(a: pd.DataFrame, b: pd.DataFrame, resamples: int, seed: int) -> dict:
    """`paired_difference` on each collection that both A's and B's generalize runs held out."""
    out = {}
    for name in sorted(set(a.hold_out) & set(b.hold_out)):
        sides = [frame[frame.hold_out == name].rename(columns={"p_tumor": "probability"}) for frame in (a, b)]
        thresholds = [float(side.threshold.iloc[0]) for side in sides]
        columns = ["path", "label", "probability"]
        out[name] = paired_difference(
            sides[0][columns], sides[1][columns], *thresholds, resamples, seed, f"held out {name}"
        )
    return out


def scores(y: np.ndarray, p: np.ndarray, threshold: float) -> np.ndarray:
    """(recall, specificity, ROC AUC) of scores `p` at `threshold`; NaN where a class is missing."""
    predicted = p >= threshold
    tumors, healthy = y == 1, y == 0
    recall = predicted[tumors].mean() if tumors.any() else np.nan
    specificity = 1 - predicted[healthy].mean() if healthy.any() else np.nan
    auc = roc_auc_score(y, p) if tumors.any() and healthy.any() else np.nan
    return np.array([recall, specificity, auc])


def paired_difference(
    a: pd.DataFrame, b: pd.DataFrame, threshold_a: float, threshold_b: float, resamples: int, seed: int, where: str
) -> dict:
    """Each metric of A and B on the same images, B − A, and the paired bootstrap 95 % interval of B − A.

    Args:
        a: experiment A's test predictions (path, label, p_tumor).
        b: experiment B's, on the same images.
        threshold_a: A's operating threshold.
        threshold_b: B's.
        resamples: bootstrap resamples.
        seed: the bootstrap's seed.
        where: names the compared set in errors.
    """
    joined = a.merge(b, on="path", suffixes=("_a", "_b"), validate="one_to_one")
    if len(joined) != len(a) or len(joined) != len(b) or (joined.label_a != joined.label_b).any():
        raise CompareError(
            f"{where}: the two revisions scored other images or labels ({len(a)} and {len(b)} "
            f"images, {len(joined)} in common); compare experiments on the same data"
        )
    y = joined.label_a.to_numpy()
    pa, pb = joined.probability_a.to_numpy(), joined.probability_b.to_numpy()
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        pick = rng.integers(0, len(y), len(y))
        draws.append(scores(y[pick], pb[pick], threshold_b) - scores(y[pick], pa[pick], threshold_a))
    draws = np.array(draws)
    point_a, point_b = scores(y, pa, threshold_a), scores(y, pb, threshold_b)
    return {
        name: {
            "a": round(float(point_a[k]), 4),
            "b": round(float(point_b[k]), 4),
            "difference": round(float(point_b[k] - point_a[k]), 4),
            "ci95": [round(float(q), 4) for q in np.nanpercentile(draws[:, k], [2.5, 97.5])],
        }
        for k, name in enumerate(METRICS)
    } | {"images": int(len(y)), "healthy": int((y == 0).sum())}


def compare(rev_a: str, rev_b: str, resamples: int = 2000, seed: int = 0) -> dict:
    """The paired comparison of two revisions on the test split and out of fold."""
    a, b = predictions(rev_a), predictions(rev_b)
    held_a, held_b = held_out_predictions(rev_a), held_out_predictions(rev_b)
    both_held_out = held_a is not None and held_b is not None
    return {
        "a": rev_a,
        "b": rev_b,
        "resamples": resamples,
        **{
            where: paired_difference(a[where], b[where], a["threshold"], b["threshold"], resamples, seed, where)
            for where in ("test", "out_of_fold")
        },
        "held_out": held_out_differences(held_a, held_b, resamples, seed) if both_held_out else {},
    }


def table(result: dict) -> str:
    """A markdown table of `compare`'s result."""
    lines = [
        f"B = {result['b']} against A = {result['a']} (paired bootstrap, {result['resamples']} resamples)",
        "",
        "| images | metric | A | B | B − A | 95 % interval of B − A |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    parts = {where: result[where] for where in ("test", "out_of_fold")}
    parts |= {f"held out {name}": part for name, part in result["held_out"].items()}
    for where, part in parts.items():
        for name in METRICS:
            m = part[name]
            lines.append(
                f"| {where} ({part['images']}, {part['healthy']} healthy) | {name} | {m['a']:.4f} | "
                f"{m['b']:.4f} | {m['difference']:+.4f} | {m['ci95'][0]:+.4f} to {m['ci95'][1]:+.4f} |"
            )
    if not result["held_out"]:
        lines.append("")
        lines.append("No collection held out by both (`dvc exp run benchmarks/dvc.yaml` in each) to compare.")
    return "\n".join(lines)
