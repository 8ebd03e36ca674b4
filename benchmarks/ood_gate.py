"""How often the shipped model answers "not a brain MR slice" to what is not one (issues 28 and 29).

Files from packages already installed, per kind: scikit-image's sample photographs (as PNG, in colour where
they are), its Shepp-Logan head phantom apart, pydicom's bundled DICOM files (CT, ultrasound, nuclear medicine,
secondary captures, segmentations; MR samples apart), blank, noise and text images made here, and slices of
nilearn's MNI152 brain template in each plane; and, where the kagglehub cache is reachable, the distinct files of
the Kaggle mirror that a reviewer saw as head CT (labels/modality_review.csv: the pixel check's thresholds were set
on these, so their refusal is an in-sample figure). Each file goes through what an upload goes through
(`scans.read_scans`: the colour, head-CT and DICOM Modality checks, the shared rendering) and the model's own answer
(`Assessor.answers`; a multi-frame object's verdict by `series_verdict`). Reported per kind: the share answered
`out_of_distribution` (`refused`), the share the feature gate alone refuses (`gate_refused`), and the ROC AUC of
the gate distance (the nearest frame's) against the test split's scans, whose refused share (their files read
as an upload) is reported too.

    python benchmarks/ood_gate.py [--model models/model.keras] [--out metrics/ood_gate.json]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import roc_auc_score

from braintumor.atomic import write_json
from braintumor.data.datasets import load_split
from braintumor.data.images import prepare
from braintumor.data.scans import read_scans
from braintumor.stage import configure_logging

log = logging.getLogger("ood_gate")


def scaled(pixels: np.ndarray) -> np.ndarray:
    """8-bit grayscale of any 2-D array: a 0.5-99.5 percentile window."""
    pixels = np.asarray(pixels, dtype=np.float64)
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    return (np.clip((pixels - lo) / max(hi - lo, 1e-9), 0, 1) * 255).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def photographs() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(photographs, the Shepp-Logan head phantom): scikit-image's sample images that ship in its wheel (those it
    would download are skipped), as PNG files, in colour where they are."""
    from skimage import data

    found, phantom = {}, {}
    for name in data.__all__:
        if name in ("brain", "cells3d", "kidney", "lily", "file_hash", "download_all", "data_dir"):
            continue  # 3-D stacks, multi-channel microscopy, helpers
        try:
            image = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001 - not shipped in the wheel (needs a download)
            continue
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            image = image[..., :3].astype(np.uint8)
        elif image.ndim == 2 and image.dtype != np.uint8:
            image = scaled(image)
        elif image.ndim != 2:
            continue
        (phantom if name == "shepp_logan_phantom" else found)[name] = png(image)
    return found, phantom


def dicom_samples() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(non-MR, MR) pydicom test files, by the Modality they declare (none: non-MR), as bytes."""
    import pydicom
    from pydicom.data import get_testdata_files

    other, mr = {}, {}
    for path in get_testdata_files("*"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", "unknown"))
        except Exception:  # noqa: BLE001 - not DICOM (README, JSON, dumps)
            continue
        (mr if modality == "MR" else other)[f"{modality}:{Path(path).name}"] = Path(path).read_bytes()
    return other, mr


def synthetic(seed: int = 0) -> dict[str, dict[str, bytes]]:
    """Blank squares, uniform and Gaussian noise, and pages of text, of several sizes and levels."""
    rng = np.random.default_rng(seed)
    blank = {f"blank_{v}": png(np.full((256, 256), v, np.uint8)) for v in (0, 40, 128, 200, 255)}
    noise, text = {}, {}
    for k in range(10):
        side = int(rng.integers(64, 512))
        noise[f"uniform_{k}"] = png(rng.integers(0, 256, (side, side)).astype(np.uint8))
        gaussian = np.clip(rng.normal(128, rng.uniform(10, 80), (side, side)), 0, 255).astype(np.uint8)
        noise[f"gaussian_{k}"] = png(gaussian)
        background = int(rng.choice([0, 255]))
        page = Image.new("L", (400, 300), background)
        draw, font = ImageDraw.Draw(page), ImageFont.load_default(size=int(rng.integers(12, 30)))
        words = "patient report findings no acute intracranial abnormality series image slice contrast".split()
        for line in range(10):
            draw.text((10, 10 + 28 * line), " ".join(rng.choice(words, 6)), fill=255 - background, font=font)
        text[f"text_{k}"] = png(np.asarray(page))
    return {"blank": blank, "noise": noise, "text": text}


def mni152_planes(slices: int = 9) -> dict[str, dict[str, bytes]]:
    """Slices of nilearn's MNI152 template (1 mm) at 30-70 % of each axis, per plane, in display orientation."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    volume = np.asarray(nib.as_closest_canonical(load_mni152_template(resolution=1)).dataobj, dtype=np.float64)
    planes = {}
    for axis, plane in ((2, "axial"), (1, "coronal"), (0, "sagittal")):
        planes[f"mni152_{plane}"] = {
            f"{plane}_{share:.2f}": png(scaled(np.rot90(np.take(volume, int(share * volume.shape[axis]), axis=axis))))
            for share in np.linspace(0.3, 0.7, slices)
        }
    return planes


def mirror_head_ct(review: Path) -> dict[str, bytes]:
    """The distinct files a reviewer saw as head CT in the Kaggle mirror (labels/modality_review.csv), as bytes;
    empty when the kagglehub cache is not reachable."""
    import pandas as pd

    from braintumor.data.fetch import kaggle_root
    from braintumor.errors import SourceError
    from braintumor.params import load_params

    reviewed = pd.read_csv(review, dtype=str, keep_default_na=False)
    reviewed = reviewed[reviewed.modality == "ct"].drop_duplicates("sha256")
    sources = load_params()["fetch"]["sources"]
    try:
        roots = {name: kaggle_root(name, sources[name]["handle"]) for name in set(reviewed.image.str.split("/").str[0])}
    except SourceError as err:
        log.info("ood_gate: no mirror head CT (%s)", err)
        return {}
    return {image: (roots[image.split("/")[0]] / image.split("/", 1)[1]).read_bytes() for image in reviewed.image}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model.keras", help="a model reference `braintumor predict` takes")
    parser.add_argument("--split", default="artifacts/split", help="the split stage's output (its test split)")
    parser.add_argument("--out", default="metrics/ood_gate.json")
    parser.add_argument("--review", type=Path, default=Path("labels/modality_review.csv"), help="reviewed modalities")
    args = parser.parse_args(argv)
    configure_logging()
    from braintumor.model.assessment import OUT_OF_DISTRIBUTION, score
    from braintumor.model.series_verdict import series_answer
    from braintumor.serve.predict import load

    loaded = load(args.model)
    if loaded.assessor.gate is None:
        print(f"ood_gate: {args.model} has no out-of-distribution gate (re-run `dvc repro evaluate`)", file=sys.stderr)
        return 2
    size, names = int(loaded.info["image_size"]), loaded.info["class_names"]

    def answers(images) -> list[dict]:
        return loaded.assessor.answers(score(loaded.scorer, images, names))

    def answered(name: str, data: bytes) -> tuple[bool, float] | None:
        """(answered out of distribution, the nearest frame's gate distance) for one file; None: unreadable."""
        series, errors = read_scans([(name, name.split(":")[-1], data)], None)
        if errors or not series or not series[0].slices:
            log.info("ood_gate: %s not read (%s)", name, errors[0][2] if errors else "no slices")
            return None
        one = series[0]
        slices = answers(np.stack([prepare(pixels, size) for pixels in one.slices]))
        verdict = slices[0] if one.kind == "image" else series_answer(slices)
        refused = one.refusal is not None or verdict["status"] == OUT_OF_DISTRIBUTION
        return refused, min(a["gate_distance"] for a in slices)

    test = load_split(args.split, "test", loaded.info["task"])
    in_distribution = np.array([a["gate_distance"] for a in answers(test["x"])])
    test_refused = np.array([answered(str(path), Path(path).read_bytes())[0] for path in test["path"]])
    non_mr, mr = dicom_samples()
    photos, phantom = photographs()
    kinds = {
        "photographs (scikit-image)": photos,
        "head phantom (Shepp-Logan)": phantom,
        "head CT (Kaggle mirror, reviewed)": mirror_head_ct(args.review),
        "non-MR DICOM (pydicom samples)": non_mr,
        **synthetic(),
        **mni152_planes(),
        "MR DICOM (pydicom samples)": mr,
    }
    result = {
        "model": args.model,
        "test_split": {
            "images": len(in_distribution),
            "refused": round(float(test_refused.mean()), 4),
            "gate_refused": round(float((in_distribution > 1).mean()), 4),
        },
        "kinds": {},
    }
    for kind, files in kinds.items():
        if not files:
            continue
        read = {name: found for name, data in files.items() if (found := answered(name, data)) is not None}
        refused = np.array([r for r, _ in read.values()])
        d = np.array([distance for _, distance in read.values()])
        labels = np.r_[np.zeros(len(in_distribution)), np.ones(len(d))]
        result["kinds"][kind] = {
            "files": len(files),
            "read": len(read),
            "refused": round(float(refused.mean()), 4),
            "gate_refused": round(float((d > 1).mean()), 4),
            "roc_auc": round(float(roc_auc_score(labels, np.r_[in_distribution, d])), 4),
            "passed": sorted(name for name, (r, _) in read.items() if not r),
        }
        log.info(
            "%-32s %3d read: refused %.2f (gate alone %.2f), AUROC %.3f",
            kind,
            len(read),
            refused.mean(),
            (d > 1).mean(),
            result["kinds"][kind]["roc_auc"],
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
