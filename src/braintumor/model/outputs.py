"""What the shipped model's outputs mean, without Keras: shared by training, evaluation and every runtime that
serves the model (Keras or ONNX Runtime)."""

from __future__ import annotations

import math

import numpy as np

from braintumor.errors import ModelLoadError
from braintumor.labels import BINARY_CLASSES, MULTICLASS_CLASSES

# Images converted to float32 at a time when predicting (a multiple of the batch size, so the batches, and the
# results, are those of one call over all of them): 1024 at 96 px is 113 MB, whatever the number of images.
PREDICT_CHUNK = 1024


def tumor_probability_of(outputs: np.ndarray, class_names: list[str]) -> np.ndarray:
    """P(tumor) from the model's outputs: the sigmoid unit, or 1 - P(no_tumor) for the multiclass head."""
    return outputs[:, 0] if outputs.shape[1] == 1 else 1.0 - outputs[:, class_names.index("no_tumor")]


def check_description(info: dict, where: str) -> dict:
    """`info` (model.json, or the MLflow model's metadata) when it holds what inference needs: an image size,
    a threshold that is a probability, known class names; else a `ModelLoadError` naming the field. Checks
    against the network itself follow where the network is loaded (`inference.check_model_info`,
    `onnx_scorer.OnnxScorer`)."""
    size = info.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 1024:
        raise ModelLoadError(f"{where}: `image_size` must be an integer between 32 and 1024 (got {size!r})")
    threshold = info.get("threshold")
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0)
    ):
        raise ModelLoadError(f"{where}: `threshold` must be a probability between 0 and 1 (got {threshold!r})")
    names = info.get("class_names")
    if names not in (BINARY_CLASSES, MULTICLASS_CLASSES):
        raise ModelLoadError(f"{where}: `class_names` must be {BINARY_CLASSES} or {MULTICLASS_CLASSES} (got {names!r})")
    return info
