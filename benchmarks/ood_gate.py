"""How well the shipped model's out-of-distribution gate refuses what is not a brain MR slice (issue 28).

Images from packages already installed, per kind: scikit-image's sample photographs, pydicom's bundled DICOM
samples (CT, ultrasound, nuclear medicine, secondary captures, segmentations; MR samples apart), blank, noise
and text images made here, and slices of nilearn's MNI152 brain template in each plane. Each goes through the
same preparation as an uploaded scan (`images.prepare`) and the model's own answer (`Assessor.answers`).
Reported per kind: the share refused at the shipped threshold and the ROC AUC of the gate distance against the
test split's scans, whose refused share is reported too.

    python benchmarks/ood_gate.py [--model models/model.keras] [--out metrics/ood_gate.json]
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import roc_auc_score

from braintumor.atomic import write_json
from braintumor.data.datasets import load_split
from braintumor.data.images import prepare, to_grayscale
from braintumor.stage import configure_logging

log = logging.getLogger("ood_gate")


def scaled(pixels: np.ndarray) -> np.ndarray:
    """8-bit grayscale of any 2-D array: a 0.5-99.5 percentile window."""
    pixels = np.asarray(pixels, dtype=np.float64)
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    return (np.clip((pixels - lo) / max(hi - lo, 1e-9), 0, 1) * 255).astype(np.uint8)


def photographs() -> dict[str, np.ndarray]:
    """scikit-image's sample images that ship in its wheel (those it would download are skipped)."""
    from skimage import data

    found = {}
    for name in data.__all__:
        if name in ("brain", "cells3d", "kidney", "lily", "file_hash", "download_all", "data_dir"):
            continue  # 3-D stacks, multi-channel microscopy, helpers
        try:
            image = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001 - not shipped in the wheel (needs a download)
            continue
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            image = to_grayscale(Image.fromarray(image[..., :3].astype(np.uint8)))
        if image.ndim == 2:
            found[name] = image if image.dtype == np.uint8 else scaled(image)
    return found


def dicom_samples() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(non-MR, MR) pydicom test files that decode: modality LUT, then a percentile window; MONOCHROME1
    inverted; the middle frame of a multi-frame object."""
    import pydicom
    from pydicom.data import get_testdata_files
    from pydicom.pixels import apply_modality_lut

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # it logs a traceback for each codec it lacks
    other, mr = {}, {}
    for path in get_testdata_files("*"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dataset = pydicom.dcmread(path)
                pixels = apply_modality_lut(dataset.pixel_array, dataset)
        except Exception:  # noqa: BLE001 - no pixel data, or a codec this environment lacks
            continue
        pixels = np.asarray(pixels)
        if pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
            pixels = pixels[len(pixels) // 2]
        if pixels.ndim == 3:
            pixels = pixels[..., :3].mean(axis=-1)
        if pixels.ndim != 2 or min(pixels.shape) < 16 or np.ptp(pixels) == 0:
            continue
        gray = scaled(pixels)
        if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
            gray = 255 - gray
        modality = str(getattr(dataset, "Modality", "unknown"))
        (mr if modality == "MR" else other)[f"{modality}:{Path(path).name}"] = gray
    return other, mr


def synthetic(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Blank squares, uniform and Gaussian noise, and pages of text, of several sizes and levels."""
    rng = np.random.default_rng(seed)
    blank = {f"blank_{v}": np.full((256, 256), v, np.uint8) for v in (0, 40, 128, 200, 255)}
    noise, text = {}, {}
    for k in range(10):
        side = int(rng.integers(64, 512))
        noise[f"uniform_{k}"] = rng.integers(0, 256, (side, side)).astype(np.uint8)
        noise[f"gaussian_{k}"] = np.clip(rng.normal(128, rng.uniform(10, 80), (side, side)), 0, 255).astype(np.uint8)
        background = int(rng.choice([0, 255]))
        page = Image.new("L", (400, 300), background)
        draw, font = ImageDraw.Draw(page), ImageFont.load_default(size=int(rng.integers(12, 30)))
        words = "patient report findings no acute intracranial abnormality series image slice contrast".split()
        for line in range(10):
            draw.text((10, 10 + 28 * line), " ".join(rng.choice(words, 6)), fill=255 - background, font=font)
        text[f"text_{k}"] = np.asarray(page)
    return {"blank": blank, "noise": noise, "text": text}


def mni152_planes(slices: int = 9) -> dict[str, dict[str, np.ndarray]]:
    """Slices of nilearn's MNI152 template (1 mm) at 30-70 % of each axis, per plane, in display orientation."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    volume = np.asarray(nib.as_closest_canonical(load_mni152_template(resolution=1)).dataobj, dtype=np.float64)
    planes = {}
    for axis, plane in ((2, "axial"), (1, "coronal"), (0, "sagittal")):
        planes[f"mni152_{plane}"] = {
            f"{plane}_{share:.2f}": scaled(np.rot90(np.take(volume, int(share * volume.shape[axis]), axis=axis)))
            for share in np.linspace(0.3, 0.7, slices)
        }
    return planes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model.keras", help="a model reference `braintumor predict` takes")
    parser.add_argument("--split", default="artifacts/split", help="the split stage's output (its test split)")
    parser.add_argument("--out", default="metrics/ood_gate.json")
    args = parser.parse_args(argv)
    configure_logging()
    from braintumor.model.assessment import score
    from braintumor.serve.predict import load

    loaded = load(args.model)
    if loaded.assessor.gate is None:
        print(f"ood_gate: {args.model} has no out-of-distribution gate (re-run `dvc repro evaluate`)", file=sys.stderr)
        return 2
    size, names = int(loaded.info["image_size"]), loaded.info["class_names"]

    def distances(images) -> np.ndarray:
        return np.array([a["gate_distance"] for a in loaded.assessor.answers(score(loaded.scorer, images, names))])

    test = load_split(args.split, "test", loaded.info["task"])
    in_distribution = distances(test["x"])
    non_mr, mr = dicom_samples()
    kinds = {
        "photographs (scikit-image)": photographs(),
        "non-MR DICOM (pydicom samples)": non_mr,
        **synthetic(),
        **mni152_planes(),
        "MR DICOM (pydicom samples)": mr,
    }
    result = {
        "model": args.model,
        "test_split": {"images": len(in_distribution), "refused": round(float((in_distribution > 1).mean()), 4)},
        "kinds": {},
    }
    for kind, images in kinds.items():
        d = distances(np.stack([prepare(gray, size) for gray in images.values()]))
        labels = np.r_[np.zeros(len(in_distribution)), np.ones(len(d))]
        result["kinds"][kind] = {
            "images": len(d),
            "refused": round(float((d > 1).mean()), 4),
            "roc_auc": round(float(roc_auc_score(labels, np.r_[in_distribution, d])), 4),
            "passed": sorted(name for name, value in zip(images, d, strict=True) if value <= 1),
        }
        log.info(
            "%-32s %3d images: refused %.2f, AUROC %.3f", kind, len(d), (d > 1).mean(), result["kinds"][kind]["roc_auc"]
        )
    write_json(args.out, result)
    log.info(
        "ood_gate: test split refused %.4f of %d scans; figures in %s",
        result["test_split"]["refused"],
        len(in_distribution),
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
