"""Deduplication speed and scaling, against the reference notebook's method in the same process.

1. Decode-only throughput (PIL with JPEG draft mode, the fastest decode available here) and hashing
   throughput (decode + centre + pHash + dHash) with 1 and 2 processes, on the fetched images; then the
   milliseconds per image of each of those steps, and imagehash's own floor (both hashes of a picture already
   at pHash's input size), which caps the hashing / decode ratio whatever the window costs.
2. Time to cluster N hashes (near-pair search + connected components, as in the dedup stage) for N = the
   real set and larger sets grown from it: each extra hash is a real one with a few random bits flipped,
   as an altered copy would be. Reports the growth exponent between sizes, and the previous all-pairs
   search (before/after ratio, same pairs asserted) up to `--all-pairs-up-to`.
3. Baseline: the notebook's method, every image's decoded pixels compared with every kept image in a
   Python loop, on the first `--baseline-images` images; our hash + cluster on the same images; the ratio.

Usage (after `dvc repro` has run fetch):
    python benchmarks/dedup_scaling.py [--sizes 20000 100000] [--baseline-images 1000]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import imagehash
import numba
import numpy as np
import pandas as pd
from PIL import Image

from braintumor.data.dedup import cluster_ids
from braintumor.data.hashing import Hashes, Pairs, _append, _popcount, hash_images, near_pairs
from braintumor.data.images import center_on_head, load_grayscale
from braintumor.parallel import parallel_map
from braintumor.params import load_params


def decode(path: str, draft_size: int) -> int:
    return load_grayscale(path, draft_size=draft_size).size


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def step_times(paths: list[str], size: int) -> dict[str, float]:
    """Milliseconds per image of each step of `hashing.image_hashes`, one process, the second of two passes
    (the first warms the page cache and the imports). Then imagehash's floor: both hashes of the same
    windows already shrunk to pHash's own input size (4 x hash size), where its resize has nothing to do."""
    for _ in range(2):
        spent = dict.fromkeys(["decode (draft mode)", "head window", "pHash", "dHash"], 0.0)
        small = []
        for path in paths:
            started = time.perf_counter()
            gray = load_grayscale(path, draft_size=8 * size)
            decoded = time.perf_counter()
            picture = Image.fromarray(center_on_head(gray))
            centred = time.perf_counter()
            imagehash.phash(picture, hash_size=size)
            phashed = time.perf_counter()
            imagehash.dhash(picture, hash_size=size)
            for step, seconds in zip(
                spent,
                (decoded - started, centred - decoded, phashed - centred, time.perf_counter() - phashed),
                strict=True,
            ):
                spent[step] += seconds
            small.append(picture.resize((4 * size, 4 * size), Image.Resampling.LANCZOS))
        for step, hash_function in (("pHash floor", imagehash.phash), ("dHash floor", imagehash.dhash)):
            started = time.perf_counter()
            for picture in small:
                hash_function(picture, hash_size=size)
            spent[step] = time.perf_counter() - started
    return {step: 1e3 * seconds / len(paths) for step, seconds in spent.items()}


def grown(hashes: Hashes, n: int, seed: int) -> Hashes:
    """`hashes` plus altered copies up to n rows: a random real row with 0-12 random bits flipped per hash."""
    rng = np.random.default_rng(seed)
    extra = n - len(hashes)
    if extra <= 0:
        return hashes.take(np.arange(n))
    source = rng.integers(0, len(hashes), extra)
    parts = []
    for words in (hashes.phash, hashes.dhash):
        copies = words[source].copy()
        bits = words.shape[1] * 64
        for row, flips in enumerate(rng.integers(0, 13, extra)):
            for bit in rng.choice(bits, flips, replace=False):
                copies[row, bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
        parts.append(np.concatenate([words, copies]))
    return Hashes(*parts)


@numba.njit(nogil=True)
def _all_pairs_block(qp, qd, start, stop, max_p, max_d):
    """The previous search (commit 4ea3c15, before the leader index), kept as the before/after baseline:
    every pair (i < j), the second half of the pHash words and the dHash only for pairs still in range
    (the pair buffer is the shared `_append`)."""
    found = np.empty((1024, 4), dtype=np.int64)
    n = 0
    half = qp.shape[1] // 2
    for i in range(start, stop):
        for j in range(i + 1, qp.shape[0]):
            p = 0
            for w in range(half):
                p += _popcount(qp[i, w] ^ qp[j, w])
            if p > max_p:
                continue
            for w in range(half, qp.shape[1]):
                p += _popcount(qp[i, w] ^ qp[j, w])
            if p > max_p:
                continue
            d = 0
            for w in range(qd.shape[1]):
                d += _popcount(qd[i, w] ^ qd[j, w])
            if d > max_d:
                continue
            found = _append(found, n, i, j, p, d)
            n += 1
    return found[:n]


def all_pairs_near_pairs(query: Hashes, max_p: int, max_d: int, workers: int) -> Pairs:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        blocks = pool.map(
            lambda start: _all_pairs_block(query.phash, query.dhash, start, min(start + 64, len(query)), max_p, max_d),
            range(0, len(query), 64),
        )
        found = np.concatenate(list(blocks))
    return Pairs(found[:, 0], found[:, 1], found[:, 2], found[:, 3])


def cluster(hashes: Hashes, max_p: int, max_d: int, workers: int, search=None) -> tuple[int, int]:
    """Near-pair search then connected components, as in the dedup stage: (pairs, clusters)."""
    pairs = (search or near_pairs)(hashes, max_p, max_d, workers=workers)
    ids = cluster_ids(len(hashes), pairs)
    return len(pairs), len(np.unique(ids))


def notebook_method(paths: list[str]) -> int:
    """The reference notebook: decode each image and compare its pixels with every kept image, in Python."""
    kept: list[np.ndarray] = []
    for path in paths:
        pixels = load_grayscale(path)
        if not any(pixels.shape == other.shape and np.array_equal(pixels, other) for other in kept):
            kept.append(pixels)
    return len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default="artifacts/fetch/manifest.csv")
    parser.add_argument("--sizes", type=int, nargs="*", default=[20_000, 100_000])
    parser.add_argument("--baseline-images", type=int, default=1000)
    parser.add_argument("--step-images", type=int, default=1000, help="images for the per-step timing")
    parser.add_argument(
        "--all-pairs-up-to", type=int, default=100_000, help="run the previous all-pairs search up to this N"
    )
    args = parser.parse_args()
    config = load_params()["dedup"]
    size, max_p, max_d = config["hash_size"], config["phash_max_distance"], config["dhash_max_distance"]
    paths = pd.read_csv(args.manifest, keep_default_na=False)["path"].tolist()
    cores = len(os.sched_getaffinity(0))
    print(f"{len(paths)} fetched images, hash size {size} ({size * size} bits), {cores} cores\n")

    print("1. throughput (images/s)")
    rates = {}
    for workers in (1, 2):
        _, seconds = timed(parallel_map, _Decode(8 * size), paths, workers, f"decode x{workers}")
        rates[f"decode, draft mode, {workers} proc"] = len(paths) / seconds
        (hashes, errors), seconds = timed(hash_images, paths, size, workers)
        rates[f"decode + pHash + dHash, {workers} proc"] = len(paths) / seconds
    for name, rate in rates.items():
        print(f"   {name:<38} {rate:8.0f}")
    for workers in (1, 2):
        ratio = rates[f"decode + pHash + dHash, {workers} proc"] / rates[f"decode, draft mode, {workers} proc"]
        print(f"   hashing / decode-only, {workers} proc: {ratio:.2f}")
    steps = step_times(paths[: args.step_images], size)
    print(
        f"   where the time goes, 1 proc, {min(args.step_images, len(paths))} images (ms per image): "
        + ", ".join(f"{step} {ms:.3f}" for step, ms in steps.items())
    )
    decode_ms, floor_ms = steps["decode (draft mode)"], steps["pHash floor"] + steps["dHash floor"]
    print(
        f"   ceiling of hashing / decode-only with imagehash, even with a free window: "
        f"{decode_ms / (decode_ms + floor_ms):.2f}"
    )

    print(f"\n2. clustering N hashes (near-pair search + connected components), {cores} threads")
    few = hashes.take(np.arange(10))  # compile (or load) both searches once, outside the timing
    near_pairs(few, max_p, max_d), all_pairs_near_pairs(few, max_p, max_d, 1)
    previous = None
    for n in [len(hashes), *args.sizes]:
        grown_set = grown(hashes, n, seed=0)
        (pairs, clusters), seconds = timed(cluster, grown_set, max_p, max_d, cores)
        if n <= args.all_pairs_up_to:
            (old_pairs, _), old_seconds = timed(cluster, grown_set, max_p, max_d, cores, all_pairs_near_pairs)
            assert old_pairs == pairs
            print(
                f"   N = {n:>7}: previous all-pairs search {old_seconds:7.2f} s; leader-index search "
                f"{old_seconds / seconds:.1f}x faster"
            )
        growth = (
            ""
            if previous is None
            else (
                f", growth exponent {math.log(seconds / previous[1]) / math.log(n / previous[0]):.2f} vs {previous[0]}"
            )
        )
        print(
            f"   N = {n:>7}: {seconds:7.2f} s, {n * (n - 1) / 2 / seconds / 1e6:7.0f} M pairs/s "
            f"(all-pairs equivalent), {pairs} near pairs, {clusters} clusters{growth}"
        )
        previous = (n, seconds)

    print(f"\n3. baseline on the first {args.baseline_images} images")
    subset = paths[: args.baseline_images]
    kept, baseline = timed(notebook_method, subset)
    (subset_hashes, _), hash_seconds = timed(hash_images, subset, size, cores)
    _, cluster_seconds = timed(cluster, subset_hashes, max_p, max_d, cores)
    ours = hash_seconds + cluster_seconds
    print(f"   notebook method (pixel equality, Python loop): {baseline:.2f} s, {kept} kept")
    print(f"   hash ({cores} proc) + cluster: {ours:.2f} s ({hash_seconds:.2f} + {cluster_seconds:.2f})")
    print(f"   ratio notebook / ours: {baseline / ours:.1f}x")


class _Decode:
    """Picklable decode-only task for the process pool."""

    def __init__(self, draft_size: int):
        self.draft_size = draft_size

    def __call__(self, path: str) -> int:
        return decode(path, self.draft_size)


if __name__ == "__main__":
    main()
