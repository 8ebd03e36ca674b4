"""Where in a scan the model's tumor score comes from: the maps the explain stage, `braintumor predict` and the web
service draw. Any model variant, the shipped ensemble too, on any Keras 3 backend.

`evidence_map` (integrated gradients) is the map a reader sees. It replaced Grad-CAM of the last feature layer,
which drew the evidence beside the lesion (issue 31, figures in benchmarks/RESULTS.md): a map of a 6 × 6 layer
is drawn by resizing it over the image, but (1) TensorFlow's "same" padding pads stride-2 layers at the bottom
and right only, so each cell of the last layer looks 7.5 px lower and further right than where the resize puts
it, and (2) the 3 × 3 convolutions at that coarse grid can, and once trained do, move evidence into a
neighbouring 16-px cell, which no drawing of that layer can undo; Grad-CAM of a flattened head (`seed_fsm`,
`seed_cnn`) averages position-specific weights into nonsense. Integrated gradients follow the score (the tumor
log-odds, which unlike P(tumor) do not saturate) back to the pixels through every layer: no grid to misplace.
`occlusion` is slower and honest by construction (it asks the model what happens without each patch); it is
drawn beside, and the tests and `benchmarks/explanation_localisation.py` measure the evidence map against it.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
from scipy import ndimage

from braintumor.model.inference import members_of, tumor_probability
from braintumor.model.intensity import HeadStandardization

# Steps of the integrated-gradients path from a black image to the scan (midpoint rule). Measured on the shipped
# ensemble, 18 discs pasted into healthy test scans (benchmarks/explanation_localisation.py): 8 steps put all 18
# peaks within 8 px of the disc, at about twice Grad-CAM's time (benchmarks/RESULTS.md).
PATH_STEPS = 8


def tumor_score(outputs, class_names: list[str]):
    """P(tumor), or -P(no_tumor) for the multiclass model: what a model without a named head is explained by."""
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


def standardization(model: keras.Model) -> HeadStandardization | None:
    """The model's `HeadStandardization` layer (`train.standardize`; weightless, the same in every member), or None.

    A standardised model gives a scan and the scan at any brightness the same answer, so along the path from
    black to the scan its score barely moves: integrated gradients of the raw pixels would sum to about zero.
    Such a model is explained in the space it computes in: the standardised image, from its black background."""
    for member in members_of(model)[0] or [model]:
        for layer in member.layers:
            if isinstance(layer, HeadStandardization):
                return layer
    return None


@functools.lru_cache(maxsize=8)
def log_odds_model(model: keras.Model, class_names: tuple[str, ...]) -> keras.Model:
    """image -> log-odds of a tumor, averaged over the ensemble's members and views: the score the maps explain.
    A probability saturates: a confident model's P(tumor) is exactly 1.0 in float32 over most of the path from
    black, its gradient exactly 0, and the map empty; its log-odds (the head's pre-activation) keep their
    gradient. Models without the `prediction` head of `architectures.head` are explained by their probability.
    For a standardised model (`standardization`), the input is the standardised image: the left-right mirror
    commutes with standardising, so every member and view starts from it."""
    members, mirrored = members_of(model)
    members = members or [model]
    if not all(any(layer.name == "prediction" for layer in member.layers) for member in members):
        return model
    standardized = standardization(model) is not None
    inputs = keras.Input(model.inputs[0].shape[1:])
    views = [inputs]
    if mirrored:
        views.append(next(layer for layer in model.layers if layer.name == "mirror")(inputs))
    scores = []
    for member in members:
        head = member.get_layer("prediction")
        start = [layer.output for layer in member.layers if isinstance(layer, HeadStandardization)]
        features = keras.Model(start if standardized else member.inputs, head.input)
        for view in views:
            logits = keras.ops.matmul(features(view), head.kernel) + head.bias
            if logits.shape[-1] == 1:
                scores.append(logits[:, 0])
            else:  # log P(tumor) - log P(no tumor), from the softmax's logits
                tumor = [k for k, name in enumerate(class_names) if name != "no_tumor"]
                no_tumor = class_names.index("no_tumor")
                scores.append(keras.ops.logsumexp(keras.ops.take(logits, tumor, axis=1), axis=1) - logits[:, no_tumor])
    return keras.Model(inputs, keras.ops.expand_dims(keras.ops.mean(keras.ops.stack(scores), axis=0), -1))


def explained_score(model: keras.Model, class_names: tuple[str, ...]):
    """fn(images) -> the score the maps explain (see `log_odds_model`), one value an image."""
    scorer = log_odds_model(model, class_names)
    if scorer is model:
        return lambda x: tumor_score(model(x, training=False), list(class_names))
    return lambda x: scorer(x, training=False)[:, 0]


@functools.lru_cache(maxsize=8)
def compiled_score_gradient(model: keras.Model, class_names: tuple[str, ...]):
    """d score / d image for TensorFlow, traced once per model (and input shape) rather than run op by op:
    eagerly, the ensemble's ten member views cost about a second an image whatever the number of steps. Kept
    per model: the web service explains one scan a request."""
    import tensorflow as tf

    score = explained_score(model, class_names)

    @tf.function(reduce_retracing=True)
    def score_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(score(x))
        return tape.gradient(total, x)

    return score_gradient


def score_gradient(model: keras.Model, x: np.ndarray, class_names: list[str]) -> np.ndarray:
    """d score / d x: compiled on TensorFlow, the backend's autodiff as it comes on the others."""
    if keras.backend.backend() == "tensorflow":
        return compiled_score_gradient(model, tuple(class_names))(x).numpy()
    return gradient(explained_score(model, tuple(class_names)), x)


def evidence_map(model: keras.Model, images: np.ndarray, class_names: list[str], steps: int = PATH_STEPS) -> np.ndarray:
    """Integrated gradients of the tumor log-odds from a black image (no signal) to each image, the evidence for a
    tumor only (negative attributions dropped), smoothed to about a small lesion's size (σ = side / 24, 4 px at
    96) and scaled to 0..1 per image: (images, side, side). The shipped ensemble is differentiated as one
    model, its members and mirrored views included (`log_odds_model`); a standardised one in the space of its
    standardised image (`standardization`)."""
    x = np.asarray(images, dtype="float32")
    standardize = standardization(model)
    if standardize is not None and len(x):
        x = keras.ops.convert_to_numpy(standardize(x))
    alphas = (np.arange(steps, dtype="float32") + 0.5) / steps  # midpoints of the path
    maps = []
    for image in x:
        grads = score_gradient(model, alphas[:, None, None, None] * image[None], class_names)
        attribution = (grads.mean(axis=0) * image).sum(axis=-1)
        maps.append(ndimage.gaussian_filter(np.maximum(attribution, 0), sigma=image.shape[0] / 24))
    maps = np.stack(maps) if maps else np.zeros(x.shape[:3], dtype="float32")
    return maps / (maps.max(axis=(1, 2), keepdims=True) + 1e-12)


def occlusion(
    model: keras.Model, images: np.ndarray, class_names: list[str], patch: int = 16, stride: int = 8
) -> np.ndarray:
    """The drop in P(tumor) when a `patch`-pixel square is filled with the image's median, moved by `stride`;
    each pixel gets the mean drop of the squares that cover it (negative: covering it raises P(tumor)).
    One model call per image over all its occluded copies: (side / stride)² copies an image.

    Args:
        model: the shipped model (any that takes 0..255 images).
        images: (n, side, side, 3) images.
        class_names: the model's classes (for P(tumor)).
        patch: side of the occluding square, in pixels.
        stride: its step.
    """
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
