"""Calibrate the dedup thresholds on the real Kaggle 2020 mirror; prints a sweep and the chosen point.

    KAGGLEHUB_CACHE=../shared/kagglehub python benchmarks/dedup_calibration.py [--sample 200]

Positives: `--sample` training scans, each altered 10 ways (calibration.ALTERATIONS). Negatives: all
pairs of training scans from different classes (distinct images by construction). Baseline in the same
run: a single 64-bit pHash at Hamming distance 8, the usual notebook choice.
"""

import argparse
import random
import tempfile
import time
from pathlib import Path

import kagglehub
import pandas as pd

from braintumor.data.hash_calibration import hash_calibration_set, rates, write_altered_copies
from braintumor.params import load_params

HANDLE = "sartajbhuvaji/brain-tumor-classification-mri/versions/2"
SWEEP = [(24, 40), (32, 48), (36, 52), (40, 60), (44, 60), (48, 64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, default=200, help="originals to alter (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = load_params("params.yaml")["dedup"]
    root = Path(kagglehub.dataset_download(HANDLE)) / "Training"
    paths = sorted(str(p) for p in root.glob("*/*") if p.is_file())
    classes = [Path(p).parent.name for p in paths]
    sample = random.Random(args.seed).sample(range(len(paths)), args.sample)
    with tempfile.TemporaryDirectory() as tmp:
        altered = write_altered_copies([paths[i] for i in sample], Path(tmp))
        altered["original"] = [sample[i] for i in altered["original"]]
        rows = []
        for hash_size, points in ((8, [(8, 64)]), (config["hash_size"], SWEEP)):
            started = time.perf_counter()
            base, copies = hash_calibration_set(paths, altered, hash_size)
            seconds = time.perf_counter() - started
            for max_p, max_d in points:
                result = rates(base, copies, altered, classes, max_p, max_d)
                rows.append(
                    {
                        "hash_size": hash_size,
                        **{k: v for k, v in result.items() if k != "per_alteration"},
                        "hash_seconds": round(seconds, 1),
                    }
                )
                if (hash_size, max_p, max_d) == (
                    config["hash_size"],
                    config["phash_max_distance"],
                    config["dhash_max_distance"],
                ):
                    chosen = result
    print(f"{len(paths)} training scans of 4 classes, {len(altered)} altered copies of {args.sample} of them")
    print(pd.DataFrame(rows).to_string(index=False))
    print("chosen thresholds (params.yaml), detection per alteration:")
    print(pd.Series(chosen["per_alteration"]).to_string())
    baseline = rows[0]
    print(
        f"summary: chosen pHash<={chosen['phash_max_distance']} & dHash<={chosen['dhash_max_distance']} "
        f"(hash_size {config['hash_size']}) detects {chosen['detection_rate']:.1%} of altered copies with "
        f"{chosen['images_with_false_twin']:.2%} of scans given a false twin; baseline 64-bit pHash<=8: "
        f"{baseline['detection_rate']:.1%} detected, {baseline['images_with_false_twin']:.2%} false twins"
    )


if __name__ == "__main__":
    main()
