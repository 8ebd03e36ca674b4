"""Does the per-key rate limit keep one greedy client from starving the others (issue 28)?

Two `braintumor serve` processes of this checkout on the same model, each with two keys: one without a useful
limit (baseline), one with `--rate-limit` scans a minute per key. Against each, for `--seconds`: a greedy key
sends from 8 threads back to back, and a polite key sends one scan a second. Prints the polite
client's latency and the greedy client's answered scans per second, with and without the limit.

    python benchmarks/rate_limit.py [--model models/model.keras] [--seconds 30] [--rate-limit 120]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from braintumor.serve.access import add_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trust_latency import ROOT, start  # noqa: E402


def contend(url: str, greedy: str, polite: str, body: tuple[str, bytes], seconds: float) -> dict:
    stop = time.monotonic() + seconds
    answered, refused, polite_times = [0], [0], []
    lock = threading.Lock()

    def hog() -> None:
        session = requests.Session()
        while time.monotonic() < stop:
            code = session.post(f"{url}/v1/predict", files=[("files", body)], headers={"X-API-Key": greedy}).status_code
            with lock:
                (answered if code == 200 else refused)[0] += 1
            if code == 429:
                time.sleep(0.05)  # a client that reads Retry-After would wait longer; this one barely does

    threads = [threading.Thread(target=hog) for _ in range(8)]
    for thread in threads:
        thread.start()
    session = requests.Session()
    while time.monotonic() < stop:
        started = time.perf_counter()
        session.post(f"{url}/v1/predict", files=[("files", body)], headers={"X-API-Key": polite}).raise_for_status()
        polite_times.append(time.perf_counter() - started)
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - started)))
    for thread in threads:
        thread.join()
    ms = np.asarray(polite_times) * 1000
    return {
        "polite_p50": np.percentile(ms, 50),
        "polite_p95": np.percentile(ms, 95),
        "polite_requests": len(ms),
        "greedy_per_s": answered[0] / seconds,
        "greedy_refused": refused[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/model.keras")
    parser.add_argument("--manifest", default="artifacts/split/manifest.csv")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rate-limit", type=int, default=120)
    args = parser.parse_args()
    manifest = pd.read_csv(args.manifest, keep_default_na=False)
    path = Path(manifest[manifest.split == "test"]["path"].iloc[0])
    body = (path.name, path.read_bytes())
    model = str(Path(args.model).resolve())
    with tempfile.TemporaryDirectory(prefix="rate-limit-") as scratch:
        keys = Path(scratch) / "keys.json"
        greedy, polite = add_key(keys, "greedy", ["predict"]), add_key(keys, "polite", ["predict"])
        for name, limit, burst in (
            ("no limit", 1_000_000, 1000),
            (f"{args.rate_limit} scans/min", args.rate_limit, 10),
        ):
            process, url = start(ROOT, ["--keys", str(keys), "--rate-limit", str(limit), "--burst", str(burst)], model)
            try:
                r = contend(url, greedy, polite, body, args.seconds)
            finally:
                process.terminate()
                process.wait(30)
            print(
                f"{name:16s} polite client p50 {r['polite_p50']:6.1f} ms, p95 {r['polite_p95']:6.1f} ms "
                f"({r['polite_requests']} requests); greedy client answered {r['greedy_per_s']:5.1f} scans/s, "
                f"refused {r['greedy_refused']}"
            )


if __name__ == "__main__":
    main()
