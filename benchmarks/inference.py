"""Inference speed of `braintumor predict`'s code path: cold start, per-image latency, batch throughput.

Cold start (resolve the model reference, load it, first prediction) is reported apart from the warm
figures. Per-image latency is one image file through the whole path (decode, preprocess, predict) at a
time; p50 and p95 over `--images` files. Batch throughput classifies all of them in batches of 32. The
baseline, in the same process, is the bare Keras `model.predict` on already prepared arrays, so the ratio
shows what file decoding and preprocessing add.

Usage: python benchmarks/inference.py [--model models/model.keras | models:/brain-tumor-classifier@champion]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/model.keras")
    parser.add_argument("--manifest", default="artifacts/split/manifest.csv")
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()

    started = time.perf_counter()
    from braintumor.data.images import model_input
    from braintumor.serve.predict import load, predict

    loaded = load(args.model)
    manifest = pd.read_csv(args.manifest, keep_default_na=False)
    files = manifest[manifest.split == "test"]["path"].tolist()[: args.images]
    first, _ = predict(loaded, files[:1])
    if "error" in first[0]:  # a benchmark of error paths would report nonsense speeds
        raise SystemExit(f"{files[0]}: {first[0]['error']}")
    cold = time.perf_counter() - started
    print(
        f"model {args.model}: {loaded.info['model']} x{loaded.info.get('folds', 1)}, "
        f"{loaded.info['image_size']} px; {len(files)} test images"
    )
    print(f"cold start (imports, load, first prediction): {cold:.2f} s")

    latencies = []
    for path in files:
        t = time.perf_counter()
        predict(loaded, [path])
        latencies.append(time.perf_counter() - t)
    latencies = np.array(latencies) * 1000
    print(f"one file at a time: p50 {np.percentile(latencies, 50):.1f} ms, p95 {np.percentile(latencies, 95):.1f} ms")

    t = time.perf_counter()
    predict(loaded, files, batch_size=32)
    batch = len(files) / (time.perf_counter() - t)
    arrays = np.stack([model_input(f, loaded.info["image_size"]) for f in files]).astype("float32")
    t = time.perf_counter()
    loaded.model.predict(arrays, batch_size=32, verbose=0)
    bare = len(files) / (time.perf_counter() - t)
    print(
        f"batches of 32 from files: {batch:.0f} images/s; baseline, model.predict on prepared arrays: "
        f"{bare:.0f} images/s; ratio {batch / bare:.2f}"
    )


if __name__ == "__main__":
    main()
