"""What the answer's trust costs a client (issue 28): served single-scan latency of this checkout (gate, calibration,
uncertain band; with API keys, the rate limit and the audit log) against a baseline revision's server (default:
the commit before the gate), both on the same model file, started side by side and asked in alternation.

    python benchmarks/trust_latency.py [--baseline REV] [--model models/model.keras] [--requests 300]

The baseline runs from a temporary `git worktree` of REV with this environment's packages; it ignores the
description fields it does not know. Prints p50/p95 per server and the ratio of the p95s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from braintumor.serve.access import add_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def start(source: Path, extra: list[str], model: str) -> tuple[subprocess.Popen, str]:
    """`braintumor serve` from the package under `source`/src; returns the process and its URL once ready."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(source / "src"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "braintumor.cli",
            "serve",
            "--model",
            model,
            "--port",
            str(port),
            "--poll-seconds",
            "0",
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if requests.get(f"{url}/readyz", timeout=2).ok:
                return process, url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit(f"the server from {source} did not come up")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="0dfb9c1", help="revision without the gate (default %(default)s)")
    parser.add_argument("--model", default="models/model.keras")
    parser.add_argument("--manifest", default="artifacts/split/manifest.csv")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()

    manifest = pd.read_csv(args.manifest, keep_default_na=False)
    files = [Path(p) for p in manifest[manifest.split == "test"]["path"]][:32]
    bodies = [(f.name, f.read_bytes()) for f in files]
    model = str(Path(args.model).resolve())
    with tempfile.TemporaryDirectory(prefix="trust-latency-") as scratch:
        scratch = Path(scratch)
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(scratch / "base"), args.baseline],
            check=True,
        )
        key = add_key(scratch / "keys.json", "bench", ["predict"])
        servers = []
        try:
            servers.append(("baseline " + args.baseline, *start(scratch / "base", [], model), {}))
            servers.append(
                (
                    "this checkout, keys + rate limit + audit log",
                    *start(
                        ROOT,
                        [
                            "--keys",
                            str(scratch / "keys.json"),
                            "--audit-log",
                            str(scratch / "audit.jsonl"),
                            "--rate-limit",
                            "1000000",
                            "--burst",
                            "1000",
                        ],
                        model,
                    ),
                    {"X-API-Key": key},
                )
            )
            sessions = [requests.Session() for _ in servers]
            times = [[] for _ in servers]
            for k in range(args.requests + 20):  # alternate: both servers see the same load, the same moments
                for s, (_, _, url, headers) in enumerate(servers):
                    name, body = bodies[k % len(bodies)]
                    started = time.perf_counter()
                    sessions[s].post(
                        f"{url}/v1/predict", files=[("files", (name, body))], headers=headers, timeout=60
                    ).raise_for_status()
                    if k >= 20:  # warm-up
                        times[s].append(time.perf_counter() - started)
            p95 = []
            for (name, *_), t in zip(servers, times, strict=True):
                ms = np.asarray(t) * 1000
                p95.append(np.percentile(ms, 95))
                print(f"{name:48s} p50 {np.percentile(ms, 50):6.1f} ms, p95 {p95[-1]:6.1f} ms ({len(ms)} requests)")
            print(f"p95 ratio (this checkout / baseline): {p95[1] / p95[0]:.3f}")
        finally:
            for _, process, _, _ in servers:
                process.terminate()
                process.wait(30)
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(scratch / "base")], check=False
            )


if __name__ == "__main__":
    main()
