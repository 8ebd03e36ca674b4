"""Training images/s of the train stage's `training.fit` per `train.distribution` and `train.loader`, and batch size.

What a team moving to GPUs or more images needs to know: what data parallelism costs or buys on this host's
devices, whether streaming batches from the split's memory-mapped files (`train.loader: stream`) keeps up with
a device, and how far a larger batch uses the card. Runs from a split directory packed by
`benchmarks/fold_training.py --pack` (19 MiB at 96 px, so it travels to a GPU host):

    python benchmarks/fold_training.py --pack artifacts/split benchmarks/data/split96   # once, here
    KERAS_BACKEND=jax python benchmarks/distributed_throughput.py --split-dir benchmarks/data/split96 \\
        --batch-sizes 32 256

Each row fits the params.yaml model on train (tiled `--repeat` times, so an epoch has enough steps to time) for
`--epochs` epochs without early stopping, validating on val, and times the training part of every epoch after
the first (which compiles): from the epoch's start to its validation's start. The first row (distribution
none, loader arrays, the first batch size) is the baseline that every row's rate is divided by.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from pathlib import Path

import keras
import numpy as np
import yaml

from braintumor.data.datasets import load_split
from braintumor.model.train import fit


class EpochClock(keras.callbacks.Callback):
    """Seconds of the training part of each epoch (validation excluded)."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self.started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_test_begin(self, logs=None):
        if self.started:  # the first validation pass of the epoch
            self.seconds.append(time.perf_counter() - self.started)
            self.started = 0.0


def tiled(data: dict, repeat: int) -> dict:
    rows = np.tile(np.arange(len(data["y"])), repeat)
    return {key: value[rows] for key, value in data.items()}


def rate(params: dict, split_dir: Path, loader: str, repeat: int) -> tuple[float, int]:
    """(training images/s after the first epoch, images an epoch) of `training.fit` with `params`."""
    lazy = loader == "stream"
    train = tiled(load_split(split_dir, "train", params["train"]["task"], lazy=lazy), repeat)
    val = load_split(split_dir, "val", params["train"]["task"], lazy=lazy)
    clock = EpochClock()
    fit(params, train, val, callbacks=[clock], verbose=0)
    timed = clock.seconds[1:]
    return len(train["y"]) * len(timed) / sum(timed), len(train["y"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split-dir", type=Path, default=Path("artifacts/split"))
    parser.add_argument("--distributions", nargs="+", default=["none", "data_parallel"])
    parser.add_argument("--loaders", nargs="+", default=["arrays", "stream"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32])
    parser.add_argument("--epochs", type=int, default=3, help="epochs a row; the first compiles and is not timed")
    parser.add_argument("--repeat", type=int, default=4, help="tile the train split this many times an epoch")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch compiles and is not timed")
    params = yaml.safe_load(Path("params.yaml").read_text())
    print(
        f"backend {keras.backend.backend()}, devices {keras.distribution.list_devices()}, "
        f"model {params['train']['model']}, split {args.split_dir}",
        flush=True,
    )
    print("| batch | distribution | loader | images an epoch | images/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    baseline = None
    for batch_size, distribution, loader in itertools.product(args.batch_sizes, args.distributions, args.loaders):
        row = copy.deepcopy(params)
        row["train"].update(
            batch_size=batch_size,
            distribution=distribution,
            loader=loader,
            epochs=args.epochs,
            early_stopping_patience=args.epochs + 1,
        )
        images_per_second, images = rate(row, args.split_dir, loader, args.repeat)
        baseline = baseline or images_per_second
        print(
            f"| {batch_size} | {distribution} | {loader} | {images} | {images_per_second:,.0f} | "
            f"{images_per_second / baseline:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
