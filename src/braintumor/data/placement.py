"""Where the images of the growing source go (split and fold), so that a new image never moves an old one.

The public sources are fixed collections: their groups are drawn into splits (`split.assign_splits`) and folds
(`model.train.folds_of`) together, stratified by label. The user's `data/` grows a verdict at a time
(`braintumor feedback accept`); drawn with the others, each new scan would reshuffle every split and fold: the
test figures would move with every verdict, and the fold models trained before it would have seen images that
are now held out. So a group that holds images of the local source only is placed on its own, by a seeded
digest of its first path (stable while its own images stay the same), and the public groups are drawn exactly
as they would be without `data/` (unless a scan of `data/` is a near duplicate of a public image: it then joins
that image's group, or, labelled otherwise, takes the cluster out as a conflict). The price: a small site's split
is not stratified by label.
"""

from __future__ import annotations

import hashlib

import numpy as np

from braintumor.labels import LOCAL_SOURCE


def in_fixed_group(source: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Per row: its group holds an image of a fixed (public) source, so it is drawn with the public groups."""
    source, group = np.asarray(source, dtype=object), np.asarray(group, dtype=object)
    return np.isin(group, group[source != LOCAL_SOURCE])


def uniform_draws(path: np.ndarray, group: np.ndarray, seed: int, purpose: str) -> dict[str, float]:
    """A number in [0, 1) per group, from the digest of (seed, purpose, the group's first path): the same
    whatever other images exist, and independent between purposes (the split, the folds)."""
    first = {}
    for p, g in zip(path, group, strict=True):
        first[g] = min(first.get(g, p), p)
    return {
        g: int.from_bytes(hashlib.sha256(f"{seed}/{purpose}/{p}".encode()).digest()[:8], "big") / 2.0**64
        for g, p in first.items()
    }


def splits_of_groups(path: np.ndarray, group: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, str]:
    """The split of each growing-only group: its draw against the cumulative `fractions` (in their order)."""
    names = list(fractions)
    edges = np.cumsum([fractions[name] for name in names])
    return {
        g: names[min(int(np.searchsorted(edges, u, side="right")), len(names) - 1)]
        for g, u in uniform_draws(path, group, seed, "split").items()
    }


def folds_of_groups(path: np.ndarray, group: np.ndarray, folds: int, seed: int) -> dict[str, int]:
    """The fold of each growing-only group of the train+val pool."""
    return {g: min(int(u * folds), folds - 1) for g, u in uniform_draws(path, group, seed, "fold").items()}
