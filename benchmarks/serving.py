"""Speed of `braintumor serve` as a client sees it: upload to answer over HTTP on loopback.

Starts the real server (`braintumor serve`, a subprocess) on a model reference and measures, against
baselines run in this same process on the same model:
- single-image latency, one request at a time (p50/p95 over `--requests`), against the bare model on an
  already prepared array (`predict_on_batch`, one image) and against the same file's decode and preparation;
- a batch of 32 files in one request (images/s), against the bare model on 32 prepared arrays;
- 8 concurrent clients, one image a request (`--requests` in all; requests/s and p95);
- `/v1/explain` per image (p50/p95 over 20 requests), against the same single-image prediction.

Usage: python benchmarks/serving.py [--model models/model.keras] [--requests 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import requests

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures.servers import BIN, free_port, serving  # noqa: E402


def ms(values) -> str:
    values = np.asarray(values) * 1000
    return f"p50 {np.percentile(values, 50):6.1f} ms, p95 {np.percentile(values, 95):6.1f} ms"


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/model.keras")
    parser.add_argument("--manifest", default="artifacts/split/manifest.csv")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument(
        "--runtime", default="auto", choices=["auto", "onnx", "keras"], help="the server's and baseline's"
    )
    parser.add_argument("--batch-wait-ms", default="4", help="the server's micro-batching window (0: none)")
    args = parser.parse_args()

    from braintumor.data.images import model_input
    from braintumor.serve.predict import load

    manifest = pd.read_csv(args.manifest, keep_default_na=False)
    files = [Path(p) for p in manifest[manifest.split == "test"]["path"]][:32]
    bodies = [f.read_bytes() for f in files]
    loaded = load(args.model, args.runtime)
    size = int(loaded.info["image_size"])
    arrays = np.stack([model_input(f, size) for f in files]).astype("float32")
    model = loaded.scorer  # what the server runs: the scoring model, on Keras or ONNX Runtime
    model.predict_on_batch(arrays[:1])
    model.predict_on_batch(arrays)
    bare_one = timed(lambda: model.predict_on_batch(arrays[:1]), args.requests)
    prepare = timed(lambda: model_input(files[0], size), 50)
    bare_32 = timed(lambda: model.predict_on_batch(arrays), 10)
    print(
        f"model {args.model}: {loaded.info['model']} x{loaded.info.get('folds', 1)}, {size} px, "
        f"mirror average {loaded.info.get('mirror_average')}, runtime {loaded.runtime}; file {files[0].name} "
        f"({len(bodies[0])} bytes)"
    )
    print(f"baseline, bare scoring model on one prepared image: {ms(bare_one)}")
    print(f"baseline, decode and prepare one file:       {ms(prepare)}")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "braintumor"), "serve", "--model", args.model, "--port", str(port), "--poll-seconds", "0"]
    command += ["--runtime", args.runtime, "--audit-log", os.devnull, "--batch-wait-ms", args.batch_wait_ms]
    # this measures the model's path, not the per-key limit (benchmarks/rate_limit.py does)
    command += ["--rate-limit", "1000000", "--burst", "100000"]
    with tempfile.TemporaryDirectory() as folder, serving(command, f"{url}/readyz", Path(folder) / "serve.log"):
        session = requests.Session()

        def one(k: int = 0) -> None:
            answer = session.post(f"{url}/v1/predict", files=[("files", (files[k % 32].name, bodies[k % 32]))])
            answer.raise_for_status()

        for k in range(10):
            one(k)
        single = timed(one, args.requests)
        print(
            f"HTTP, one image a request ({args.requests}): {ms(single)}; "
            f"p95 / bare-model p95 {np.percentile(single, 95) / np.percentile(bare_one, 95):.1f}"
        )

        def batch() -> None:
            session.post(
                f"{url}/v1/predict", files=[("files", (f.name, b)) for f, b in zip(files, bodies, strict=True)]
            ).raise_for_status()

        batch()
        batches = timed(batch, 10)
        print(
            f"HTTP, 32 files in one request: {32 / np.median(batches):5.0f} images/s; bare model on 32 prepared "
            f"arrays {32 / np.median(bare_32):5.0f} images/s; ratio {np.median(bare_32) / np.median(batches):.2f}"
        )

        def concurrent(k: int) -> float:
            started = time.perf_counter()
            requests.post(
                f"{url}/v1/predict", files=[("files", (files[k % 32].name, bodies[k % 32]))], timeout=120
            ).raise_for_status()
            return time.perf_counter() - started

        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            waits = list(pool.map(concurrent, range(args.requests)))
        wall = time.perf_counter() - started
        print(
            f"HTTP, 8 concurrent clients ({args.requests} requests): {args.requests / wall:5.1f} requests/s, "
            f"{ms(waits)}; against one at a time {1 / np.median(single):5.1f} requests/s"
        )

        def explain() -> None:
            session.post(f"{url}/v1/explain", files={"file": (files[0].name, bodies[0])}).raise_for_status()

        explain()
        cams = timed(explain, 20)
        print(f"HTTP, /v1/explain: {ms(cams)}; {np.median(cams) / np.median(single):.1f}x a prediction")


if __name__ == "__main__":
    main()
