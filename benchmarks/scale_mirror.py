"""Build an N-image mirror from the real scans, in the layout of a user's `data/` folder, for scale runs.

Each output image is a distinct altered copy of one of the deduplicated real scans (taken in turn): a random
crop of 55-85 % of the side at a random place, a quarter turn or a mirror, a gamma change and Gaussian noise,
saved as a JPEG of at most 256 px. Crops beyond 5 % already escape the dedup thresholds most of the time
(benchmarks/RESULTS.md, "Dedup threshold calibration"), so dedup keeps most of the copies; the scale run
reports how many it merges. Labels and tumor types follow the scan copied (`<label folder>/<n>.jpg`).

    python benchmarks/scale_mirror.py 100000 /tmp/scale/mirror100k   # after `dvc repro dedup`
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from braintumor.data.datasets import read_manifest
from braintumor.data.images import load_grayscale
from braintumor.parallel import parallel_map

FOLDER = {"glioma": "glioma", "meningioma": "meningioma", "pituitary": "pituitary", "unknown": "tumor"}
SIDE = 256
SCANS: tuple[list[np.ndarray], list[str]] = ([], [])  # set before the worker processes fork, read by them


def altered(base: np.ndarray, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    h, w = base.shape
    side = int(min(h, w) * rng.uniform(0.55, 0.85))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = base[top : top + side, left : left + side].astype(np.float32) / 255.0
    crop = np.rot90(crop, rng.integers(0, 4))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = crop ** rng.uniform(0.7, 1.4) * 255.0 + rng.normal(0.0, rng.uniform(2.0, 8.0), crop.shape)
    return Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((SIDE, SIDE), Image.BILINEAR)


def write_chunk(chunk: tuple[int, int], out: Path, seed: int) -> int:
    bases, folders = SCANS
    start, stop = chunk
    for n in range(start, stop):
        k = n % len(bases)
        altered(bases[k], seed * 1_000_003 + n).save(out / folders[k] / f"{n:06d}.jpg", quality=90)
    return stop - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--manifest", default="artifacts/dedup/manifest.csv", help="the real scans to alter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()
    started = time.perf_counter()
    scans = read_manifest(args.manifest)
    folders = [
        "no_tumor" if label == 0 else FOLDER.get(subtype, "tumor")
        for label, subtype in zip(scans.label, scans.subtype, strict=True)
    ]
    bases = [np.asarray(load_grayscale(p, draft_size=2 * SIDE)) for p in scans.path]
    SCANS[0].extend(bases)
    SCANS[1].extend(folders)
    for folder in set(folders):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    chunks = [(s, min(s + 2000, args.images)) for s in range(0, args.images, 2000)]
    write = functools.partial(write_chunk, out=args.out, seed=args.seed)
    written = sum(parallel_map(write, chunks, args.workers, desc="scale mirror: chunks of 2000"))
    counts = pd.Series([folders[n % len(bases)] for n in range(args.images)]).value_counts().to_dict()
    print(f"wrote {written} images to {args.out} in {time.perf_counter() - started:.0f} s: {counts}")


if __name__ == "__main__":
    main()
