"""Do the shipped model's explanations point at the evidence it uses? Issue 31's table, measured again.

A bright disc (radius 7 px, value 235 at 96 px) is pasted into real healthy scans of the test split, at places
inside the head, one at a time; occlusion (a 16-px square of the image's median, stride 8: honest by
construction) says where the model's evidence is, and each map's peak is compared with occlusion's:
the evidence map the product draws (`braintumor.model.saliency.evidence_map`) and, as the baseline in the same
run, Grad-CAM of the last feature layer as the product drew it before (kept here only to measure it).

Usage: python benchmarks/explanation_localisation.py [--model models/model.keras] [--split artifacts/split]
       [--scans 6] [--discs 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from braintumor.data.datasets import load_split  # noqa: E402
from braintumor.model.inference import load_model, members_of, tumor_probability  # noqa: E402
from braintumor.model.saliency import evidence_map, gradient, occlusion, peak, tumor_score  # noqa: E402

RADIUS, BRIGHTNESS = 7, 235


def last_layer_grad_cam(model, images: np.ndarray, names: list[str]) -> np.ndarray:
    """Grad-CAM of the last 4-D layer, resized over the image, averaged over the members and mirrored views: the
    map the product drew until issue 31."""
    import keras

    members, mirrored = members_of(model)
    if members:
        maps = [last_layer_grad_cam(m, images, names) for m in members]
        if mirrored:
            maps += [last_layer_grad_cam(m, images[:, :, ::-1], names)[:, :, ::-1] for m in members]
        cams = np.mean(maps, axis=0)
        return cams / (cams.max(axis=(1, 2), keepdims=True) + 1e-12)
    index = max(
        i
        for i, layer in enumerate(model.layers)
        if len(layer.output.shape) == 4 and not isinstance(layer, keras.layers.InputLayer)
    )
    features = np.asarray(keras.Model(model.inputs, model.layers[index].output).predict_on_batch(images))
    inputs = keras.Input(features.shape[1:])
    x = inputs
    for later in model.layers[index + 1 :]:
        x = later(x)
    tail = keras.Model(inputs, x)
    grads = gradient(lambda f: tumor_score(tail(f, training=False), names), features)
    cams = np.maximum((grads.mean(axis=(1, 2), keepdims=True) * features).sum(axis=-1), 0)
    size = images.shape[1]
    resized = keras.ops.convert_to_numpy(keras.ops.image.resize(cams[..., None], (size, size)))[..., 0]
    return resized / (resized.max(axis=(1, 2), keepdims=True) + 1e-12)


def places_inside_head(image: np.ndarray, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """`count` disc centres whose whole disc lies inside the head (the image above 10 % of its maximum, holes
    filled, eroded by the disc's radius plus a margin)."""
    gray = image[..., 0]
    head = ndimage.binary_fill_holes(gray > 0.1 * gray.max())
    inside = np.argwhere(ndimage.binary_erosion(head, iterations=RADIUS + 4))
    return [tuple(map(int, inside[k])) for k in rng.choice(len(inside), size=count, replace=False)]


def paste(image: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    out = image.copy()
    out[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < RADIUS**2] = BRIGHTNESS
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/model.keras")
    parser.add_argument("--split", default="artifacts/split")
    parser.add_argument("--scans", type=int, default=6, help="healthy test scans to paste into")
    parser.add_argument("--discs", type=int, default=3, help="discs per scan, one at a time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_model(args.model)
    info = json.loads((Path(args.model).parent / "model.json").read_text())
    names = info["class_names"]
    test = load_split(args.split, "test", info["task"])
    rng = np.random.default_rng(args.seed)
    healthy = rng.choice(np.flatnonzero(test["label"] == 0), size=args.scans, replace=False)
    pasted, centres = [], []
    for row in healthy:
        for centre in places_inside_head(test["x"][row], args.discs, rng):
            pasted.append(paste(test["x"][row], centre))
            centres.append(centre)
    pasted, centres = np.stack(pasted), np.array(centres)
    before = tumor_probability(model, np.repeat(test["x"][healthy], args.discs, axis=0), names)
    after = tumor_probability(model, pasted, names)
    seconds, peaks = {}, {}
    evidence_map(model, pasted[:1], names)  # traced once, as a served model is after its first explanation
    for name, method in (
        ("occlusion", lambda x: occlusion(model, x, names)),
        ("grad_cam_last_layer", lambda x: last_layer_grad_cam(model, x.astype("float32"), names)),
        ("evidence_map", lambda x: evidence_map(model, x, names)),
    ):
        started = time.perf_counter()
        maps = method(pasted)
        seconds[name] = (time.perf_counter() - started) / len(pasted)
        peaks[name] = np.array([peak(m) for m in maps], dtype=int)
    print(f"{len(pasted)} discs (radius {RADIUS}, value {BRIGHTNESS}) in {args.scans} healthy test scans, {args.model}")
    print(f"P(tumor) without -> with the disc: median {np.median(before):.2f} -> {np.median(after):.2f}")
    print("| disc (y, x) | P(tumor) | occlusion peak | Grad-CAM (last layer) peak | evidence-map peak |")
    print("| --- | --- | --- | --- | --- |")
    for k, centre in enumerate(centres):
        print(
            f"| {tuple(centre.tolist())} | {after[k]:.2f} | {tuple(peaks['occlusion'][k].tolist())} | "
            f"{tuple(peaks['grad_cam_last_layer'][k].tolist())} | {tuple(peaks['evidence_map'][k].tolist())} |"
        )
    summary = {}
    for name in ("grad_cam_last_layer", "evidence_map"):
        offset = peaks[name] - peaks["occlusion"]
        distance = np.hypot(*offset.T)
        summary[name] = {
            "within_8px_of_occlusion": round(float(np.mean(distance <= 8)), 3),
            "mean_offset_yx": np.round(offset.mean(axis=0), 1).tolist(),
            "median_distance_px": round(float(np.median(distance)), 1),
            "seconds_per_image": round(seconds[name], 3),
        }
    summary["occlusion"] = {
        "within_8px_of_disc": round(float(np.mean(np.hypot(*(peaks["occlusion"] - centres).T) <= 8)), 3),
        "seconds_per_image": round(seconds["occlusion"], 3),
    }
    print(json.dumps(summary, indent=2))
    print(
        f"evidence map: {summary['evidence_map']['within_8px_of_occlusion']:.0%} of peaks within 8 px of occlusion's, "
        f"against {summary['grad_cam_last_layer']['within_8px_of_occlusion']:.0%} for the last-layer Grad-CAM"
    )


if __name__ == "__main__":
    main()
