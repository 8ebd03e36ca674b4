"""Training throughput per model variant, the input pipeline's own throughput, and real vs random input.

Runs from a prepared subset (`--prepare` writes it from artifacts/split/train.npz; at 96 px 1024 images are
28 MiB, under the 64 MiB a GPU host accepts), so the same file and command run anywhere:

    python benchmarks/training_throughput.py --prepare            # once, after `dvc repro` has run split
    python benchmarks/training_throughput.py                       # CPU, default backend (TensorFlow)
    KERAS_BACKEND=jax python benchmarks/training_throughput.py --mixed-precision both   # a GPU host

Per variant: images/s and epoch time of `model.fit` (after one warm-up epoch that compiles), on the real
subset and then, as the baseline in the same process and with the same compiled model, on in-memory random
tensors of the same shape: the ratio real/random step time shows whether training waits on input (target
<= 1.1). The input pipeline alone is timed too: the batches `fit` gets (shuffled slices of the uint8 array,
cast to float32) with no model.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import keras
import numpy as np
import yaml

from braintumor.data.datasets import load_split
from braintumor.model.architectures import build_model
from braintumor.model.train import compile_model

SUBSET = Path(__file__).with_name("data") / "train_subset.npz"


def prepare(images: int, seed: int) -> None:
    data = load_split("artifacts/split", "train", "binary")
    rows = np.random.default_rng(seed).choice(len(data["y"]), min(images, len(data["y"])), replace=False)
    x, y = data["x"][np.sort(rows)], data["y"][np.sort(rows)]
    SUBSET.parent.mkdir(exist_ok=True)
    np.savez(SUBSET, x=x, y=y)
    print(f"wrote {SUBSET}: {len(x)} images of {x.shape[1]} px, {SUBSET.stat().st_size / 2**20:.1f} MiB")


def input_pipeline(x: np.ndarray, batch_size: int, seed: int) -> float:
    """Images/s of producing shuffled float32 batches from the uint8 array, with no model."""
    order = np.random.default_rng(seed).permutation(len(x))
    started = time.perf_counter()
    for start in range(0, len(x), batch_size):
        batch = x[order[start : start + batch_size]].astype("float32")
        batch.sum()  # touch the batch
    return len(x) / (time.perf_counter() - started)


def fit_rates(
    params: dict, name: str, x: np.ndarray, noise: np.ndarray, y: np.ndarray, epochs: int
) -> tuple[float, float, float]:
    """(images/s, seconds per epoch) of model.fit on `x`, then images/s on `noise`, with the same compiled
    model, after a warm-up epoch that compiles it."""
    config = params["train"]
    keras.utils.set_random_seed(params["seed"])
    model, optimizer = build_model(name, x.shape[1], 1, config, params["seed"])
    compile_model(model, optimizer, config["learning_rate"], 2)
    model.fit(x, y, batch_size=config["batch_size"], epochs=1, verbose=0)  # compile, warm caches
    rates = []
    for inputs in (x, noise):
        started = time.perf_counter()
        model.fit(inputs, y, batch_size=config["batch_size"], epochs=epochs, verbose=0)
        rates.append(len(x) * epochs / (time.perf_counter() - started))
    return rates[0], len(x) / rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help=f"write {SUBSET} from artifacts/split and stop")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", default=["seed_fsm", "seed_cnn", "small_xception", "efficientnetb0"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--mixed-precision", choices=["off", "on", "both"], default="off")
    args = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    if args.prepare:
        prepare(args.images, params["seed"])
        return
    with np.load(SUBSET) as data:
        x, y = data["x"], data["y"]
    real = x.astype("float32")
    noise = np.random.default_rng(0).uniform(0, 255, real.shape).astype("float32")
    print(
        f"backend {keras.backend.backend()}, {len(x)} images of {x.shape[1]} px, batch {params['train']['batch_size']}"
    )
    print(f"input pipeline alone: {input_pipeline(x, params['train']['batch_size'], params['seed']):.0f} images/s")
    policies = {"off": [False], "on": [True], "both": [False, True]}[args.mixed_precision]
    print(
        "| variant | mixed precision | images/s (real) | s/epoch | images/s (random tensors) | step time real/random |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.variants:
        for mixed in policies:
            keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
            config = copy.deepcopy(params)
            rate, epoch, random_rate = fit_rates(config, name, real, noise, y, args.epochs)
            print(
                f"| {name} | {'on' if mixed else 'off'} | {rate:.0f} | {epoch:.2f} | {random_rate:.0f} | "
                f"{random_rate / rate:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
