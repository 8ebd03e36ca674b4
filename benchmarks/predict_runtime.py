"""`braintumor predict` as a user runs it, whole process, on ONNX Runtime and on Keras, against the PyPI peer.

Each contender classifies the same `--images` test scans in a fresh process, `--runs` times, the contenders
alternating within each round so that the machine's state drifts alike for all: ours through the command line
(`braintumor predict --json --runtime onnx|keras --model models/model.keras`), the registered champion
(`--model models:/NAME@champion`, ONNX Runtime) cold (an empty model cache each round: the first pull) and warm
(the cache filled once before the rounds), and the peer (`detect-tumor` 0.1.1, a VGG16 in ONNX Runtime) as a
Python loop over its `TumorDetector`. Wall time, CPU time (user + system) and peak resident memory come from GNU
time (`/usr/bin/time -f`); medians are reported, each contender's ratio to the peer and to the local folder
(`--runtime onnx`) in the same run. Run it in the project after `dvc repro` (the registry is its embedded store)
or with MLFLOW_TRACKING_URI set.

    python benchmarks/predict_runtime.py [--images 100] [--runs 3] [--out metrics/predict_runtime.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

PEER = """
import sys
from detect_tumor import TumorDetector
detector = TumorDetector()
for path in sys.argv[1:]:
    result = detector.predict(path)
    print(path, 1.0 - result.probabilities["notumor"] / 100.0)
"""


def timed(command: list[str], env: dict | None = None) -> dict[str, float]:
    """Run `command`, its output discarded; wall s, CPU s and peak RSS MiB from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        subprocess.run(
            ["/usr/bin/time", "-o", report.name, "-f", "%e %U %S %M", *command],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        wall, user, system, rss = map(float, Path(report.name).read_text().split()[-4:])
    return {"wall_s": wall, "cpu_s": user + system, "peak_mib": rss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model.keras")
    parser.add_argument("--registered", default="models:/brain-tumor-classifier@champion")
    parser.add_argument("--manifest", default="artifacts/split/manifest.csv")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="metrics/predict_runtime.json")
    args = parser.parse_args(argv)
    manifest = pd.read_csv(args.manifest, keep_default_na=False)
    files = manifest[manifest.split == "test"].path.tolist()[: args.images]
    braintumor = str(Path(sys.executable).with_name("braintumor"))
    contenders = {
        f"braintumor predict --runtime {runtime}": [
            braintumor,
            "predict",
            "--json",
            "--runtime",
            runtime,
            "--model",
            args.model,
            *files,
        ]
        for runtime in ("onnx", "keras")
    }
    registered = [braintumor, "predict", "--json", "--runtime", "onnx", "--model", args.registered, *files]
    contenders[f"{args.registered} (cold: first pull)"] = registered
    contenders[f"{args.registered} (warm: cached)"] = registered
    contenders["detect-tumor (TumorDetector loop)"] = [sys.executable, "-c", PEER, *files]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    measured: dict[str, list[dict]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory(prefix="model-cache-") as caches:
        warm = {**os.environ, "BRAINTUMOR_MODEL_CACHE": f"{caches}/warm"}
        timed(registered[: -len(files)] + files[:1], warm)  # fills the warm cache
        for round_ in range(args.runs):
            for name, command in contenders.items():
                env = {**os.environ, "BRAINTUMOR_MODEL_CACHE": f"{caches}/cold{round_}"} if "cold" in name else warm
                measured[name].append(timed(command, env))
                print(f"round {round_ + 1}: {name}: {measured[name][-1]}", flush=True)
    medians = {
        name: {key: round(float(np.median([r[key] for r in runs])), 2) for key in runs[0]}
        for name, runs in measured.items()
    }
    peer, local = medians["detect-tumor (TumorDetector loop)"], medians["braintumor predict --runtime onnx"]
    result = {
        "images": len(files),
        "runs": args.runs,
        "median": medians,
        "ratio_to_peer": {
            name: {key: round(values[key] / peer[key], 3) for key in values}
            for name, values in medians.items()
            if not name.startswith("detect-tumor")
        },
        "ratio_to_local_folder": {
            name: {key: round(values[key] / local[key], 3) for key in values}
            for name, values in medians.items()
            if name.startswith("models:/")
        },
        "all": measured,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "ratio_to_peer", "ratio_to_local_folder")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
