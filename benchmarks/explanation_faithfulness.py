"""Are the explanations faithful, and do they find a real lesion? Deletion / insertion and pasted-lesion figures.

Faithfulness (the test split's tumor scans the model calls tumor): pixels are removed (deletion: replaced by
a heavily blurred copy of the scan, which keeps its brightness but not its detail) or revealed (insertion:
from that blurred copy) in the order a method ranks them, most salient first, 5 % at a time; the area under
P(tumor) over the fraction changed is the figure (deletion: lower is better; insertion: higher). The
baseline in the same run is a random order. Intervals: 95 % bootstrap over the images, paired with random.

Localisation on real anatomy: from tumor scans of the test split whose brightest compact region inside the
skull is a plausible mass (the largest connected part of the brain's brightest 3 %, 15 to 300 px, filling
at least 40 % of its box), that tissue is pasted, at its own brightness relative to its brain, into a healthy
test scan at a random place inside the brain. Counted: how often each method's peak lies inside the pasted
region (grown by 2 px), over the cases where the model noticed it (P(tumor) up by at least 0.1).

Methods: the evidence map (`model/saliency.py`, what the product draws), occlusion (16 px, stride 8), LIME on
SLIC superpixels of the head (what `plots/explain/` draws) and LIME with its default quickshift segments.

    python benchmarks/explanation_faithfulness.py --images 24 --pastes 24   # writes metrics/explanations.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import ndimage

from braintumor.atomic import write_json
from braintumor.data.datasets import load_split
from braintumor.data.images import foreground
from braintumor.model.inference import load_model, tumor_probability
from braintumor.model.saliency import evidence_map, occlusion, peak
from braintumor.quality.explain import lime_explanation, lime_map

FRACTIONS = np.linspace(0, 1, 21)


def saliency_maps(model, images, names, samples, seed) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "evidence_map": evidence_map(model, images, names),
        "occlusion": occlusion(model, images, names, patch=16, stride=8),
        "lime_slic": np.stack([lime_map(lime_explanation(model, im, names, samples, seed)) for im in images]),
        "lime_quickshift": np.stack(
            [lime_map(lime_explanation(model, im, names, samples, seed, segmentation=None)) for im in images]
        ),
        "random": rng.random(images.shape[:3]),
    }


def curves(model, images, names, saliency, seed) -> tuple[np.ndarray, np.ndarray]:
    """P(tumor) along deletion and insertion, (images, fractions) each."""
    rng = np.random.default_rng(seed)
    deletion, insertion = [], []
    for image, ranking in zip(images, saliency, strict=True):
        blurred = ndimage.gaussian_filter(image.astype("float32"), sigma=(8, 8, 0))
        noise = rng.random(ranking.shape) * 1e-9  # ties (occlusion's flat blocks) in random order
        order = np.argsort(-(ranking + noise).ravel(), kind="stable")
        side = image.shape[0]
        deleted, inserted = [], []
        for fraction in FRACTIONS:
            top = np.zeros(side * side, dtype=bool)
            top[order[: int(round(fraction * side * side))]] = True
            top = top.reshape(side, side)[..., None]
            deleted.append(np.where(top, blurred, image))
            inserted.append(np.where(top, image, blurred))
        p = tumor_probability(model, np.stack(deleted + inserted).astype("float32"), names)
        deletion.append(p[: len(FRACTIONS)])
        insertion.append(p[len(FRACTIONS) :])
    return np.array(deletion), np.array(insertion)


def area(curve: np.ndarray) -> np.ndarray:
    return np.trapezoid(curve, FRACTIONS, axis=-1)


def interval(values: np.ndarray, seed: int, resamples: int = 2000) -> list[float]:
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(resamples)]
    return [round(float(q), 4) for q in np.percentile(means, [2.5, 97.5])]


def brain(image: np.ndarray) -> np.ndarray:
    """The head mask without a 6-px rim (the skull and scalp, where a simple mask can find them)."""
    return ndimage.binary_erosion(foreground(image[..., 0]), iterations=6)


def lesion_of(image: np.ndarray) -> np.ndarray | None:
    """The brightest compact region inside the brain, if it looks like a mass; else None."""
    inside = brain(image)
    if inside.sum() < 500:
        return None
    gray = image[..., 0].astype("float32")
    bright = inside & (gray >= np.percentile(gray[inside], 97))
    labels, count = ndimage.label(bright)
    if not count:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    region = labels == 1 + int(np.argmax(sizes))
    rows, cols = np.nonzero(region)
    box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    if not 15 <= region.sum() <= 300 or region.sum() / box < 0.4:
        return None
    return ndimage.binary_dilation(region, iterations=1)


def paste(donor: np.ndarray, region: np.ndarray, host: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray] | None:
    """`donor`'s `region` pasted at a random place inside `host`'s brain, scaled by the two brains' medians."""
    host_brain, donor_brain = brain(host), brain(donor)
    if host_brain.sum() < 500:
        return None
    rows, cols = np.nonzero(region)
    top, left = rows.min(), cols.min()
    shape = (rows.max() - top + 1, cols.max() - left + 1)
    fits = ndimage.binary_erosion(host_brain, structure=np.ones(shape), origin=(-(shape[0] // 2), -(shape[1] // 2)))
    places = np.argwhere(fits)
    if not len(places):
        return None
    r, c = places[rng.integers(len(places))]
    scale = np.median(host[..., 0][host_brain]) / max(np.median(donor[..., 0][donor_brain]), 1.0)
    pasted, where = host.astype("float32").copy(), np.zeros(region.shape, dtype=bool)
    where[rows - top + r, cols - left + c] = True
    pasted[where] = np.clip(donor[rows, cols].astype("float32") * scale, 0, 255)
    return pasted, where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="models")
    parser.add_argument("--split-dir", default="artifacts/split")
    parser.add_argument("--images", type=int, default=24, help="tumor test scans for deletion / insertion")
    parser.add_argument("--pastes", type=int, default=24, help="pasted-lesion cases tried")
    parser.add_argument("--lime-samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="metrics/explanations.json")
    args = parser.parse_args()
    started = time.perf_counter()
    info = json.loads(open(f"{args.model_dir}/model.json").read())
    model, names = load_model(f"{args.model_dir}/model.keras"), info["class_names"]
    test = load_split(args.split_dir, "test", "binary")
    p = tumor_probability(model, test["x"], names)
    rng = np.random.default_rng(args.seed)

    called = np.flatnonzero((test["label"] == 1) & (p >= info["threshold"]))
    chosen = rng.choice(called, min(args.images, len(called)), replace=False)
    images = test["x"][chosen]
    maps = saliency_maps(model, images, names, args.lime_samples, args.seed)
    faithfulness = {}
    for method, saliency in maps.items():
        deletion, insertion = curves(model, images, names, saliency, args.seed)
        faithfulness[method] = {"deletion": area(deletion), "insertion": area(insertion)}
    results = {"images": len(chosen), "faithfulness": {}}
    for method, scores in faithfulness.items():
        row = {}
        for kind in ("deletion", "insertion"):
            row[f"{kind}_auc"] = round(float(scores[kind].mean()), 4)
            row[f"{kind}_ci95"] = interval(scores[kind], args.seed)
            if method != "random":
                row[f"{kind}_minus_random_ci95"] = interval(scores[kind] - faithfulness["random"][kind], args.seed)
        results["faithfulness"][method] = row

    donors = [k for k in np.flatnonzero(test["label"] == 1) if lesion_of(test["x"][k]) is not None]
    hosts = np.flatnonzero((test["label"] == 0) & (p < info["threshold"]))
    cases, regions, host_of = [], [], []
    for _ in range(args.pastes):
        donor, host = test["x"][rng.choice(donors)], rng.choice(hosts)
        made = paste(donor, lesion_of(donor), test["x"][host], rng)
        if made is not None:
            cases.append(made[0])
            regions.append(made[1])
            host_of.append(host)
    after = tumor_probability(model, np.stack(cases), names)
    noticed = np.flatnonzero(after - p[host_of] >= 0.1)
    localisation = {"donor_scans": len(donors), "cases": len(cases), "noticed": len(noticed)}
    if len(noticed):
        pasted = np.stack([cases[k] for k in noticed])
        found = saliency_maps(model, pasted, names, args.lime_samples, args.seed)
        for method, saliency in found.items():
            hits = [
                bool(ndimage.binary_dilation(regions[k], iterations=2)[peak(s)])
                for k, s in zip(noticed, saliency, strict=True)
            ]
            localisation[method] = {"peak_inside": round(float(np.mean(hits)), 4), "hits": int(np.sum(hits))}
    results["localisation"] = localisation
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
