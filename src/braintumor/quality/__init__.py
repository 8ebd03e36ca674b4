"""Judging a trained model: evaluation, explanations, label review, unseen-collection figures, comparisons."""
