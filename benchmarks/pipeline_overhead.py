"""DVC's own overhead: `dvc repro` with nothing changed, and what one changed training param re-runs.

1. `dvc repro` on an up-to-date workspace, `--repeats` times (the baseline in the same run: `dvc status`,
   which hashes the same deps without running anything).
2. `dvc status` and a dry run (`dvc repro --dry`) after changing `train.dropout` in params.yaml (restored
   afterwards): which stages are out of date. A dry run lists only the stages whose own deps changed;
   the stages after them run when their inputs change, which a real run shows (tests/test_pipeline.py
   checks that a changed training param re-runs exactly train, evaluate, explain and register).

Usage (in an up-to-date workspace, after `dvc repro`): python benchmarks/pipeline_overhead.py
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def dvc(*args: str) -> tuple[str, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, check=True)
    return result.stdout, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    status = [dvc("status")[1] for _ in range(args.repeats)]
    repro = []
    for _ in range(args.repeats):
        out, seconds = dvc("repro")
        ran = re.findall(r"Running stage '([^']+)'", out)
        if ran:
            sys.exit(f"the workspace was not up to date: dvc repro ran {ran}; run `dvc repro` first")
        repro.append(seconds)
    print(
        f"dvc repro, nothing changed: {min(repro):.2f} s (best of {args.repeats}; all {[round(s, 2) for s in repro]})"
    )
    print(f"baseline, dvc status: {min(status):.2f} s; ratio repro / status {min(repro) / min(status):.2f}")

    params = Path("params.yaml")
    backup = params.with_suffix(".yaml.bak")
    shutil.copy(params, backup)
    try:
        text = params.read_text()
        changed = re.sub(
            r"(\n  dropout: )([0-9.]+)", lambda m: f"{m.group(1)}{float(m.group(2)) + 0.05:g}", text, count=1
        )
        assert changed != text, "train.dropout not found in params.yaml"
        params.write_text(changed)
        status, _ = dvc("status")
        out, seconds = dvc("repro", "--dry")
    finally:
        shutil.move(backup, params)
    would_run = re.findall(r"Running stage '([^']+)'", out)
    changed = re.findall(r"^(\w+):\s*$", status, flags=re.MULTILINE)
    print(
        f"after changing train.dropout: dvc status lists {changed} as changed; the dry run starts with "
        f"{would_run} ({seconds:.2f} s); everything before train is skipped"
    )


if __name__ == "__main__":
    main()
