"""Likely label errors, by confident learning (cleanlab) on held-out probabilities.

Kept apart from the stages, so that the review stage (which ranks the issues for a person) and the train
stage's opt-in clean learning (`train.clean_learning`) flag exactly the same images. The scores must be
held out — out-of-fold for train+val, the shipped model's for the test split — or the model's memory of the
labels hides their errors.
"""

from __future__ import annotations

import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores


def label_issues(labels: np.ndarray, p_tumor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, label quality) per image: cleanlab's default filter (prune by noise rate) and its
    self-confidence score, the probability the scores give the image's own label (low = suspect)."""
    labels = np.asarray(labels, dtype=np.int64)
    p = np.clip(np.asarray(p_tumor, dtype=np.float64), 0.0, 1.0)
    pred_probs = np.column_stack([1.0 - p, p])
    if len(labels) < 2 or labels.min() == labels.max():  # confident learning needs both classes
        return np.zeros(len(labels), dtype=bool), get_label_quality_scores(labels, pred_probs)
    return find_label_issues(labels, pred_probs), get_label_quality_scores(labels, pred_probs)
