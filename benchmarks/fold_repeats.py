"""What averaging more k-fold repeats buys: the train stage's k-fold training repeated under other seeds.

Each repeat is `training.fit_folds` with params.yaml and another `seed`, which moves the fold assignment,
the initial weights, the augmentation and the shuffling (the split stays). Averaged over r repeats, every
train+val image has r out-of-fold predictions, each from a model that never saw it (repeated k-fold), and
a shipped model would average r × k members. The table scores single repeats and every combination of r of
them as `evaluate` would: the threshold from the (averaged) out-of-fold predictions at
`evaluate.target_recall`, then the test split at that threshold. Its baseline is a single repeat: the ratio
column is the share of healthy scans flagged out of fold, against the mean of single repeats. The last column
is a ceiling, not a result: the test specificity with the threshold placed on the test split itself for
`--ceiling-recall`, which bounds what any honestly placed threshold can give there.

Repeats run in parallel worker processes (`--jobs`); each one's predictions go to `--out`, where a later
call finds and reuses them. On a GPU host, from the split packed by `fold_training.py --pack`:

    XLA_PYTHON_CLIENT_PREALLOCATE=false KERAS_BACKEND=jax python benchmarks/fold_repeats.py \\
        --split-dir benchmarks/data/split96 --seeds 42 1 2 3 4 5 --jobs 6 --out benchmarks/data/repeats
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import yaml
from fold_training import fold_predictions, override  # benchmarks/ is on the path of a script run from it
from sklearn.metrics import roc_auc_score

from braintumor.atomic import atomic_path, write_json
from braintumor.data.datasets import load_split
from braintumor.errors import ParamError
from braintumor.params import validate_train
from braintumor.quality.evaluate import binary_metrics, threshold_for_recall


def run_repeat(params: dict, split_dir: Path, seed: int, out_file: Path) -> str:
    """One k-fold training under `seed`: its out-of-fold and test P(tumor), saved to `out_file`."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s seed {seed}: %(message)s")  # fit_folds' progress
    fitted = fold_predictions({**params, "seed": seed}, split_dir)
    pool, test, summaries = fitted["pool"], fitted["test"], fitted["summaries"]
    with atomic_path(out_file) as partial:
        np.savez(
            partial,
            path=pool["path"],
            label=pool["label"],
            oof=fitted["oof"],
            fold=fitted["fold"],
            test_path=test["path"],
            test_label=test["label"],
            test_p=fitted["test_p"],
            seconds=fitted["seconds"],
            epochs=np.array([(s["epochs_run"], s["best_epoch"]) for s in summaries]),
            train_params=json.dumps(params["train"], sort_keys=True),
        )
    return f"seed {seed}: {len(summaries)} folds in {fitted['seconds']:.0f} s"


def score(repeats: list[dict], target_recall: float, ceiling_recall: float) -> dict:
    """Evaluate's operating point for the average of `repeats`: out-of-fold threshold, then test. Also the
    ceiling: the test specificity at the threshold placed on the test split itself for `ceiling_recall`, which
    no threshold chosen without the test split can beat."""
    label, test_label = repeats[0]["label"], repeats[0]["test_label"]
    oof = np.mean([r["oof"] for r in repeats], axis=0)
    test_p = np.mean([r["test_p"] for r in repeats], axis=0)
    threshold = threshold_for_recall(label, oof, target_recall)
    ceiling = binary_metrics(test_label, test_p, threshold_for_recall(test_label, test_p, ceiling_recall))
    return {
        "threshold": threshold,
        "out_of_fold": binary_metrics(label, oof, threshold),
        "test": binary_metrics(test_label, test_p, threshold),
        "ceiling": ceiling,
    }


def summarize(results: list[dict], key: str, metric: str) -> str:
    values = [r[key][metric] for r in results]
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ({min(values):.4f}–{max(values):.4f})"


def report(repeats: dict[int, dict], target_recall: float, ceiling_recall: float) -> list[dict]:
    """Print one row per ensemble size r: the mean (min–max) over every combination of r repeats."""
    rows, seeds = [], sorted(repeats)
    first = repeats[seeds[0]]
    for seed in seeds[1:]:
        if not all(np.array_equal(first[key], repeats[seed][key]) for key in ("path", "test_path")):
            raise SystemExit(f"seeds {seeds[0]} and {seed} were run on different splits; use one --out per split")
    seconds = ", ".join(f"{float(repeats[s]['seconds']):.0f}" for s in seeds)
    print(f"{len(seeds)} repeats (seeds {', '.join(map(str, seeds))}); train s per repeat: {seconds}")
    print(
        "| repeats averaged | combinations | OOF AUC | OOF specificity | OOF accuracy | flagged healthy ratio | "
        "threshold | test recall | test specificity | test accuracy | test AUC | "
        f"test specificity ceiling at recall ≥ {ceiling_recall} |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    baseline = None
    for size in range(1, len(seeds) + 1):
        results = [
            score([repeats[s] for s in combo], target_recall, ceiling_recall)
            for combo in itertools.combinations(seeds, size)
        ]
        flagged = np.mean([1 - r["out_of_fold"]["specificity"] for r in results])
        baseline = baseline if baseline is not None else flagged
        thresholds = [r["threshold"] for r in results]
        print(
            f"| {size} | {len(results)} | {summarize(results, 'out_of_fold', 'roc_auc')} | "
            f"{summarize(results, 'out_of_fold', 'specificity')} | {summarize(results, 'out_of_fold', 'accuracy')} | "
            f"{flagged / baseline:.2f} | {np.mean(thresholds):.3f} | {summarize(results, 'test', 'recall')} | "
            f"{summarize(results, 'test', 'specificity')} | {summarize(results, 'test', 'accuracy')} | "
            f"{summarize(results, 'test', 'roc_auc')} | {summarize(results, 'ceiling', 'specificity')} |",
            flush=True,
        )
        rows.append({"repeats": size, "results": results})
    return rows


def by_collection(repeats: dict[int, dict], split_dir: Path, task: str) -> str:
    """Test ROC AUC of the average of all repeats within each source's sub-collection (Kaggle 2020's folders)."""
    first = next(iter(repeats.values()))
    test = load_split(split_dir, "test", task)
    if not np.array_equal(test["path"], first["test_path"]):
        raise SystemExit(
            f"{split_dir}: its test split is not the one the repeats were scored on; give their --split-dir"
        )
    collection = np.array(["/".join(filter(None, key)) for key in zip(test["source"], test["collection"], strict=True)])
    label, p = first["test_label"], np.mean([r["test_p"] for r in repeats.values()], axis=0)
    parts = []
    for name in np.unique(collection):
        inside = collection == name
        auc = roc_auc_score(label[inside], p[inside]) if len(np.unique(label[inside])) == 2 else float("nan")
        parts.append(f"{name}: {inside.sum()} images, {(label[inside] == 0).sum()} healthy, AUC {auc:.3f}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split-dir", type=Path, default=Path("artifacts/split"))
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="one repeat per seed")
    parser.add_argument("--jobs", type=int, default=1, help="repeats trained at once (one process each)")
    parser.add_argument("--out", type=Path, required=True, help="folder of each repeat's predictions (reused)")
    parser.add_argument(
        "--ceiling-recall",
        type=float,
        default=0.97,
        help="test recall at which to report the specificity ceiling (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="params.yaml overrides in YAML, keys dotted as in `dvc exp run -S`",
    )
    args = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    for assignment in args.set:
        override(params, assignment)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if not (args.split_dir / "manifest.csv").is_file():
        parser.error(
            f"--split-dir {args.split_dir}: no manifest.csv there; give the split stage's output folder "
            "(artifacts/split) or one packed by fold_training.py --pack"
        )
    try:
        validate_train(params)  # a bad override stops here, before any worker starts
    except ParamError as err:
        parser.error(str(err))
    files = {seed: args.out / f"seed{seed}.npz" for seed in args.seeds}
    todo = [seed for seed, file in files.items() if not file.exists()]
    print(
        f"{len(args.seeds) - len(todo)} repeats found in {args.out}, {len(todo)} to train, {args.jobs} at a time",
        flush=True,
    )
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_repeat, params, args.split_dir, seed, files[seed]) for seed in todo]
        for future in as_completed(futures):
            print(future.result(), flush=True)
    repeats = {}
    for seed, file in files.items():
        with np.load(file) as data:
            repeats[seed] = {key: data[key] for key in data.files}
        saved = repeats[seed].get("train_params")  # absent in files made before it was recorded
        if saved is not None and json.loads(str(saved)) != params["train"]:
            raise SystemExit(f"{file} was trained with other `train` params than these; give another --out")
    rows = report(repeats, params["evaluate"]["target_recall"], args.ceiling_recall)
    print(
        f"All {len(repeats)} repeats averaged, test split by sub-collection: "
        f"{by_collection(repeats, args.split_dir, params['train']['task'])}"
    )
    write_json(args.out / "summary.json", rows)


if __name__ == "__main__":
    main()
