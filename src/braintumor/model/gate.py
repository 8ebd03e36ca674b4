"""The out-of-distribution gate: refuse to read what does not look like the brain MR slices the model learnt.

A classifier gives every input a P(tumor), a photograph as readily as a scan. The gate measures how far an
image's features lie from the training images' features, per fold model: the mean and spread over space of
every residual block's output and of the last convolutional features, each group ℓ2-normalised, and its
Mahalanobis distance to the nearer class mean under one shared covariance (Lee et al., NeurIPS 2018; Ledoit-Wolf
shrinkage, since a few hundred images a class do not pin down a 256-dimensional covariance). Every fold model's
distances are scaled by what its own held-out fold (images it never trained on) reaches at the 99th percentile,
so 1.0 is the gate's threshold and about 1 % of in-distribution images score above it out of fold; a served
image's distance is the mean over the fold models. Measured on images shipped by scikit-image and pydicom, and on
the blank, noise and text images `benchmarks/ood_gate.py` makes, in `benchmarks/RESULTS.md`.

The gate's numbers are saved beside the model (`gate.npz`, numbers only: `np.load` without pickle) and
described in its `model.json`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from braintumor.errors import ModelLoadError

GATE_FILE = "gate.npz"
OUT_OF_FOLD_REFUSED = 0.01  # share of held-out in-distribution images above the threshold, per fold model
METHOD = "mahalanobis, tied covariance, l2-normalised pooled block features, mean over fold models"


def normalised(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def class_distance(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row to the nearer of `means` (a matrix product, not einsum's loop:
    a tenth of the time for one served image)."""
    nearest = np.full(len(features), np.inf)
    for mean in means:
        centred = features - mean
        nearest = np.minimum(nearest, np.sum((centred @ precision) * centred, axis=1))
    return nearest


class FeatureGate:
    """Per member and feature group: class means, shared precision and the held-out scale; per member: the scale
    of the groups' mean."""

    def __init__(self, means: list[list[np.ndarray]], precisions: list[list[np.ndarray]], scales, member_scales):
        self.scales, self.member_scales = np.asarray(scales), np.asarray(member_scales)
        # per feature group, every member's class means (members, 2, width) and precision (members, width, width):
        # serving takes one batched product a group, not one a member and group (40 small products an image)
        self.by_group = [
            (np.stack([member[g] for member in means]), np.stack([member[g] for member in precisions]))
            for g in range(self.scales.shape[1])
        ]
        self.out_of_fold_refused = float("nan")  # share of held-out images refused, known after `fit`

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape

    def distance(self, features: list[np.ndarray]) -> np.ndarray:
        """Mean over members of the scaled distance (each member: the mean over its feature groups of the
        distance to the nearer class, over that group's held-out scale, over the member's scale); `features`:
        the scoring model's feature outputs (all groups of member 0, then member 1, ...)."""
        members, groups = self.shape
        if len(features) != members * groups:
            raise ValueError(f"the gate expects {members * groups} feature groups, got {len(features)}")
        summed = 0.0
        for g, (means, precisions) in enumerate(self.by_group):
            f = np.stack([normalised(features[m * groups + g]) for m in range(members)])  # (members, images, width)
            centred = f[:, None] - means[:, :, None]  # (members, class, images, width)
            nearest = np.sum((centred @ precisions[:, None]) * centred, axis=-1).min(axis=1)
            summed = summed + nearest / self.scales[:, g, None]
        return np.mean(summed / groups / self.member_scales[:, None], axis=0)

    @classmethod
    def fit(cls, features: list[np.ndarray], labels: np.ndarray, folds: np.ndarray, members: int) -> FeatureGate:
        """Member m is fitted on the images it trained on (fold != m) and scaled on its held-out fold (fold == m);
        images with fold < 0 (left out of training) take no part. A single model (one member) has no held-out
        fold: it is scaled on the images it was fitted on."""
        from sklearn.covariance import LedoitWolf  # fitting only: loading and serving need no scikit-learn

        groups = len(features) // members
        means, precisions, scales, member_scales = [], [], np.zeros((members, groups)), np.zeros(members)
        refused = []
        for m in range(members):
            trained = (folds >= 0) & ((folds != m) if members > 1 else True)
            held = (folds == m) if members > 1 else trained
            means.append([]), precisions.append([])
            held_distances = []
            if len({int(c) for c in labels[trained]}) < 2:
                raise ValueError(f"fold model {m} has no training images of one class: the gate needs both")
            for g in range(groups):
                f = normalised(features[m * groups + g])
                centres = np.stack([f[trained & (labels == c)].mean(axis=0) for c in (0, 1)])
                centred = np.concatenate([f[trained & (labels == c)] - centres[c] for c in (0, 1)])
                # pinv: a feature that never varies (a channel no image switches on) carries no distance
                precision = np.linalg.pinv(LedoitWolf().fit(centred).covariance_, hermitian=True)
                distance = class_distance(f[held], centres, precision)
                scales[m, g] = max(np.quantile(distance, 1 - OUT_OF_FOLD_REFUSED), 1e-12)
                means[m].append(centres), precisions[m].append(precision)
                held_distances.append(distance / scales[m, g])
            member_scales[m] = max(np.quantile(np.mean(held_distances, axis=0), 1 - OUT_OF_FOLD_REFUSED), 1e-12)
            refused.append(np.mean(held_distances, axis=0) > member_scales[m])
        gate = cls(means, precisions, scales, member_scales)
        gate.out_of_fold_refused = float(np.concatenate(refused).mean())
        return gate

    def save(self, path: Path) -> str:
        """Write the gate to `path` (.npz); returns its SHA-256 for model.json."""
        members, groups = self.shape
        arrays = {"scales": self.scales, "member_scales": self.member_scales}
        for m in range(members):  # float32: half the file, distances equal to 1e-6 of the threshold
            for g in range(groups):
                arrays[f"means_{m}_{g}"] = self.by_group[g][0][m].astype(np.float32)
                arrays[f"precision_{m}_{g}"] = self.by_group[g][1][m].astype(np.float32)
        with open(path, "wb") as out:
            np.savez(out, **arrays)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    @classmethod
    def load(cls, path: Path, widths: list[int], sha256: str | None = None) -> FeatureGate:
        """The gate saved at `path`, checked against the feature `widths` of the scoring model it will read
        (member and feature counts, widths) and against `sha256` when given; a `ModelLoadError` names what does
        not fit."""
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"{path}: the model's out-of-distribution gate is missing")
        if sha256 is not None and hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise ModelLoadError(f"{path}: its SHA-256 differs from the one in the model's description")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
            scales, member_scales = arrays["scales"], arrays["member_scales"]
            members, groups = scales.shape
            means = [[arrays[f"means_{m}_{g}"].astype(np.float64) for g in range(groups)] for m in range(members)]
            precisions = [
                [arrays[f"precision_{m}_{g}"].astype(np.float64) for g in range(groups)] for m in range(members)
            ]
        except (KeyError, ValueError, OSError) as err:
            raise ModelLoadError(f"{path}: not a gate file written by `evaluate` ({err})") from err
        if len(widths) != members * groups or member_scales.shape != (members,):
            raise ModelLoadError(
                f"{path}: a gate for {members} models x {groups} feature groups, but the network has "
                f"{len(widths)} feature groups"
            )
        for k, width in enumerate(widths):
            m, g = divmod(k, groups)
            if means[m][g].shape != (2, width) or precisions[m][g].shape != (width, width):
                raise ModelLoadError(f"{path}: feature group {g} of model {m} is not {width} wide, as the network's is")
        return cls(means, precisions, scales, member_scales)
