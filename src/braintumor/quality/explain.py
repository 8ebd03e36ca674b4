"""The `explain` stage: LIME superpixels and Grad-CAM heat maps for a few test images.

For correctly classified tumor and healthy scans and for misclassified ones, a panel shows the image, the
LIME superpixels that support the predicted class, and the Grad-CAM overlay of the last convolutional
features. Grad-CAM needs gradients, which Keras 3 leaves to the backend: `gradient` asks the active
backend (TensorFlow, JAX or PyTorch) for them; everything else is backend-agnostic.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import keras
import matplotlib.pyplot as plt
import numpy as np
from lime import lime_image
from skimage.segmentation import mark_boundaries

from braintumor.atomic import atomic_path
from braintumor.data.datasets import load_split
from braintumor.model.inference import load_model, members_of, tumor_probability
from braintumor.params import validate_explain

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=32)
def split_at_features(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """(image -> last 4-D feature maps, feature maps -> prediction). The layers after the last spatial layer
    (pooling or flatten, dropout, dense) form a chain in every model of `model/architectures.py`. Kept per model
    (building the two halves costs more than a map): the web service explains one scan a request."""
    index = max(
        i
        for i, layer in enumerate(model.layers)
        if len(layer.output.shape) == 4 and not isinstance(layer, keras.layers.InputLayer)
    )
    layer = model.layers[index]
    features = keras.Model(model.inputs, layer.output)
    inputs = keras.Input(layer.output.shape[1:])
    x = inputs
    for later in model.layers[index + 1 :]:
        x = later(x)
    return features, keras.Model(inputs, x)


def tumor_score(outputs, class_names: list[str]):
    """The score Grad-CAM explains: P(tumor), or -P(no_tumor) for the multiclass model."""
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
    raise ValueError(f"Grad-CAM: unsupported Keras backend {backend!r}")


def grad_cam(model: keras.Model, images: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Grad-CAM maps in 0..1, one per image, at the input resolution. For the shipped ensemble, the mean of
    its members' maps (each member explains its own share of the averaged score), with each member's map of
    the mirrored view mirrored back when the ensemble averages that view too."""
    members, mirrored = members_of(model)
    if members:
        maps = [grad_cam(member, images, class_names) for member in members]
        if mirrored:
            maps += [grad_cam(member, images[:, :, ::-1], class_names)[:, :, ::-1] for member in members]
        cams = np.mean(maps, axis=0)
        return cams / (cams.max(axis=(1, 2), keepdims=True) + 1e-12)
    features_of, tail = split_at_features(model)
    features = np.asarray(features_of.predict_on_batch(images.astype("float32")))  # compiled, unlike a call
    grads = gradient(lambda f: tumor_score(tail(f, training=False), class_names), features)
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cams = np.maximum((weights * features).sum(axis=-1), 0)
    size = images.shape[1]
    cams = np.maximum(keras.ops.convert_to_numpy(keras.ops.image.resize(cams[..., None], (size, size)))[..., 0], 0)
    return cams / (cams.max(axis=(1, 2), keepdims=True) + 1e-12)


def lime_panel(
    model: keras.Model, image: np.ndarray, class_names: list[str], samples: int, superpixels: int, seed: int
) -> np.ndarray:
    """The image with the boundaries of the LIME superpixels that most support the predicted class."""

    def classifier(batch):
        p = tumor_probability(model, np.asarray(batch), class_names)
        return np.stack([1 - p, p], axis=1)

    explainer = lime_image.LimeImageExplainer(random_state=seed)
    explanation = explainer.explain_instance(
        image.astype("double"), classifier, top_labels=2, hide_color=0, num_samples=samples, random_seed=seed
    )
    picture, mask = explanation.get_image_and_mask(
        explanation.top_labels[0], positive_only=True, num_features=superpixels, hide_rest=False
    )
    return mark_boundaries(picture / 255.0, mask)


def pick_examples(y: np.ndarray, p: np.ndarray, threshold: float, count: int) -> dict[str, np.ndarray]:
    """Up to `count` indices each of confident correct tumor, correct healthy, and misclassified images."""
    predicted = (p >= threshold).astype(int)
    confidence = np.abs(p - threshold)
    groups = {
        "correct_tumor": np.flatnonzero((predicted == 1) & (y == 1)),
        "correct_no_tumor": np.flatnonzero((predicted == 0) & (y == 0)),
        "misclassified": np.flatnonzero(predicted != y),
    }
    return {name: rows[np.argsort(-confidence[rows], kind="stable")][:count] for name, rows in groups.items()}


def explain(
    params: dict,
    split_dir: str | Path = "artifacts/split",
    model_dir: str | Path = "models",
    plots_dir: str | Path = "plots/explain",
) -> dict:
    """Run the explain stage: one PNG panel per chosen test image, plus an index of what was shown."""
    config = validate_explain(params)
    model_dir = Path(model_dir)
    info = json.loads((model_dir / "model.json").read_text())
    model = load_model(model_dir / "model.keras")
    names, threshold = info["class_names"], info["threshold"]
    test = load_split(split_dir, "test", info["task"])
    p = tumor_probability(model, test["x"], names)
    chosen = pick_examples(test["label"], p, threshold, config["images"])
    rows = np.concatenate(list(chosen.values())).astype(int)
    cams = grad_cam(model, test["x"][rows], names) if rows.size else np.zeros((0,))
    index = []
    with atomic_path(plots_dir) as staging:
        staging.mkdir()
        for k, row in enumerate(rows):
            group = next(name for name, members in chosen.items() if row in members)
            image = test["x"][row]
            fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
            axes[0].imshow(image)
            axes[0].set_title(
                f"{group}\ntrue {'tumor' if test['label'][row] else 'no tumor'}, P(tumor)={p[row]:.2f}", fontsize=7
            )
            axes[1].imshow(
                lime_panel(model, image, names, config["lime_samples"], config["lime_superpixels"], params["seed"])
            )
            axes[1].set_title(f"LIME: top {config['lime_superpixels']} superpixels", fontsize=7)
            axes[2].imshow(image)
            axes[2].imshow(cams[k], cmap="jet", alpha=0.4)
            axes[2].set_title("Grad-CAM (tumor score)", fontsize=7)
            for ax in axes:
                ax.axis("off")
            fig.tight_layout()
            name = f"{group}-{k:02d}.png"
            fig.savefig(staging / name, dpi=100)
            plt.close(fig)
            index.append(
                {
                    "file": name,
                    "group": group,
                    "path": str(test["path"][row]),
                    "label": int(test["label"][row]),
                    "probability": round(float(p[row]), 4),
                }
            )
        (staging / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    log.info(
        "explain: %d panels (%s) with LIME (%d samples) and Grad-CAM",
        len(index),
        ", ".join(f"{name} {len(members)}" for name, members in chosen.items()),
        config["lime_samples"],
    )
    return {"panels": len(index)}
