"""A copy of a split folder without one held-out collection's clusters (from all three splits), so that the
train and evaluate stages make a shipped model that never saw that collection: the model a new site's scans
meet (benchmarks/site_watch.py's site B).

    python benchmarks/split_without.py --hold-out kaggle2020_testing --out runs/without_k2020t/split
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from braintumor.atomic import atomic_path
from braintumor.data.datasets import split_images
from braintumor.quality.generalize import HOLD_OUTS, every_image, held_out

SPLITS = ("train", "val", "test")


def split_without(split_dir: Path, name: str, out: Path) -> dict[str, int]:
    """Write `out` as `split_dir` less every image in a cluster of hold-out `name`; returns images kept per split."""
    source, collection = HOLD_OUTS[name]
    everything = every_image(split_dir)
    leaving = np.unique(everything["group"][held_out(everything, source, collection)])
    kept = {}
    with atomic_path(out) as staging:
        staging.mkdir(parents=True)
        shutil.copy(split_dir / "manifest.csv", staging / "manifest.csv")
        for split in SPLITS:
            with np.load(split_dir / f"{split}.npz") as data:
                arrays = {key: data[key] for key in data.files}
            group_of = dict(zip(everything["path"], everything["group"], strict=True))
            keep = ~np.isin(np.array([group_of[p] for p in arrays["path"]]), leaving)
            np.savez(staging / f"{split}.npz", **{key: value[keep] for key, value in arrays.items()})
            np.save(staging / f"{split}.x.npy", np.asarray(split_images(split_dir, split))[keep])
            kept[split] = int(keep.sum())
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split-dir", type=Path, default=Path("artifacts/split"))
    parser.add_argument("--hold-out", required=True, choices=sorted(HOLD_OUTS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(f"split without {args.hold_out}: {split_without(args.split_dir, args.hold_out, args.out)}")


if __name__ == "__main__":
    main()
