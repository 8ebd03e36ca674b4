"""The `braintumor` command: one subcommand per pipeline stage (the DVC stages call these)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from braintumor.errors import SourceError
from braintumor.params import ParamError, load_params

log = logging.getLogger("braintumor")


def _fetch(params: dict) -> dict:
    from braintumor.sources import fetch

    return fetch(params)


def _dedup(params: dict) -> dict:
    from braintumor.dedup import dedup

    return dedup(params)


def _split(params: dict) -> dict:
    from braintumor.splitting import split

    return split(params)


STAGES = {"fetch": _fetch, "dedup": _dedup, "split": _split}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="braintumor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, runner in STAGES.items():
        stage = sub.add_parser(name, help=f"run the `{name}` stage ({runner.__module__})")
        stage.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        STAGES[args.command](load_params(args.params))
    except (ParamError, SourceError) as err:
        print(f"braintumor {args.command}: error: {err}", file=sys.stderr)
        return 2
    log.info("%s finished in %.1f s", args.command, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
