"""Running one pipeline stage from the command line: params, logging, errors and timing, the same for all.

Each `stages/<name>.py` calls `run` with its own stage function, so a stage's code is that function's
imports and this module: DVC lists exactly those files as the stage's deps (tests/test_stage_deps.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable

from braintumor.errors import ModelLoadError, ParamError, RegistryError, SourceError
from braintumor.params import load_params

log = logging.getLogger("braintumor")


VERBOSE = "BRAINTUMOR_VERBOSE"  # set (to anything but 0) to let native libraries write to the terminal


def quiet_native_output() -> None:
    """Send what native libraries write straight to file descriptor 2 (TensorFlow's absl start-up lines, its CUDA
    probe on a CPU machine, Grappler's optimiser errors: none of them the user's business) to /dev/null, and keep
    Python's own stderr (logging, progress bars, tracebacks, warnings) on the terminal. Call it before TensorFlow
    is imported, from a process's entry point only; BRAINTUMOR_VERBOSE=1 (or `braintumor --verbose`) skips it."""
    if os.environ.get(VERBOSE, "0") != "0":
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    silent = os.open(os.devnull, os.O_WRONLY)
    os.dup2(silent, 2)
    os.close(silent)
    sys.stderr = open(terminal, "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")


def configure_logging() -> None:
    """The package's INFO lines on stderr. Its logger's level is set apart: `basicConfig` does nothing where a
    host (pytest, an application server) has configured logging first, and INFO lines would vanish there."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("braintumor").setLevel(logging.INFO)


def execute(name: str, function: Callable[[dict], object], params_path: str) -> int:
    """Run `function(params)`; a bad param, source or model ends it with exit status 2 and the message."""
    started = time.perf_counter()
    try:
        function(load_params(params_path))
    except (ParamError, SourceError, ModelLoadError, RegistryError) as err:
        print(f"braintumor {name}: error: {err}", file=sys.stderr)
        return 2
    log.info("%s finished in %.1f s", name, time.perf_counter() - started)
    return 0


def run(name: str, function: Callable[[dict], object], argv: list[str] | None = None) -> int:
    """The whole command line of one stage script."""
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"the `{name}` stage (see dvc.yaml)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    return execute(name, function, args.params)
