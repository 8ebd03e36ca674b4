"""Where in a scan the model's tumor score comes from: the maps the explain stage, `braintumor predict` and the web
service draw. Any model variant, the shipped ensemble too, on any Keras 3 backend.

`evidence_map` (integrated gradients) is the map a reader sees. It replaced Grad-CAM of the last feature layer,
which drew the evidence beside the lesion (issue 31, figures in benchmarks/RESULTS.md): a map of a 6 × 6 layer
is drawn by resizing it over the image, but (1) TensorFlow's "same" padding pads stride-2 layers at the bottom
and right only, so each cell of the last layer looks 7.5 px lower and further right than where the resize puts
it, and (2) the 3 × 3 convolutions at that coarse grid can, and once trained do, move evidence into a
neighbouring 16-px cell, which no drawing of that layer can undo; Grad-CAM of a flattened head (`seed_fsm`,
`seed_cnn`) averages position-specific weights into nonsense. Integrated gradients follow the score back to the
pixels through every layer, so they have no grid to misplace. `occlusion` is slower and honest by construction
(it asks the model what happens without each patch); it is drawn beside, and the tests and
`benchmarks/explanation_localisation.py` measure the evidence map against it.
"""

from __future__ import annotations

import keras
import numpy as np
from scipy import ndimage

from braintumor.model.inference import tumor_probability

# Steps of the integrated-gradients path from a black image to the scan (midpoint rule): 16 put the peak within
# a pixel of 64 steps' on the synthetic lesions of the tests, at a quarter of the cost.
PATH_STEPS = 16


def tumor_score(outputs, class_names: list[str]):
    """The score the maps explain: P(tumor), or -P(no_tumor) for the multiclass model."""
    return outputs[:, 0] if outputs.shape[-1] == 1 else -outputs[:, class_names.index("no_tumor")]


def gradient(fn, x: np.ndarray) -> np.ndarray:
    """d sum(fn(x)) / dx with the active backend's autodiff (Keras 3 has no backend-neutral gradient)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tensor = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(tensor)
            total = tf.reduce_sum(fn(tensor))
        return tape.gradient(total, tensor).numpy()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda t: fn(t).sum())(jax.numpy.asarray(x)))
    if backend == "torch":
        import torch

        tensor = torch.tensor(x, requires_grad=True)
        fn(tensor).sum().backward()
        return tensor.grad.detach().cpu().numpy()
    raise ValueError(f"saliency: unsupported Keras backend {backend!r}")


def evidence_map(model: keras.Model, images: np.ndarray, class_names: list[str], steps: int = PATH_STEPS) -> np.ndarray:
    """Integrated gradients of the tumor score from a black image (no signal) to each image, the evidence for a
    tumor only (negative attributions dropped), smoothed to about a small lesion's size (σ = side / 24, 4 px at
    96) and scaled to 0..1 per image: (images, side, side). The shipped ensemble is differentiated as one
    model, its members and mirrored views included."""
    x = np.asarray(images, dtype="float32")
    alphas = (np.arange(steps, dtype="float32") + 0.5) / steps
    maps = []
    for image in x:
        path = alphas[:, None, None, None] * image[None]
        grads = gradient(lambda t: tumor_score(model(t, training=False), class_names), path)
        attribution = (grads.mean(axis=0) * image).sum(axis=-1)
        maps.append(ndimage.gaussian_filter(np.maximum(attribution, 0), sigma=image.shape[0] / 24))
    maps = np.stack(maps) if maps else np.zeros(x.shape[:3], dtype="float32")
    return maps / (maps.max(axis=(1, 2), keepdims=True) + 1e-12)


def occlusion(
    model: keras.Model, images: np.ndarray, class_names: list[str], patch: int = 16, stride: int = 8
) -> np.ndarray:
    """The drop in P(tumor) when a `patch`-pixel square is filled with the image's median, moved by `stride`;
    each pixel gets the mean drop of the squares that cover it (negative: covering it raises P(tumor)).
    One model call per image over all its occluded copies: (side / stride)² copies an image."""
    x = np.asarray(images)
    side = x.shape[1]
    corners = range(0, max(side - patch, 0) + 1, stride)
    maps = np.zeros(x.shape[:3])
    for k, image in enumerate(x):
        fill = np.median(image)
        copies, boxes = [], []
        for top in corners:
            for left in corners:
                copy = image.copy()
                copy[top : top + patch, left : left + patch] = fill
                copies.append(copy)
                boxes.append((slice(top, top + patch), slice(left, left + patch)))
        scores = tumor_probability(model, np.stack([image, *copies]), class_names)
        drop, covered = np.zeros((side, side)), np.zeros((side, side))
        for box, score in zip(boxes, scores[1:], strict=True):
            drop[box] += scores[0] - score
            covered[box] += 1
        maps[k] = drop / np.maximum(covered, 1)
    return maps


def peak(saliency: np.ndarray) -> tuple[int, int]:
    """(row, column) of a map's maximum: the centre of the pixels that share it, since occlusion's map is flat over
    each stride-wide block (an argmax would name the block's top-left corner, half a stride off)."""
    rows, cols = np.nonzero(saliency >= saliency.max())
    return int(round(rows.mean())), int(round(cols.mean()))
