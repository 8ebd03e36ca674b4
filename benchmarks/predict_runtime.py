"""`braintumor predict` as a user runs it, whole process, on ONNX Runtime and on Keras, against the PyPI peer.

Each contender classifies the same `--images` test scans in a fresh process, `--runs` times, the contenders
alternating within each round so that the machine's state drifts alike for all: ours through the command line
(`braintumor predict --json --runtime onnx|keras --model models/model.keras`), the peer (`detect-tumor` 0.1.1, a
VGG16 in ONNX Runtime) as a Python loop over its `TumorDetector`. Wall time, CPU time (user + system) and peak
resident memory come from GNU time (`/usr/bin/time -f`); medians are reported, and each contender's ratio to
the peer in the same run.

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


def timed(command: list[str]) -> dict[str, float]:
    """Run `command`, its output discarded; wall s, CPU s and peak RSS MiB from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        subprocess.run(
            ["/usr/bin/time", "-o", report.name, "-f", "%e %U %S %M", *command],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall, user, system, rss = map(float, Path(report.name).read_text().split()[-4:])
    return {"wall_s": wall, "cpu_s": user + system, "peak_mib": rss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model.keras")
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
    contenders["detect-tumor (TumorDetector loop)"] = [sys.executable, "-c", PEER, *files]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    measured: dict[str, list[dict]] = {name: [] for name in contenders}
    for round_ in range(args.runs):
        for name, command in contenders.items():
            measured[name].append(timed(command))
            print(f"round {round_ + 1}: {name}: {measured[name][-1]}", flush=True)
    medians = {
        name: {key: round(float(np.median([r[key] for r in runs])), 2) for key in runs[0]}
        for name, runs in measured.items()
    }
    peer = medians["detect-tumor (TumorDetector loop)"]
    result = {
        "images": len(files),
        "runs": args.runs,
        "median": medians,
        "ratio_to_peer": {
            name: {key: round(values[key] / peer[key], 3) for key in values}
            for name, values in medians.items()
            if not name.startswith("detect-tumor")
        },
        "all": measured,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "ratio_to_peer")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
