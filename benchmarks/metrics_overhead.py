"""What `GET /metrics` costs an answer: `braintumor serve` with its Prometheus metrics on and with `--no-metrics`.

Both servers run at once on the same model (real processes on loopback); single-image requests alternate between
them (on, off, on, off, ...) so that the machine's state drifts alike for both; /metrics is scraped once a second
from the server that has it, as Prometheus would. Reports p50/p95 latency of each and the ratio, same run.

Usage: python benchmarks/metrics_overhead.py [--model models/model.keras] [--requests 400]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures.servers import BIN, free_port, serving  # noqa: E402


@contextlib.contextmanager
def server(model: str, extra: list[str], folder: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "braintumor"), "serve", "--model", model, "--port", str(port)]
    command += ["--audit-log", str(folder / f"audit-{port}.jsonl"), "--rate-limit", "1000000", *extra]
    with serving(command, f"{url}/readyz", folder / f"serve-{port}.log"):
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model.keras")
    parser.add_argument("--manifest", default="artifacts/split/manifest.csv")
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    manifest = pd.read_csv(args.manifest, keep_default_na=False)
    files = [Path(p).read_bytes() for p in manifest[manifest.split == "test"].path.tolist()[:50]]
    with (
        tempfile.TemporaryDirectory() as folder,
        server(args.model, [], Path(folder)) as on,
        server(args.model, ["--no-metrics"], Path(folder)) as off,
    ):
        session = requests.Session()
        for url in (on, off):  # warm both
            for data in files[:10]:
                session.post(f"{url}/v1/predict", files=[("files", ("scan.png", data))], timeout=60)
        stop = threading.Event()

        def scrape():
            while not stop.wait(1.0):
                requests.get(f"{on}/metrics", timeout=10)

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        latency = {"metrics on": [], "--no-metrics": []}
        for k in range(args.requests):
            for name, url in (("metrics on", on), ("--no-metrics", off))[:: 1 if k % 2 == 0 else -1]:
                started = time.perf_counter()
                answer = session.post(f"{url}/v1/predict", files=[("files", ("scan.png", files[k % len(files)]))])
                latency[name].append(time.perf_counter() - started)
                assert answer.status_code == 200, answer.text
        stop.set()
        scraped = requests.get(f"{on}/metrics", timeout=10).text
    figures = {name: np.percentile(np.array(v) * 1000, [50, 95]) for name, v in latency.items()}
    for name, (p50, p95) in figures.items():
        print(f"{name:14s} p50 {p50:6.2f} ms  p95 {p95:6.2f} ms  ({len(latency[name])} requests)")
    ratio = figures["metrics on"] / figures["--no-metrics"]
    print(f"metrics on / off: p50 {ratio[0]:.3f}, p95 {ratio[1]:.3f}; /metrics holds {len(scraped)} bytes")


if __name__ == "__main__":
    main()
