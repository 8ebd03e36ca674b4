"""A tiny prepared split (the `split` stage's output format) of synthetic scans, for model-side tests."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from braintumor.params import load_params

from conftest import REPO, brain_image

SUBTYPES = ["glioma", "meningioma", "pituitary"]


def synthetic_scan(seed: int, tumor: bool, size: int) -> np.ndarray:
    """A head; tumors add a bright round lesion at a random place inside it."""
    gray = brain_image(seed, size).astype(float) * 0.6
    if tumor:
        rng = np.random.default_rng(seed + 10_000)
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        yy, xx = np.mgrid[:size, :size]
        gray[(yy - cy) ** 2 + (xx - cx) ** 2 < (size * 0.12) ** 2] = 255
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)


def make_split(root: Path, size: int = 48, counts=(("train", 96), ("val", 32), ("test", 32))) -> Path:
    """Write artifacts/split-like files under `root`: {train,val,test}.npz and manifest.csv (balanced)."""
    root.mkdir(parents=True, exist_ok=True)
    rows, seed = [], 0
    for split, n in counts:
        x, y, subtype, path = [], [], [], []
        for k in range(n):
            seed += 1
            tumor = k % 2 == 0
            x.append(synthetic_scan(seed, tumor, size))
            y.append(int(tumor))
            subtype.append(SUBTYPES[k // 2 % 3] if tumor else "none")
            path.append(f"artifacts/fetch/images/synthetic/{split}-{k:03d}.png")
            rows.append(
                {
                    "path": path[-1],
                    "label": y[-1],
                    "subtype": subtype[-1],
                    "source": "synthetic",
                    "group": f"g{seed}",
                    "split": split,
                    "sha256": hashlib.sha256(x[-1].tobytes()).hexdigest(),
                    "original": f"{split}/{'tumor' if tumor else 'no_tumor'}/{k:03d}.png",
                }
            )
        np.savez(
            root / f"{split}.npz",
            x=np.stack(x),
            y=np.array(y, dtype=np.int8),
            subtype=np.array(subtype),
            path=np.array(path),
        )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def tiny_params(model: str = "seed_fsm", **train) -> dict:
    """The shipped params, shrunk so that a training runs in seconds."""
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["split"]["image_size"] = 48
    params["train"].update({"model": model, "epochs": 6, "batch_size": 16, "early_stopping_patience": 3, **train})
    params["train"]["small_xception"]["widths"] = [8, 16]
    params["train"]["folds"] = 2
    params["evaluate"].update(bootstrap=200, gallery=4)
    params["explain"].update(images=1, lime_samples=20, lime_superpixels=3)
    return params
