"""The train stage's k-fold training, timed, with the quality it buys: params.yaml first, then variants.

Runs `training.fit_folds` (the train stage minus dvclive) on a split directory, then scores the ensemble as
evaluate does: the threshold from the out-of-fold predictions at `evaluate.target_recall`, test metrics there
and at 0.5. The first row (params.yaml on --split-dir) is the baseline that each variant's time is divided by.
The split arrays of all three splits at 96 px are about 30 MiB (`--pack`), so the same command
runs on a GPU host:

    python benchmarks/fold_training.py --pack artifacts/split benchmarks/data/split96   # once, here
    KERAS_BACKEND=jax python benchmarks/fold_training.py --split-dir benchmarks/data/split96 \\
        --variant 128px benchmarks/data/split128 --variant wider benchmarks/data/split96 \\
        'train.small_xception.widths=[48, 96, 192]'

A variant is a name, its split directory (another `split.image_size` needs its own) and KEY=VALUE params
overrides (values in YAML, keys dotted as in `dvc exp run -S`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import yaml

from braintumor.data.datasets import load_split
from braintumor.labels import class_names
from braintumor.model.inference import average_of, tumor_probability
from braintumor.model.train import cross_validation_pool, fit_folds
from braintumor.quality.evaluate import binary_metrics, threshold_for_recall


def pack(split_dir: Path, out_dir: Path) -> None:
    """Copies of a split directory's arrays and manifest (labels compressed; the one-channel images as they are,
    to be memory-mapped)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "test"):
        with np.load(split_dir / f"{name}.npz") as data:
            np.savez_compressed(out_dir / f"{name}.npz", **{key: data[key] for key in data.files})
        shutil.copyfile(split_dir / f"{name}.x.npy", out_dir / f"{name}.x.npy")
    shutil.copyfile(split_dir / "manifest.csv", out_dir / "manifest.csv")
    size = sum(f.stat().st_size for f in out_dir.iterdir()) / 2**20
    print(f"wrote {out_dir}: {size:.1f} MiB")


def override(params: dict, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    *path, last = key.split(".")
    node = params
    for part in path:
        if not isinstance(node.get(part), dict):
            raise SystemExit(f"{assignment!r}: params.yaml has no section {key.rsplit('.', 1)[0]!r}")
        node = node[part]
    if last not in node:
        raise SystemExit(f"{assignment!r}: params.yaml has no key {key!r}")
    node[last] = yaml.safe_load(value)


def fold_predictions(params: dict, split_dir: Path) -> dict:
    """Fit the folds of train+val and ship-average them: the out-of-fold and test P(tumor), with the pool, the
    test split, each fold's summary and the training time."""
    config = params["train"]
    pool = cross_validation_pool(split_dir, config["task"])
    test = load_split(split_dir, "test", config["task"])
    started = time.perf_counter()
    members, summaries, oof, fold_of = fit_folds(params, pool, verbose=0)
    seconds = time.perf_counter() - started
    test_p = tumor_probability(
        average_of(members, mirrored=config["mirror_average"]), test["x"], class_names(config["task"])
    )
    return {
        "pool": pool,
        "test": test,
        "oof": oof,
        "fold": fold_of,
        "test_p": test_p,
        "summaries": summaries,
        "seconds": seconds,
    }


def run(params: dict, split_dir: Path) -> dict:
    """Fit the folds, ship-average them, and score out of fold and on the test split."""
    fitted = fold_predictions(params, split_dir)
    pool, test, oof, p = fitted["pool"], fitted["test"], fitted["oof"], fitted["test_p"]
    summaries, seconds = fitted["summaries"], fitted["seconds"]
    threshold = threshold_for_recall(pool["label"], oof, params["evaluate"]["target_recall"])
    return {
        "seconds": round(seconds, 1),
        "images_per_second": round(sum(s["images"] * s["epochs_run"] for s in summaries) / seconds, 1),
        "epochs": [(s["epochs_run"], s["best_epoch"]) for s in summaries],
        "image_size": int(pool["x"].shape[1]),
        "threshold": round(threshold, 4),
        "out_of_fold": binary_metrics(pool["label"], oof, threshold),
        "test": binary_metrics(test["label"], p, threshold),
        "test_at_0.5": binary_metrics(test["label"], p, 0.5),
    }


def row(name: str, result: dict, baseline_seconds: float) -> str:
    oof, test, half = result["out_of_fold"], result["test"], result["test_at_0.5"]
    epochs = ", ".join(f"{run} ({best})" for run, best in result["epochs"])
    return (
        f"| {name} | {result['image_size']} | {result['seconds']:.0f} | {result['seconds'] / baseline_seconds:.2f} | "
        f"{result['images_per_second']:.0f} | {epochs} | {oof['roc_auc']:.4f} | {oof['specificity']:.4f} | "
        f"{oof['accuracy']:.4f} | {result['threshold']:.4f} | {test['recall']:.4f} / {test['specificity']:.4f} / "
        f"{test['accuracy']:.4f} | {test['roc_auc']:.4f} | {half['recall']:.4f} / {half['specificity']:.4f} / "
        f"{half['accuracy']:.4f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pack",
        nargs=2,
        type=Path,
        metavar=("SPLIT_DIR", "OUT_DIR"),
        help="write compressed copies of SPLIT_DIR's arrays to OUT_DIR and stop",
    )
    parser.add_argument("--split-dir", type=Path, default=Path("artifacts/split"))
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME SPLIT_DIR [KEY=VALUE]",
        help="a variant to run after params.yaml; repeatable",
    )
    parser.add_argument("--json", type=Path, help="also write every result here")
    args = parser.parse_args()
    if args.pack:
        pack(*args.pack)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    params = yaml.safe_load(Path("params.yaml").read_text())
    runs = [("params.yaml", args.split_dir, params)]
    for name, *rest in args.variant:
        if not rest:
            parser.error(f"--variant {name}: give its split directory after the name")
        split_dir, *assignments = rest
        variant = copy.deepcopy(params)
        for assignment in assignments:
            override(variant, assignment)
        runs.append((name, Path(split_dir), variant))  # overrides checked before any training starts
    print(
        f"backend {keras.backend.backend()}, {params['train']['folds']} folds, target recall "
        f"{params['evaluate']['target_recall']}"
    )
    print(
        "| run | px | train s | time ratio | images/s | epochs per fold (best) | OOF AUC | OOF specificity | "
        "OOF accuracy | threshold | test recall / spec / acc | test AUC | at 0.5: recall / spec / acc |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    results = {}
    for name, split_dir, run_params in runs:
        results[name] = run(run_params, split_dir)
        print(row(name, results[name], results["params.yaml"]["seconds"]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
