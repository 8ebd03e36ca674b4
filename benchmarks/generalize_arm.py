"""The generalize stage's protocol for one arm, outside DVC: several arms side by side on one GPU host.

`dvc exp run benchmarks/dvc.yaml` runs one recipe at a time, on the split in artifacts/split. This runs the same
function (`braintumor.quality.generalize.generalize`) on any split folder, with params overridden as
`dvc exp run -S` would, and writes its metrics, predictions and gallery under --out, so that several arms (another
split, seed or recipe) can run at once as separate processes, each on its own slice of one GPU:

    KERAS_BACKEND=jax python benchmarks/generalize_arm.py --split-dir artifacts/split --out runs/mr \
        -S generalize.hold_outs=[kaggle2020_testing] -S seed=1
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from braintumor.params import check_known, load_params
from braintumor.quality.generalize import generalize
from braintumor.stage import configure_logging


def override(params: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` (the value read as YAML) to `params` in place."""
    key, _, value = assignment.partition("=")
    *parents, leaf = key.split(".")
    node = params
    for parent in parents:
        node = node[parent]
    node[leaf] = yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split-dir", default="artifacts/split")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="key=value, as dvc exp run -S")
    args = parser.parse_args()
    configure_logging()
    params = load_params(args.params)
    for assignment in args.overrides:
        override(params, assignment)
    check_known(params)
    args.out.mkdir(parents=True, exist_ok=True)
    generalize(params, args.split_dir, args.out / "generalize", args.out / "metrics.json", args.out / "worst.png")
    logging.getLogger("generalize_arm").info("generalize_arm: %s done", args.out)


if __name__ == "__main__":
    main()
