"""The `explain` stage: LIME superpixels, the evidence map and occlusion for a few test images.

For correctly classified tumor and healthy scans and for misclassified ones, a panel shows the image, the
LIME superpixels that support the predicted class, the evidence map a reader sees in `braintumor predict` and
on the triage page (integrated gradients, `model/saliency.py`), and occlusion beside it: slower, honest by
construction, so a reader can see whether the two agree.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import keras
import matplotlib.pyplot as plt
import numpy as np
from lime import lime_image
from skimage.segmentation import mark_boundaries, slic

from braintumor import paths
from braintumor.atomic import atomic_path
from braintumor.data.datasets import load_split
from braintumor.data.images import foreground
from braintumor.model.inference import load_model, tumor_probability
from braintumor.model.saliency import evidence_map, occlusion
from braintumor.params import validate_explain

log = logging.getLogger(__name__)

# Superpixels LIME switches on and off: SLIC inside the head, about 60 of them (some 120 px each at 96 px, an
# 11-px square: small enough to isolate a mass), the background one more. LIME's default segmentation
# (quickshift) cut these scans into 6-10 pieces of about 900 px, which followed the head's outline.
LIME_SEGMENTS = 60


def head_superpixels(image: np.ndarray) -> np.ndarray:
    """SLIC superpixels of the head (labels 1..), the background as one segment (0)."""
    return slic(
        image / 255.0,
        n_segments=LIME_SEGMENTS,
        compactness=10,
        mask=foreground(image[..., 0].astype(np.uint8)),
        start_label=1,
    )


def lime_explanation(
    model: keras.Model,
    image: np.ndarray,
    class_names: list[str],
    samples: int,
    seed: int,
    segmentation=head_superpixels,
):
    """LIME's explanation of one image over `segmentation` (None: LIME's own quickshift), for both classes (0 no
    tumor, 1 tumor)."""

    def classifier(batch):
        p = tumor_probability(model, np.asarray(batch), class_names)
        return np.stack([1 - p, p], axis=1)

    explainer = lime_image.LimeImageExplainer(random_state=seed)
    return explainer.explain_instance(
        image.astype("double"),
        classifier,
        top_labels=2,
        hide_color=0,
        num_samples=samples,
        random_seed=seed,
        segmentation_fn=segmentation,
    )


def lime_map(explanation, label: int = 1) -> np.ndarray:
    """Each pixel's LIME weight for `label` (1: tumor), the weight of the superpixel it lies in."""
    weights = dict(explanation.local_exp[label])
    return np.vectorize(lambda segment: weights.get(segment, 0.0))(explanation.segments).astype("float64")


def lime_panel(
    model: keras.Model, image: np.ndarray, class_names: list[str], samples: int, superpixels: int, seed: int
) -> np.ndarray:
    """The image with the boundaries of the LIME superpixels that most support the predicted class.

    Args:
        model: the shipped model.
        image: one (side, side, 3) uint8 image.
        class_names: the model's classes.
        samples: perturbed images LIME scores.
        superpixels: superpixels outlined.
        seed: LIME's sampling seed.
    """
    explanation = lime_explanation(model, image, class_names, samples, seed)
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
    split_dir: str | Path = paths.SPLIT_DIR,
    model_dir: str | Path = paths.MODEL_DIR,
    plots_dir: str | Path = paths.EXPLAIN_PLOTS,
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
    evidence = evidence_map(model, test["x"][rows], names)
    occluded = occlusion(model, test["x"][rows], names)
    index = []
    with atomic_path(plots_dir) as staging:
        staging.mkdir()
        for k, row in enumerate(rows):
            group = next(name for name, members in chosen.items() if row in members)
            image = test["x"][row]
            fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
            axes[0].imshow(image)
            axes[0].set_title(
                f"{group}\ntrue {'tumor' if test['label'][row] else 'no tumor'}, P(tumor)={p[row]:.2f}", fontsize=7
            )
            axes[1].imshow(
                lime_panel(model, image, names, config["lime_samples"], config["lime_superpixels"], params["seed"])
            )
            axes[1].set_title(f"LIME: top {config['lime_superpixels']} superpixels", fontsize=7)
            axes[2].imshow(image)
            axes[2].imshow(evidence[k], cmap="jet", alpha=0.4)
            axes[2].set_title("evidence for tumor\n(integrated gradients)", fontsize=7)
            axes[3].imshow(image)
            limit = max(float(np.abs(occluded[k]).max()), 1e-6)
            axes[3].imshow(occluded[k], cmap="RdBu_r", alpha=0.5, vmin=-limit, vmax=limit)
            axes[3].set_title(f"occlusion: drop in P(tumor)\n(red; max {occluded[k].max():.2f})", fontsize=7)
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
        "explain: %d panels (%s) with LIME (%d samples), evidence maps and occlusion",
        len(index),
        ", ".join(f"{name} {len(members)}" for name, members in chosen.items()),
        config["lime_samples"],
    )
    return {"panels": len(index)}
