"""Image styles: clusters of what a scan looks like as a whole (view, sequence, framing), from its pixels alone.

In the public collections the classes differ in more than the lesion: Kaggle 2020's tumor scans are mostly
contrast T1 in coronal and sagittal views, its healthy ones mostly axial T2 and FLAIR, so "axial" alone says
"healthy" (a model trained without Kaggle 2018 called its large axial tumors healthy at P = 0.01). Clustering
coarse, standardised thumbnails finds such styles without labels; `train.class_weight: balanced_by_style`
then weighs each (source, style, class) stratum alike, so that no style predicts the class on its own.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

# Thumbnail side (96 px images: 6 x 6 blocks), styles and principal components: coarse enough to ignore the
# lesion, fine enough to tell views and sequences apart.
THUMBNAIL = 16
STYLES = 8
COMPONENTS = 16
CHUNK = 512


def thumbnails(images) -> np.ndarray:
    """(n, THUMBNAIL²) block means of each image's first channel, each standardised to mean 0, sd 1."""
    rows = []
    for start in range(0, len(images), CHUNK):
        x = np.asarray(images[start : start + CHUNK], dtype="float32")[..., 0]
        n, side = x.shape[0], x.shape[1]
        block = side // THUMBNAIL
        x = x[:, : block * THUMBNAIL, : block * THUMBNAIL]
        small = x.reshape(n, THUMBNAIL, block, THUMBNAIL, block).mean(axis=(2, 4)).reshape(n, -1)
        rows.append((small - small.mean(axis=1, keepdims=True)) / (small.std(axis=1, keepdims=True) + 1e-6))
    return np.concatenate(rows) if rows else np.zeros((0, THUMBNAIL * THUMBNAIL), dtype="float32")


def style_clusters(images, seed: int, styles: int = STYLES) -> np.ndarray:
    """A style label (0..styles-1) per image: k-means on the principal components of `thumbnails`."""
    features = thumbnails(images)
    if len(features) <= styles:
        return np.zeros(len(features), dtype=np.int64)
    reduced = PCA(min(COMPONENTS, len(features) - 1), random_state=seed).fit_transform(features)
    return KMeans(styles, n_init=4, random_state=seed).fit_predict(reduced).astype(np.int64)
