"""Leave-one-source-out evaluation of the pipeline's training recipe (see braintumor.quality.generalization).

    python benchmarks/leave_one_source_out.py                # every hold-out, params.yaml as it is
    python benchmarks/leave_one_source_out.py --folds 2      # cheaper: 2 fold models per hold-out

Reads the split stage's output (run `dvc repro split` first) and writes metrics/generalization.json, which
`dvc exp show` shows (dvc.yaml lists it under its top-level metrics). Each hold-out trains `train.folds`
models, about as long as the train stage itself: on a 2-core CPU, run it when a change to the data or the
recipe needs that figure, not on every `dvc repro`.
"""

from __future__ import annotations

import argparse
import logging
import time

from braintumor.atomic import write_json
from braintumor.params import load_params
from braintumor.quality.generalization import HOLD_OUTS, leave_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split-dir", default="artifacts/split")
    parser.add_argument("--hold-out", action="append", choices=sorted(HOLD_OUTS), help="repeatable; default all")
    parser.add_argument("--folds", type=int, help="override train.folds (fold models per hold-out)")
    parser.add_argument("--out", default="metrics/generalization.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)
    if args.folds:
        params["train"]["folds"] = args.folds
    started = time.perf_counter()
    results = {name: leave_out(params, args.split_dir, name) for name in args.hold_out or sorted(HOLD_OUTS)}
    write_json(args.out, {"folds": params["train"]["folds"], **results})
    aucs = ", ".join(f"{name} AUC {result['roc_auc']:.3f}" for name, result in results.items())
    print(f"leave-one-source-out: {aucs}; {time.perf_counter() - started:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
