"""Scale run: fetch -> dedup -> split -> train (one pass over the data) at N images, wall time and peak memory.

For each N, builds (or reuses) an N-image mirror with scale_mirror.py, then runs each stage's script as DVC
would, in a scratch folder whose params.yaml is this repository's with the Kaggle sources off, `local` on the
mirror, and `train.folds: 2`, `train.epochs: 1` (two fold models of one epoch each: one pass over train+val,
plus the out-of-fold scoring), with `train.loader` from --loader (stream by default). Memory is the peak of
the summed RSS of the stage's whole process tree (its worker processes too), sampled every 0.1 s with psutil;
`/usr/bin/time` would give only the largest single process. Prints a table and the growth exponents of time
and memory between the smallest and largest N, and writes all of it to --out.

    python benchmarks/scale_run.py --sizes 10000 30000 100000 --root /tmp/scale   # after `dvc repro dedup`
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("fetch", "dedup", "split", "train")


def tree_rss(process: psutil.Process) -> tuple[int, int]:
    """(resident, resident less file-backed pages) summed over the process tree. File-backed pages (a
    memory-mapped split being read, shared libraries) count in RSS but are page cache the kernel can drop."""
    total = private = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            info = p.memory_info()
        except psutil.Error:  # ended between the listing and the reading
            continue
        total += info.rss
        private += info.rss - info.shared
    return total, private


def run_stage(stage: str, cwd: Path) -> dict:
    """Run stages/<stage>.py in `cwd`; its wall time and the peak RSS of its process tree."""
    log = (cwd / f"{stage}.log").open("w")
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(REPO / "stages" / f"{stage}.py")], cwd=cwd, stdout=log, stderr=log)
    process, peak, peak_private = psutil.Process(child.pid), 0, 0
    while child.poll() is None:
        try:
            rss, private = tree_rss(process)
            peak, peak_private = max(peak, rss), max(peak_private, private)
        except psutil.Error:
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    if child.returncode:
        raise SystemExit(f"{stage} failed in {cwd} (exit {child.returncode}); see {cwd / f'{stage}.log'}")
    return {
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(peak / 2**30, 3),
        "peak_rss_without_file_pages_gib": round(peak_private / 2**30, 3),
    }


def scratch(root: Path, images: int, loader: str) -> Path:
    """A working folder for one N, with the params of a scale run."""
    mirror, work = root / f"mirror{images}", root / f"work{images}"
    if not mirror.exists():
        subprocess.run([sys.executable, str(REPO / "benchmarks/scale_mirror.py"), str(images), str(mirror)], check=True)
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, source in params["fetch"]["sources"].items():
        source["enabled"] = name == "local"
    params["fetch"]["sources"]["local"]["path"] = str(mirror)
    params["fetch"]["overrides"] = str(REPO / "labels/overrides.csv")
    params["train"].update(folds=2, epochs=1, loader=loader)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--root", type=Path, default=Path("/tmp/scale"))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--loader", default="stream", choices=("stream", "arrays"), help="train.loader")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/data/scale.json"))
    args = parser.parse_args()
    results: dict = {"loader": args.loader}
    for images in args.sizes:
        work = scratch(args.root, images, args.loader)
        results[images] = {stage: run_stage(stage, work) for stage in args.stages}
        for name in ("fetch", "dedup", "split"):
            if name in results[images] and (work / f"metrics/{name}.json").exists():
                results[images][name]["metrics"] = json.loads((work / f"metrics/{name}.json").read_text())
        print(images, {s: {k: v for k, v in r.items() if k != "metrics"} for s, r in results[images].items()})
    small, large = min(args.sizes), max(args.sizes)
    if small != large:
        growth = math.log(large / small)
        results["growth_exponents"] = {
            stage: {
                key: round(math.log(results[large][stage][key] / results[small][stage][key]) / growth, 2)
                for key in ("seconds", "peak_rss_gib")
            }
            for stage in args.stages
        }
        print("growth exponents", small, "->", large, results["growth_exponents"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
