"""The `braintumor` command: one subcommand per pipeline stage (the DVC stages call these)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from braintumor.errors import SourceError
from braintumor.params import ParamError, load_params

log = logging.getLogger("braintumor")


# stage name -> (module, function); imported on use so that `braintumor --help` stays fast
STAGES = {
    "fetch": ("braintumor.sources", "fetch"),
    "dedup": ("braintumor.dedup", "dedup"),
    "split": ("braintumor.splitting", "split"),
    "train": ("braintumor.training", "train"),
    "evaluate": ("braintumor.evaluation", "evaluate"),
    "explain": ("braintumor.explanation", "explain"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="braintumor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, _) in STAGES.items():
        stage = sub.add_parser(name, help=f"run the `{name}` stage ({module})")
        stage.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        module, function = STAGES[args.command]
        getattr(importlib.import_module(module), function)(load_params(args.params))
    except (ParamError, SourceError) as err:
        print(f"braintumor {args.command}: error: {err}", file=sys.stderr)
        return 2
    log.info("%s finished in %.1f s", args.command, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
