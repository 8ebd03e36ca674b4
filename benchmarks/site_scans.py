"""How many of a new site's own scans the model needs (issue 43 §3): a held-out collection plays a site whose
scans arrive with reader verdicts (their labels); N of them enter training, the rest of the site is scored.

Per seed (= per draw of which scans arrive): the site's clusters leave the train+val pool; the site's brain-MR
scans are put in a seeded random order and the first N arrive (nested: the 25 include the 10). Arrivals enter
training as `braintumor feedback accept` puts them there: a `data/site-<name>/` folder of the local source,
so `train.class_weight: balanced_by_source` weighs the site's classes as it weighs any source's, each in
proportion to its size while under `train.full_weight_images` (`--full-weight-images` overrides it). Two ways to use
them, each a screen-sized fit (one model on half the pool, early-stopped on the other half, as
`collection_screen.py`: cheaper than the shipped five folds by about 10 x):

- `retrain`: a new model from scratch with the arrivals in its fitting half;
- `update`: the N = 0 model (the one in use) fine-tuned for a few epochs on the arrivals with its own fitting
  half replayed beside them, at a tenth of the learning rate: `train.sites`' update of a small site, the same
  function (`update_after_fit`), so what is measured here is what the pipeline does.

Scored for every (way, seed, N): the site's scans that did not arrive (ROC AUC; specificity at recall 0.98), and
the test split without the site (in distribution: what an update must not lose). Differences are paired with
N = 0 of the same seed on the same images; intervals are 95 % bootstrap over images of the seed-averaged figure.
With `--baseline DIR` the summary also pairs each retrain with the one of the same seed and N under DIR (the runs
of another recipe, e.g. `--full-weight-images 0`).

    python benchmarks/site_scans.py --way update --seeds 1                   # N = 0 and every update
    python benchmarks/site_scans.py --way retrain --seeds 1 --arrivals 25
    python benchmarks/site_scans.py --summary --seeds 1 2 3                  # table + plot from the runs
    python benchmarks/site_scans.py --site kaggle2018 --arrivals 10 25 50 100 --way retrain   # 186 scans

With `--folds` a run is the train stage's own fit instead (`fit_folds`: `train.folds` models over the whole pool,
the params' epochs and patience, the site joining by `--way` as `train.sites` makes it join), scored as their
average: about 10 x the cost of a screen-sized run, and the figures of the model that ships.

    python benchmarks/site_scans.py --site kaggle2018 --folds --way retrain --seeds 1 --arrivals 100 \
        --out benchmarks/data/site_scans_folds

Each run saves its scores under --out; a run already there is reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import keras
import matplotlib
import numpy as np
from sklearn.metrics import roc_auc_score

from braintumor.atomic import atomic_path, write_json
from braintumor.data.datasets import load_split
from braintumor.model.inference import average_of, tumor_probability
from braintumor.model.train import cross_validation_pool, fit, fit_folds, folds_of, output_names, update_after_fit
from braintumor.params import load_params, validate_train
from braintumor.quality.evaluate import binary_metrics, threshold_for_recall
from braintumor.quality.generalize import HOLD_OUTS, every_image, scored_rows

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ARRIVALS = (0, 10, 25, 50, 100, 200)
RECALL = 0.98
log = logging.getLogger("site_scans")


def rows_of(data: dict, rows: np.ndarray) -> dict:
    return {key: (np.asarray(value[rows]) if key == "x" else value[rows]) for key, value in data.items()}


def joined(a: dict, b: dict) -> dict:
    return {key: np.concatenate([a[key], b[key]]) for key in a}


class Site:
    """The site's scans, the pool without them, its fitting/stopping halves and the in-distribution test scans."""

    def __init__(self, params: dict, split_dir: str, name: str):
        everything = every_image(split_dir)
        rows = scored_rows(everything, name) & (everything["modality"] == "mr")
        self.scans = rows_of(everything, np.flatnonzero(rows))
        self.scans["source"] = np.full(len(self.scans["y"]), "local", dtype=object)  # a data/site-*/ folder
        self.scans["collection"] = np.full(len(self.scans["y"]), f"site-{name}", dtype=object)
        self.scans["path"] = np.array([f"data/site-{name}/{p.rsplit('/', 1)[-1]}" for p in self.scans["path"]])
        task = validate_train(params)["task"]
        pool = cross_validation_pool(split_dir, task)
        pool = rows_of(pool, ~np.isin(pool["group"], everything["group"][rows]))
        self.pool = pool
        test = load_split(split_dir, "test", "binary")
        keep = test["representative"] & ~np.isin(test["group"], everything["group"][rows])
        self.test_x, self.test_y = np.asarray(test["x"][keep]), test["label"][keep]

    def halves(self, seed: int) -> tuple[dict, dict]:
        fit_rows, stop_rows = folds_of(self.pool, 2, seed)[0]
        return rows_of(self.pool, fit_rows), rows_of(self.pool, stop_rows)

    def order(self, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).permutation(len(self.scans["y"]))

    def arrivals(self, seed: int, n: int) -> dict:
        return rows_of(self.scans, self.order(seed)[:n])


def scores(members: list, config: dict, site: Site) -> dict:
    """P(tumor) of every site scan and test scan, by the average of `members` (and their mirrored views) as it
    would ship."""
    mirrored = config["mirror_average"]
    shipped = average_of(members, mirrored) if mirrored or len(members) > 1 else members[0]
    names = output_names(config)
    return {
        "p_site": tumor_probability(shipped, site.scans["x"], names),
        "p_test": tumor_probability(shipped, site.test_x, names),
    }


def save(out_file: Path, result: dict) -> None:
    with atomic_path(out_file) as partial:
        np.savez(partial, **result)


def retrain(params: dict, site: Site, seed: int, n: int, out_file: Path) -> keras.Model:
    """A model from scratch with the first `n` arrivals in its fitting half."""
    fit_half, stop_half = site.halves(seed)
    started = time.perf_counter()
    model, summary = fit({**params, "seed": seed}, joined(fit_half, site.arrivals(seed, n)), stop_half, verbose=0)
    seconds = time.perf_counter() - started
    result = scores([model], validate_train(params), site)
    save(out_file, {**result, "seconds": seconds, "epochs": [summary["epochs_run"], summary["best_epoch"]]})
    log.info("retrain seed %d N=%d: %.0f s, %d epochs", seed, n, seconds, summary["epochs_run"])
    return model


def shipped_protocol(params: dict, site: Site, seed: int, n: int, way: str, out_file: Path) -> None:
    """`--folds`: the train stage's own fit (`fit_folds`, `train.folds` models over the whole pool without the
    site, params' epochs and patience) with the first `n` arrivals as a site that joins by `way` (`train.sites`:
    retrain from 0 scans, or update whatever its size), scored as the average of the fold models."""
    config = validate_train(params)
    retrain_from = 0 if way == "retrain" else 10_000_000
    run = {**params, "seed": seed, "train": {**config, "sites": {**config["sites"], "retrain_from": retrain_from}}}
    started = time.perf_counter()
    members, summaries, _, _ = fit_folds(run, joined(site.pool, site.arrivals(seed, n)), verbose=0)
    seconds = time.perf_counter() - started
    epochs = sum(s["epochs_run"] for s in summaries)
    save(out_file, {**scores(members, config, site), "seconds": seconds, "epochs": [epochs, epochs]})
    log.info("%s, %d folds, seed %d N=%d: %.0f s, %d epochs", way, len(members), seed, n, seconds, epochs)


def update(params: dict, site: Site, seed: int, out: Path, arrivals: list[int]) -> None:
    """N = 0 (the model in use), then each N > 0: that model updated as `train.sites` updates a fold model
    (`update_after_fit`: its fitting half replayed beside the arrivals), from the same N = 0 weights each time."""
    config = validate_train(params)
    base_file = out / f"retrain.{seed}.0.npz"
    if base_file.exists():
        raise SystemExit(f"{base_file} exists without its model: remove it to run the updates of seed {seed}")
    model = retrain(params, site, seed, 0, base_file)
    start = model.get_weights()
    fit_half, stop_half = site.halves(seed)
    epochs = config["sites"]["update_epochs"]
    for n in arrivals:
        out_file = out / f"update.{seed}.{n}.npz"
        if out_file.exists():
            continue
        model.set_weights(start)
        data = joined(fit_half, site.arrivals(seed, n))
        summary = update_after_fit(
            model, {**params, "seed": seed}, config, data, stop_half, None, 0, config["batch_size"]
        )
        save(
            out_file,
            {**scores([model], config, site), "seconds": summary["update_seconds"], "epochs": [epochs, epochs]},
        )
        log.info("update seed %d N=%d: %.0f s", seed, n, summary["update_seconds"])


def figures(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """ROC AUC and specificity at the threshold that finds RECALL of the tumors."""
    return roc_auc_score(y, p), binary_metrics(y, p, threshold_for_recall(y, p, RECALL))["specificity"]


def interval(values: list[float]) -> list[float]:
    return [round(float(q), 4) for q in np.percentile(values, [2.5, 97.5])]


def runs_in(out: Path) -> dict:
    """(way, seed, N): the scores a run saved under `out`."""
    found = {}
    for path in out.glob("*.npz"):
        way, seed, n = path.stem.split(".")
        found[way, int(seed), int(n)] = dict(np.load(path))
    return found


class Paired:
    """Seed-averaged figures of runs on the site's scans that did not arrive and on the test split, and their
    bootstrap over images (resampled within each seed's rest; the test split resampled alike)."""

    def __init__(self, site: Site, seeds: list[int], resamples: int):
        self.site, self.seeds, self.resamples = site, seeds, resamples
        self.rng = np.random.default_rng(0)

    def on_site(self, runs: dict, rows: dict) -> np.ndarray:  # (AUC, specificity at RECALL)
        y = self.site.scans["y"]
        return np.mean([figures(y[rows[s]], runs[s]["p_site"][rows[s]]) for s in self.seeds], axis=0)

    def on_test(self, runs: dict, rows: np.ndarray) -> float:
        y = self.site.test_y
        return float(np.mean([roc_auc_score(y[rows], runs[s]["p_test"][rows]) for s in self.seeds]))

    def draws(self, n: int):
        """`resamples` times: each seed's rest after N arrivals, and the test split, drawn with replacement."""
        y = self.site.scans["y"]
        rests = {s: self.site.order(s)[n:] for s in self.seeds}
        made = 0
        while made < self.resamples:
            drawn = {s: self.rng.choice(rests[s], len(rests[s])) for s in self.seeds}
            if any(y[rows].min() == y[rows].max() for rows in drawn.values()):
                continue
            made += 1
            yield drawn, self.rng.integers(0, len(self.site.test_y), len(self.site.test_y))

    def difference(self, runs: dict, other: dict, n: int) -> dict:
        """runs minus other, after N arrivals: site AUC, site specificity at RECALL, test AUC."""
        rests = {s: self.site.order(s)[n:] for s in self.seeds}
        every_test = np.arange(len(self.site.test_y))
        site_diffs, test_diffs = [], []
        for drawn, test_rows in self.draws(n):
            site_diffs.append(self.on_site(runs, drawn) - self.on_site(other, drawn))
            test_diffs.append(self.on_test(runs, test_rows) - self.on_test(other, test_rows))
        point = self.on_site(runs, rests) - self.on_site(other, rests)
        return {
            "site_auc": round(float(point[0]), 4),
            "site_auc_ci95": interval(np.array(site_diffs)[:, 0]),
            f"site_specificity_at_recall_{RECALL}": round(float(point[1]), 4),
            "site_specificity_ci95": interval(np.array(site_diffs)[:, 1]),
            "test_auc": round(self.on_test(runs, every_test) - self.on_test(other, every_test), 4),
            "test_auc_ci95": interval(test_diffs),
        }


def summarise(site: Site, out: Path, seeds: list[int], resamples: int, baseline: Path | None = None) -> dict:
    """Per way and N: the seed-averaged figures on the site's rest and the test split, and their paired
    differences with N = 0; the two ways against each other; with `baseline` (the runs of another recipe, e.g.
    another `train.full_weight_images`), each retrain against the baseline's at the same seed and N."""
    paired = Paired(site, seeds, resamples)
    found = runs_in(out)
    y_site, y_test = site.scans["y"], site.test_y
    table = {}
    base = {s: found.get(("retrain", s, 0)) for s in seeds}
    if any(run is None for run in base.values()):
        return table
    every_test = np.arange(len(y_test))
    for way in ("retrain", "update"):
        for n in ARRIVALS:
            runs = {s: found.get(("retrain" if n == 0 else way, s, n)) for s in seeds}
            if any(run is None for run in runs.values()):
                continue
            rests = {s: site.order(s)[n:] for s in seeds}
            now, then = paired.on_site(runs, rests), paired.on_site(base, rests)
            test_now, test_then = paired.on_test(runs, every_test), paired.on_test(base, every_test)
            boot_site, boot_diff, boot_test, boot_test_diff = [], [], [], []
            for drawn, test_rows in paired.draws(n):
                boot_site.append(paired.on_site(runs, drawn))
                boot_diff.append(boot_site[-1] - paired.on_site(base, drawn))
                boot_test.append(paired.on_test(runs, test_rows))
                boot_test_diff.append(boot_test[-1] - paired.on_test(base, test_rows))
            boot_site, boot_diff = np.array(boot_site), np.array(boot_diff)
            table.setdefault(way, {})[n] = {
                "scored": int(np.mean([len(rests[s]) for s in seeds])),
                "site_auc": round(float(now[0]), 4),
                "site_auc_ci95": interval(boot_site[:, 0]),
                "site_auc_of_n0_on_these_scans": round(float(then[0]), 4),
                "site_auc_minus_n0": round(float(now[0] - then[0]), 4),
                "site_auc_minus_n0_ci95": interval(boot_diff[:, 0]),
                f"site_specificity_at_recall_{RECALL}": round(float(now[1]), 4),
                "site_specificity_ci95": interval(boot_site[:, 1]),
                "test_auc": round(test_now, 4),
                "test_auc_ci95": interval(boot_test),
                "test_auc_minus_n0": round(test_now - test_then, 4),
                "test_auc_minus_n0_ci95": interval(boot_test_diff),
                "site_auc_per_seed": [
                    round(float(roc_auc_score(y_site[rests[s]], runs[s]["p_site"][rests[s]])), 4) for s in seeds
                ],
                "seconds_per_run": round(float(np.mean([runs[s]["seconds"] for s in seeds])), 1),
            }
    other = runs_in(baseline) if baseline else {}
    for n in ARRIVALS[1:]:
        retrained = {s: found.get(("retrain", s, n)) for s in seeds}
        updated = {s: found.get(("update", s, n)) for s in seeds}
        before = {s: other.get(("retrain", s, n)) for s in seeds}
        if all(run is not None for run in [*retrained.values(), *updated.values()]):  # the two ways, same scans
            table.setdefault("update_minus_retrain", {})[n] = paired.difference(updated, retrained, n)
        if baseline and all(run is not None for run in [*retrained.values(), *before.values()]):
            table.setdefault("retrain_minus_baseline", {})[n] = paired.difference(retrained, before, n)
    return table


def plot(table: dict, path: Path, title: str, baseline: dict | None = None) -> None:
    """The site's other scans (AUC, and the N = 0 model's AUC on the same scans: the scored set shrinks as N
    grows), the paired gain over N = 0, and the in-distribution test split's paired change; with `baseline`
    (another recipe's table), its retrains too."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    lines = [("retrain", table.get("retrain", {}), "o-", "C0"), ("update", table.get("update", {}), "s--", "C1")]
    if baseline:
        lines.append(("retrain, baseline", baseline.get("retrain", {}), "^:", "C3"))
    for way, rows, style, colour in lines:
        ns = sorted(rows)
        if not ns:
            continue
        axes[0].plot(ns, [rows[n]["site_auc"] for n in ns], style, color=colour, label=way)
        axes[0].fill_between(ns, *zip(*[rows[n]["site_auc_ci95"] for n in ns], strict=True), color=colour, alpha=0.15)
        for ax, key in ((axes[1], "site_auc_minus_n0"), (axes[2], "test_auc_minus_n0")):
            ax.plot(ns, [rows[n][key] for n in ns], style, color=colour, label=way)
            ax.fill_between(ns, *zip(*[rows[n][f"{key}_ci95"] for n in ns], strict=True), color=colour, alpha=0.15)
    base = table.get("update", table.get("retrain", {}))
    ns = sorted(base)
    axes[0].plot(ns, [base[n]["site_auc_of_n0_on_these_scans"] for n in ns], ":", color="gray", label="N = 0 model")
    titles = (
        "ROC AUC on the site's scans not used",
        "ROC AUC gain over N = 0, same scans (paired)",
        "test split (in distribution): AUC change, paired",
    )
    for ax, label in zip(axes, titles, strict=True):
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xticks(ARRIVALS, [str(n) for n in ARRIVALS])
        ax.set_xlabel("site scans with verdicts in training (N)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1:]:
        ax.axhline(0, color="black", linewidth=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as partial:
        fig.savefig(partial, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split-dir", default="artifacts/split")
    parser.add_argument("--site", default="kaggle2020_testing", choices=sorted(HOLD_OUTS))
    parser.add_argument("--way", choices=["retrain", "update"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--arrivals", nargs="+", type=int, default=list(ARRIVALS[1:]))
    parser.add_argument("--epochs", type=int, help="at most, for a model from scratch (screen: 30; --folds: params')")
    parser.add_argument("--patience", type=int, help="early stopping (screen: 8; --folds: params')")
    parser.add_argument("--folds", action="store_true", help="the shipped protocol: train.folds models a run")
    parser.add_argument("--full-weight-images", type=int, help="train.full_weight_images (default: params')")
    parser.add_argument("--update-epochs", type=int, help="train.sites.update_epochs (default: params')")
    parser.add_argument("--update-lr-factor", type=float, help="train.sites.update_learning_rate_factor (params')")
    parser.add_argument("--summary", action="store_true", help="the table and plot of the runs under --out")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--baseline", type=Path, help="with --summary: another recipe's --out, paired with this one")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/data/site_scans"))
    parser.add_argument("--plot", type=Path, default=Path("plots/site_scans.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    params = load_params(args.params)
    screen = {} if args.folds else {"epochs": 30, "early_stopping_patience": 8}
    params["train"].update(screen)
    if args.epochs is not None:
        params["train"]["epochs"] = args.epochs
    if args.patience is not None:
        params["train"]["early_stopping_patience"] = args.patience
    if args.full_weight_images is not None:
        params["train"]["full_weight_images"] = args.full_weight_images
    if args.update_epochs is not None:
        params["train"]["sites"]["update_epochs"] = args.update_epochs
    if args.update_lr_factor is not None:
        params["train"]["sites"]["update_learning_rate_factor"] = args.update_lr_factor
    out = args.out / args.site
    out.mkdir(parents=True, exist_ok=True)
    site = Site(params, args.split_dir, args.site)
    log.info(
        "site %s: %d brain-MR scans (%d healthy); pool without it %d; test split without it %d",
        args.site,
        len(site.scans["y"]),
        int((site.scans["y"] == 0).sum()),
        len(site.pool["y"]),
        len(site.test_y),
    )
    if args.summary:
        baseline = args.baseline / args.site if args.baseline else None
        table = summarise(site, out, args.seeds, args.bootstrap, baseline)
        write_json(out / "summary.json", {"site": args.site, "seeds": args.seeds, "table": table})
        other = None
        if baseline:  # JSON keys are strings: N back to numbers
            saved = json.loads((baseline / "summary.json").read_text())["table"]
            other = {way: {int(n): row for n, row in rows.items()} for way, rows in saved.items()}
        plot(table, args.plot, f"{args.site} as a new site: seeds {args.seeds}, screen-sized fits", other)
        print(json.dumps(table, indent=1))
        return
    too_many = [n for n in args.arrivals if n >= len(site.scans["y"]) - 20]
    if too_many:
        parser.error(f"--arrivals {too_many}: site {args.site} has {len(site.scans['y'])} scans; leave 20 to score")
    for seed in args.seeds:
        if args.folds:
            for n in [0, *args.arrivals]:
                way = "retrain" if n == 0 else args.way or "retrain"
                run_file = out / f"{way}.{seed}.{n}.npz"
                if not run_file.exists():
                    shipped_protocol(params, site, seed, n, way, run_file)
        elif args.way == "update":
            update(params, site, seed, out, args.arrivals)
        else:
            for n in args.arrivals:
                if not (out / f"retrain.{seed}.{n}.npz").exists():
                    retrain(params, site, seed, n, out / f"retrain.{seed}.{n}.npz")


if __name__ == "__main__":
    main()
