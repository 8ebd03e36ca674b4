"""What a probability means: Platt scaling of the ensemble's score, calibration error, and the band of scores
around the threshold where the answer is "uncertain — read this one first".

The shipped score is an average of sigmoids, not a probability: a test scan at 0.30 is called a tumor (the
threshold sits near 0.28). Platt scaling (a logistic regression on the score's logit: two numbers, so the
~2,000 out-of-fold scores pin it down; isotonic regression would need many more per step and is not
monotone-strict) maps it to P(tumor) that matches how often such scans are tumors. It is monotone, so every
label stays what it was; only the numbers shown change. Evaluate fits it on the out-of-fold scores and
reports the out-of-fold figures cross-fitted (each fold calibrated by a fit on the others).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

EPSILON = 1e-6  # scores are clipped to [EPSILON, 1 - EPSILON] before their logit
BINS = 15  # equal-width bins of the expected calibration error and the reliability diagram


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPSILON, 1 - EPSILON)
    return np.log(p / (1 - p))


def fit_platt(y: np.ndarray, score: np.ndarray) -> dict:
    """{"method", "slope", "intercept"}: P(tumor) = sigmoid(slope * logit(score) + intercept)."""
    if len(np.unique(y)) < 2:
        raise ValueError("calibration needs both tumor and healthy scans")
    from sklearn.linear_model import LogisticRegression  # fitting only: serving needs no scikit-learn

    fit = LogisticRegression(C=np.inf).fit(logit(score)[:, None], y)
    return {"method": "platt", "slope": float(fit.coef_[0, 0]), "intercept": float(fit.intercept_[0])}


def calibrated(score: np.ndarray, calibration: dict | None) -> np.ndarray:
    """P(tumor) of raw scores under `calibration` (None: the scores as they are)."""
    if calibration is None:
        return np.asarray(score, dtype=np.float64)
    return expit(calibration["slope"] * logit(score) + calibration["intercept"])


def cross_fitted(y: np.ndarray, score: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Calibrated out-of-fold scores where each fold is calibrated by a fit on the other folds (an honest
    out-of-fold figure for a calibration fitted on all of them)."""
    out = np.empty(len(score))
    for fold in np.unique(folds):
        held = folds == fold
        out[held] = calibrated(score[held], fit_platt(y[~held], score[~held]))
    return out


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> float:
    """Mean |observed tumor rate − mean P(tumor)| over equal-width bins, weighted by the bins' shares."""
    which = np.minimum((np.asarray(p) * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        inside = which == b
        total += inside.mean() * abs(y[inside].mean() - p[inside].mean())
    return float(total)


def calibration_scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import brier_score_loss, log_loss

    clipped = np.clip(p, EPSILON, 1 - EPSILON)
    return {
        "ece": round(expected_calibration_error(y, p), 4),
        "nll": round(float(log_loss(y, clipped, labels=[0, 1])), 4),
        "brier": round(float(brier_score_loss(y, p)), 4),
    }


def paired_intervals(y: np.ndarray, raw: np.ndarray, fitted: np.ndarray, resamples: int, seed: int) -> dict:
    """95 % bootstrap intervals of each score before and after calibration, and of their difference
    (after − before) on the same resamples.

    Args:
        y: true labels.
        raw: the ensemble's scores.
        fitted: the calibrated probabilities of the same scans.
        resamples: bootstrap resamples.
        seed: the bootstrap's seed.
    """
    rng = np.random.default_rng(seed)
    draws = {f"{name}_{kind}": [] for name in ("ece", "nll", "brier") for kind in ("raw", "calibrated", "change")}
    for _ in range(resamples):
        pick = rng.integers(0, len(y), len(y))
        if len(np.unique(y[pick])) < 2:
            continue
        before, after = calibration_scores(y[pick], raw[pick]), calibration_scores(y[pick], fitted[pick])
        for name in ("ece", "nll", "brier"):
            draws[f"{name}_raw"].append(before[name])
            draws[f"{name}_calibrated"].append(after[name])
            draws[f"{name}_change"].append(after[name] - before[name])
    return {
        key: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
        for key, v in draws.items()
    }


def reliability(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per non-empty bin: mean P(tumor), observed tumor rate, scans (a reliability diagram's points)."""
    which = np.minimum((np.asarray(p) * bins).astype(int), bins - 1)
    return [
        {
            "predicted": round(float(p[which == b].mean()), 4),
            "observed": round(float(y[which == b].mean()), 4),
            "scans": int((which == b).sum()),
        }
        for b in np.unique(which)
    ]


def uncertain_band(y: np.ndarray, p: np.ndarray, threshold: float, error_share: float) -> tuple[float, float]:
    """(low, high): the band of P(tumor) around `threshold`, symmetric in logit, narrowest that holds
    `error_share` of the errors the threshold makes on (y, p)."""
    wrong = (p >= threshold).astype(int) != y
    if not wrong.any():
        return threshold, threshold
    margin = np.abs(logit(p) - logit(threshold))
    width = float(np.quantile(margin[wrong], error_share, method="higher"))
    centre = logit(threshold)[()]
    return float(expit(centre - width)), float(expit(centre + width))


def risk_coverage(y: np.ndarray, p: np.ndarray, threshold: float, points: int = 50) -> list[dict]:
    """Error rate among the scans answered (outside a band) against the share answered, as the band widens."""
    wrong = (p >= threshold).astype(int) != y
    margin = np.abs(logit(p) - logit(threshold))
    curve = []
    for width in np.quantile(margin, np.linspace(0, 0.95, points)):
        answered = margin > width
        curve.append(
            {
                "coverage": round(float(answered.mean()), 4),
                "risk": round(float(wrong[answered].mean()), 4) if answered.any() else 0.0,
            }
        )
    return curve
