"""Screen training recipes on collections the model never saw: cheap, several seeds, paired by seed and image.

For each arm (params.yaml plus a few overrides), seed and hold-out (braintumor.quality.generalize's
HOLD_OUTS), the hold-out's clusters leave the train+val pool, ONE model fits on the first of two seeded folds
of the rest (half the pool) and early-stops on the other half, and scores the held-out collection. Cheaper
than the generalize stage (which trains `train.folds` models per hold-out, as the train stage does) by
about 2 x folds: a screen, to find the arms worth confirming with the full protocol, not a figure to ship.
Baseline: the first arm listed; each other arm gets its held-out AUC difference against it, paired by seed
(the same folds and the same held-out images), with a 95 % bootstrap interval over the held-out images of the
seed-averaged difference; the spread over seeds is shown beside it.

    python benchmarks/collection_screen.py --arms baseline robust --seeds 1 2 --epochs 30
    KERAS_BACKEND=jax python benchmarks/collection_screen.py ...   # on a GPU host

Each (arm, seed, hold-out) run saves its held-out P(tumor) under --out; a later call reuses it, so a screen
can be extended with more seeds or arms, or resumed after a stop.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from braintumor.stage import quiet_native_output

if __name__ == "__main__":
    quiet_native_output()  # TensorFlow's start-up and optimiser lines, before the imports below load it
from braintumor.atomic import atomic_path, write_json  # noqa: E402
from braintumor.data.split import split  # noqa: E402
from braintumor.model.inference import average_of, tumor_probability  # noqa: E402
from braintumor.model.train import cross_validation_pool, fit, folds_of, output_names  # noqa: E402
from braintumor.params import load_params, validate_train  # noqa: E402
from braintumor.quality.generalize import HOLD_OUTS, every_image, scored_rows  # noqa: E402

INTENSITY = {"bias_field": 0.5, "gamma": 0.3, "blur": 0.5, "noise": 0.03}
# name -> overrides of params.yaml (nested dicts merge). An arm that changes `split` trains on a split of the
# same images made for it under --out (the split stage's code, the shipped seed: the same images in each split).
ARMS = {
    "baseline": {},
    "standardize": {"train": {"standardize": True}},
    "intensity_aug": {"train": {"augment": INTENSITY}},
    "robust": {"train": {"standardize": True, "augment": INTENSITY}},
    "style_balanced": {"train": {"class_weight": "balanced_by_style"}},
    "contrast_map": {"train": {"augment": {"contrast_map": 0.5}}},
    "subtypes": {"train": {"subtypes": True}},  # the binary task through the four-way head
    "robust_style": {"train": {"standardize": True, "augment": INTENSITY, "class_weight": "balanced_by_style"}},
    "px128": {"split": {"image_size": 128}},
}


def merged(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) else value
    return out


def split_for(base: dict, arm: str, split_dir: str, dedup_dir: str, out: Path) -> str:
    """The split an arm trains on: the given one, or (an arm that changes `split`) one made for it once."""
    if "split" not in ARMS[arm]:
        return split_dir
    made = out / f"split-{arm}"
    if not made.exists():
        split(merged(base, {"split": ARMS[arm]["split"]}), dedup_dir, made, out / f"split-{arm}.json")
    return str(made)


def run(params: dict, split_dir: str, name: str, out_file: Path) -> dict:
    """One screening model without hold-out `name`: its held-out P(tumor) (saved to `out_file`)."""
    if out_file.exists():
        return dict(np.load(out_file))
    everything = every_image(split_dir)
    rows = scored_rows(everything, name)
    pool = cross_validation_pool(split_dir, params["train"]["task"])
    keep = ~np.isin(pool["group"], everything["group"][rows])
    pool = {key: value[keep] for key, value in pool.items()}
    fit_rows, stop_rows = folds_of(pool, 2, params["seed"])[0]
    started = time.perf_counter()
    model, summary = fit(params, *({k: v[r] for k, v in pool.items()} for r in (fit_rows, stop_rows)), verbose=0)
    config = validate_train(params)
    shipped = average_of([model], mirrored=True) if config["mirror_average"] else model
    p = tumor_probability(shipped, np.asarray(everything["x"][rows]), output_names(config))
    result = {
        "path": everything["path"][rows],
        "label": everything["label"][rows],
        "p": p,
        "seconds": np.float64(time.perf_counter() - started),
        "epochs": np.array([summary["epochs_run"], summary["best_epoch"]]),
    }
    with atomic_path(out_file) as partial:
        np.savez(partial, **result)
    return result


def paired_interval(label: np.ndarray, arm_p: list, base_p: list, resamples: int, seed: int) -> list[float]:
    """95 % bootstrap interval (over images) of the seed-averaged AUC difference arm - baseline."""
    rng = np.random.default_rng(seed)
    diffs = []
    while len(diffs) < resamples:
        rows = rng.integers(0, len(label), len(label))
        if label[rows].min() == label[rows].max():
            continue
        diffs.append(
            np.mean(
                [
                    roc_auc_score(label[rows], a[rows]) - roc_auc_score(label[rows], b[rows])
                    for a, b in zip(arm_p, base_p, strict=True)
                ]
            )
        )
    return [round(float(q), 4) for q in np.percentile(diffs, [2.5, 97.5])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split-dir", default="artifacts/split")
    parser.add_argument("--dedup-dir", default="artifacts/dedup", help="what an arm's own split is made from")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--hold-out", nargs="+", default=sorted(HOLD_OUTS), choices=sorted(HOLD_OUTS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/data/collection_screen")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = load_params(args.params)
    base["train"].update(epochs=args.epochs, early_stopping_patience=args.patience)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for arm in args.arms:
        split_dir = split_for(base, arm, args.split_dir, args.dedup_dir, out)
        for seed in args.seeds:
            params = {**merged(base, ARMS[arm]), "seed": seed}
            for name in args.hold_out:
                found = run(params, split_dir, name, out / f"{arm}.{seed}.{name}.npz")
                results[arm, seed, name] = found
                logging.info(
                    "%s seed %d without %s: AUC %.4f (%d epochs, best %d, %.0f s)",
                    arm,
                    seed,
                    name,
                    roc_auc_score(found["label"], found["p"]),
                    *found["epochs"],
                    float(found["seconds"]),
                )
    table, baseline = {}, args.arms[0]
    for name in args.hold_out:
        for arm in args.arms:
            aucs = [roc_auc_score(results[arm, s, name]["label"], results[arm, s, name]["p"]) for s in args.seeds]
            row = {"auc_per_seed": [round(a, 4) for a in aucs], "auc_mean": round(float(np.mean(aucs)), 4)}
            if arm != baseline:
                label = results[arm, args.seeds[0], name]["label"]
                assert all(  # paired image by image: the same held-out images in the same order
                    np.array_equal(results[arm, s, name]["path"], results[baseline, s, name]["path"])
                    for s in args.seeds
                )
                arm_p = [results[arm, s, name]["p"] for s in args.seeds]
                base_p = [results[baseline, s, name]["p"] for s in args.seeds]
                row["minus_baseline"] = round(row["auc_mean"] - table[name][baseline]["auc_mean"], 4)
                row["minus_baseline_ci95"] = paired_interval(label, arm_p, base_p, args.bootstrap, 0)
            table.setdefault(name, {})[arm] = row
    write_json(out / "summary.json", {"seeds": args.seeds, "epochs": args.epochs, "table": table})
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
