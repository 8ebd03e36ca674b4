"""A process-pool map with a progress bar, for the per-image work of fetch and dedup."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def worker_count(requested: int | None) -> int:
    """`None` means every core this process may use."""
    if requested is not None:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int | None, desc: str) -> list[R]:
    """`[fn(x) for x in items]` in `workers` processes, in order, with a tqdm bar named `desc`."""
    workers = worker_count(workers)
    chunksize = max(1, min(64, len(items) // (workers * 8) or 1))
    with tqdm(total=len(items), desc=desc, unit="img", mininterval=1.0) as bar:
        if workers == 1 or len(items) <= chunksize:
            results = []
            for item in items:
                results.append(fn(item))
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = []
            for result in pool.map(fn, items, chunksize=chunksize):
                results.append(result)
                bar.update()
            return results
