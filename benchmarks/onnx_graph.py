"""The shipped model's ONNX graph in ONNX Runtime: where its time goes, and what the export and the threads buy.

In one process, on the same test scans:
1. Exports the scoring model twice: as Keras' exporter lowers it (the baseline) and as `scoring.export_onnx`
   writes it (group normalisation from per-channel moments); checks both against Keras (max |ΔP(tumor)|).
2. Profiles each graph (ONNX Runtime's profiler, 2 threads, batch 1): the share of kernel time by operator.
3. Times both graphs at batch 1, 4, 8 and 16 (2 threads, spinning off, as predict and serve run), alternating.
4. Times the new graph as the server runs it: one thread a call, one or two callers side by side, against two
   threads a call.

    python benchmarks/onnx_graph.py [--model models/model.keras] [--seconds 1.5]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def onnx_scorer(path: Path, size: int, threads: int):
    """The export as predict and serve run it (`OnnxScorer`: spinning off, `threads` a call)."""
    from braintumor.model.onnx_scorer import OnnxScorer
    from braintumor.quality.evaluate import file_sha256

    return OnnxScorer(path, file_sha256(path), size, threads)


def images_per_s(run, batch: np.ndarray, seconds: float, callers: int = 1) -> float:
    """Images/s of `run(batch)` called back to back by `callers` threads for `seconds`."""
    run(batch)
    done = [0] * callers
    stop = time.perf_counter() + seconds

    def work(k: int) -> None:
        while time.perf_counter() < stop:
            run(batch)
            done[k] += len(batch)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / seconds


def operator_shares(path: Path, x: np.ndarray, calls: int = 30) -> list[tuple[str, float]]:
    import onnxruntime

    with tempfile.TemporaryDirectory() as scratch:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = 2, 3
        options.enable_profiling, options.profile_file_prefix = True, f"{scratch}/profile"
        profiled = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = profiled.get_inputs()[0].name
        for _ in range(calls):
            profiled.run(None, {name: x})
        events = json.loads(Path(profiled.end_profiling()).read_text())
    spent = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
    total = sum(spent.values())
    return [(op, share / total) for op, share in spent.most_common(6)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/model.keras")
    parser.add_argument("--manifest", default="artifacts/split/manifest.csv")
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()

    import keras

    from braintumor.data.images import model_input
    from braintumor.model.inference import load_model
    from braintumor.model.scoring import export_onnx, scoring_model

    model = load_model(args.model)
    size = int(model.input_shape[1])
    manifest = pd.read_csv(args.manifest)
    paths = manifest[manifest["split"] == "test"]["path"].head(64)
    x = np.stack([model_input(Path(p), size) for p in paths]).astype("float32")
    scorer = scoring_model(model, with_features=True)
    expected = scorer.predict(x, verbose=0)[0][:, 0]
    with tempfile.TemporaryDirectory() as scratch:
        baseline, shipped = Path(scratch) / "keras_lowering.onnx", Path(scratch) / "shipped.onnx"
        scorer(keras.ops.zeros((1, size, size, 3)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scorer.export(str(baseline), format="onnx", verbose=False)
        export_onnx(scorer, shipped)
        graphs = {"Keras' lowering": baseline, "shipped export": shipped}
        for label, path in graphs.items():
            got = onnx_scorer(path, size, 2).predict_on_batch(x)[0][:, 0]
            shares = ", ".join(f"{op} {share:.0%}" for op, share in operator_shares(path, x[:1]))
            print(f"{label}: max |dP(tumor)| vs Keras {np.abs(got - expected).max():.1e}; kernel time: {shares}")

        two_threads = {label: onnx_scorer(path, size, 2) for label, path in graphs.items()}
        for batch in (1, 4, 8, 16):
            rates = {}
            for label, run in two_threads.items():
                rates[label] = images_per_s(run.predict_on_batch, x[:batch], args.seconds)
            base, new = rates["Keras' lowering"], rates["shipped export"]
            print(f"2 threads, batch {batch:2d}: {base:6.0f} -> {new:6.0f} images/s ({new / base:.2f}x)")

        one, two = onnx_scorer(shipped, size, 1), two_threads["shipped export"]
        for batch in (1, 4, 8):
            cells = []
            for label, run, callers in (("2 threads x1", two, 1), ("1 thread x1", one, 1), ("1 thread x2", one, 2)):
                rate = images_per_s(run.predict_on_batch, x[:batch], args.seconds, callers)
                cells.append(f"{label} {rate:5.0f}")
            print(f"shipped export, batch {batch}, images/s: " + "; ".join(cells))


if __name__ == "__main__":
    main()
