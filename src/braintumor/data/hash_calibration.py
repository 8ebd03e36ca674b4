"""Calibrate the near-duplicate thresholds on real images instead of guessing them.

Positives: altered copies of real scans (resize, JPEG re-encode, brightness/contrast, crop, shift,
grayscale<->RGB) must fall within the thresholds of their original. Negatives: scans of *different*
tumor classes of the 2020 Kaggle set are different images by construction (a copy filed under two
classes would be a label error), so any such pair within the thresholds is a false merge.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageOps

from braintumor.data.hashing import Hashes, hamming, hash_images, near_pairs


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _crop(img: Image.Image, share: float) -> Image.Image:
    w, h = img.size
    dx, dy = int(w * share), int(h * share)
    return img.crop((dx, dy, w - dx, h - dy))


def _shift(img: Image.Image, share: float) -> Image.Image:
    w, h = img.size
    canvas = Image.new(img.mode, (w, h))
    canvas.paste(img, (int(w * share), int(h * share)))
    return canvas


ALTERATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resize_half": lambda img: img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC),
    "resize_up_1.5": lambda img: img.resize((img.width * 3 // 2, img.height * 3 // 2), Image.Resampling.BICUBIC),
    "jpeg_q50": lambda img: _jpeg(img, 50),
    "brightness_+15%": lambda img: ImageEnhance.Brightness(img).enhance(1.15),
    "contrast_-15%": lambda img: ImageEnhance.Contrast(img).enhance(0.85),
    "crop_5%": lambda img: _crop(img, 0.05),
    "shift_5%": lambda img: _shift(img, 0.05),
    "pad_10%": lambda img: ImageOps.expand(img, border=img.width // 10, fill=0),
    "to_grayscale": lambda img: img.convert("L"),
    "to_rgb": lambda img: img.convert("L").convert("RGB"),
}


def write_altered_copies(paths: list[str], out_dir: Path) -> pd.DataFrame:
    """Write every alteration of every image as PNG; returns (original, alteration, path) rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, path in enumerate(paths):
        with Image.open(path) as img:
            img.load()
            for name, alter in ALTERATIONS.items():
                target = out_dir / f"{index:05d}-{name}.png"
                alter(img).save(target, compress_level=1)
                rows.append({"original": index, "alteration": name, "path": str(target)})
    return pd.DataFrame(rows)


def hash_calibration_set(
    originals: list[str], altered: pd.DataFrame, hash_size: int, workers: int | None = None
) -> tuple[Hashes, Hashes]:
    """Hashes of the originals and of their altered copies (rows of `altered`)."""
    base, errors = hash_images(originals, hash_size, workers)
    copies, copy_errors = hash_images(altered["path"].tolist(), hash_size, workers)
    if errors or copy_errors:
        raise ValueError(f"calibration images failed to decode: {[str(e) for e in errors + copy_errors][:3]}")
    return base, copies


def rates(
    base: Hashes, copies: Hashes, altered: pd.DataFrame, classes: list[str], max_phash: int, max_dhash: int
) -> dict:
    """Detection rate on altered copies and false-merge rates between images of different classes.

    Args:
        base: hashes of the original images.
        copies: hashes of their altered copies, row for row.
        altered: one row per copy, naming its original and its alteration.
        classes: the class of each original.
        max_phash: the pHash limit tried.
        max_dhash: the dHash limit tried.
    """
    index = altered["original"].to_numpy()
    dp = hamming(copies.phash, base.phash[index])
    dd = hamming(copies.dhash, base.dhash[index])
    caught = (dp <= max_phash) & (dd <= max_dhash)
    per_alteration = pd.Series(caught).groupby(altered["alteration"].to_numpy()).mean().round(3)
    pairs = near_pairs(base, max_phash, max_dhash)
    labels = np.asarray(classes)
    false = labels[pairs.i] != labels[pairs.j]
    n = len(labels)
    cross_class_pairs = (n * n - int((pd.Series(labels).value_counts() ** 2).sum())) // 2
    with_twin = np.zeros(n, dtype=bool)
    with_twin[pairs.i[false]] = with_twin[pairs.j[false]] = True
    return {
        "phash_max_distance": max_phash,
        "dhash_max_distance": max_dhash,
        "detection_rate": round(float(caught.mean()), 4),
        "per_alteration": per_alteration.to_dict(),
        "cross_class_pairs": cross_class_pairs,
        "false_merge_pairs": int(false.sum()),
        "false_merge_rate": float(false.sum() / max(cross_class_pairs, 1)),
        "images_with_false_twin": round(float(with_twin.mean()), 4),
    }
