"""Does a retrain give the same model? On this machine, and under another CPU's kernels.

Fits the train stage's model (`model.train.fit`, params.yaml's recipe) on the first --images train images for
--epochs epochs, each run in a fresh process, and prints a digest of the fitted weights and the fit's seconds.
The train stage turns TensorFlow's deterministic ops on (`model.train.deterministic_kernels`); one configuration
fits without them, as the stage did before. The CPU's kernels are switched by the environment variables that
oneDNN and TensorFlow read when they load: `ONEDNN_MAX_CPU_ISA=AVX2` runs the kernels a CPU without AVX-512 runs;
`TF_ENABLE_ONEDNN_OPTS=0` TensorFlow's own (Eigen) kernels. The configurations alternate (--rounds rounds), and
each one's median time is divided by the first configuration's, measured in the same invocation:

    python benchmarks/training_determinism.py --images 960 --epochs 2 --rounds 3
    python benchmarks/training_determinism.py --images 960 --epochs 2 --rounds 8 --configs 0 1
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

WITHOUT_DETERMINISTIC_OPS = "BENCH_WITHOUT_DETERMINISTIC_OPS"  # read by the child process below
CONFIGS = {
    "the train stage (deterministic ops, this CPU's fastest kernels)": {},
    "without deterministic ops (the train stage before e6338dc)": {WITHOUT_DETERMINISTIC_OPS: "1"},
    "oneDNN capped at AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "oneDNN off (Eigen kernels)": {"TF_ENABLE_ONEDNN_OPTS": "0"},
}


def fit_once(split_dir: str, images: int, epochs: int) -> dict:
    """One fit in this process: the weights' SHA-256 (first 16 hex digits) and the fit's seconds."""
    import numpy as np
    import yaml

    from braintumor.data.datasets import load_splits
    from braintumor.model import train
    from braintumor.model.train import fit

    if os.environ.get(WITHOUT_DETERMINISTIC_OPS) == "1":
        train.deterministic_kernels = lambda: None

    with open("params.yaml", encoding="utf-8") as f:
        params = yaml.safe_load(f)
    params["train"]["epochs"] = epochs

    def first(name: str, count: int) -> dict:
        data = load_splits(split_dir, (name,), "binary")
        return {key: value[:count] for key, value in data.items()}

    started = time.perf_counter()
    model, _ = fit(params, first("train", images), first("val", 64), verbose=0)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()[:16]
    return {"digest": digest, "seconds": round(seconds, 2)}


def run_child(env: dict, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", "--split-dir", args.split_dir]
    command += ["--images", str(args.images), "--epochs", str(args.epochs)]
    quiet = {"TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, env={**os.environ, **quiet, **env}, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split-dir", default="artifacts/split")
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", nargs="+", type=int, help="which configurations, by their place in the table")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(fit_once(args.split_dir, args.images, args.epochs)))
        return
    chosen = {name: env for k, (name, env) in enumerate(CONFIGS.items()) if args.configs is None or k in args.configs}
    runs: dict[str, list[dict]] = {name: [] for name in chosen}
    for round_ in range(args.rounds):
        for name, env in chosen.items():
            runs[name].append(run_child(env, args))
            print(f"round {round_ + 1}: {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    baseline = next(iter(runs.values()))
    base_digest, base_time = baseline[0]["digest"], statistics.median(r["seconds"] for r in baseline)
    print(f"{args.images} images, {args.epochs} epochs, {args.rounds} fresh processes a configuration")
    print("| configuration | digests | every run the same | first row's digest | median s | / first row |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, results in runs.items():
        counts = collections.Counter(r["digest"] for r in results)
        digests = [f"{digest} x{count}" for digest, count in counts.most_common()]
        median = statistics.median(r["seconds"] for r in results)
        print(
            f"| {name} | {', '.join(digests)} | {'yes' if len(counts) == 1 else 'no'} | "
            f"{'yes' if base_digest in counts else 'no'} | {median:.1f} | {median / base_time:.2f}x |"
        )


if __name__ == "__main__":
    main()
