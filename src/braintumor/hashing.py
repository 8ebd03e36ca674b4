"""Perceptual hashes of images and a vectorised search for near-duplicate pairs.

Two hash families (imagehash's pHash and dHash) are computed on the same normalised picture: 8-bit
grayscale, a square window centred on the head (`images.center_on_head`), so borders, padding, shifts,
colour mode and bit depth matter little. Brain slices look alike, so a pair counts as near-duplicate only when *both* distances are
within their thresholds. Hashes are packed into uint64 words; pair distances are popcounts in a
numba-compiled loop over blocks of rows, run in threads (the compiled code releases the GIL).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import imagehash
import numba
import numpy as np
from numba import types
from numba.extending import intrinsic
from PIL import Image

from braintumor.images import ImageReadError, center_on_head, load_grayscale
from braintumor.parallel import parallel_map, worker_count

# Query rows per task of the thread pool: small enough that the threads share the triangular self-join evenly.
BLOCK_ROWS = 64


@dataclass(frozen=True)
class Hashes:
    """pHash and dHash bits of N images, each packed as (N, hash_size**2 / 64) uint64 words."""

    phash: np.ndarray
    dhash: np.ndarray

    def __len__(self) -> int:
        return len(self.phash)

    def take(self, index: np.ndarray) -> Hashes:
        return Hashes(self.phash[index], self.dhash[index])


def pack(bits: np.ndarray) -> np.ndarray:
    """Boolean hash matrix -> uint64 words (the bit count must be a multiple of 64)."""
    return np.packbits(bits.ravel()).view(">u8").astype(np.uint64)


def image_hashes(path: str, hash_size: int) -> tuple[np.ndarray, np.ndarray] | ImageReadError:
    """pHash and dHash words of one image file, or the read error (returned, so a pool can carry it)."""
    try:
        # JPEG draft decoding at >= 8x the hash side is plenty for a 4x-oversampled pHash, and much faster.
        picture = Image.fromarray(center_on_head(load_grayscale(path, draft_size=8 * hash_size)))
    except ImageReadError as err:
        return err
    return (
        pack(imagehash.phash(picture, hash_size=hash_size).hash),
        pack(imagehash.dhash(picture, hash_size=hash_size).hash),
    )


def hash_images(
    paths: list[str], hash_size: int, workers: int | None
) -> tuple[Hashes, list[ImageReadError]]:
    """Hash every image in parallel processes. Unreadable images get all-zero hashes and an error entry."""
    results = parallel_map(
        functools.partial(image_hashes, hash_size=hash_size), paths, workers, desc="dedup: hash images"
    )
    words = hash_size * hash_size // 64
    phash = np.zeros((len(paths), words), dtype=np.uint64)
    dhash = np.zeros((len(paths), words), dtype=np.uint64)
    errors = []
    for row, result in enumerate(results):
        if isinstance(result, ImageReadError):
            errors.append(result)
        else:
            phash[row], dhash[row] = result
    return Hashes(phash, dhash), errors


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance between packed hashes of equal shape."""
    return np.bitwise_count(a ^ b).sum(axis=-1, dtype=np.int64)


@dataclass(frozen=True)
class Pairs:
    """Index pairs (i into the query set, j into the base set) with their pHash and dHash distances."""

    i: np.ndarray
    j: np.ndarray
    phash: np.ndarray
    dhash: np.ndarray

    def __len__(self) -> int:
        return len(self.i)

    def where(self, mask: np.ndarray) -> Pairs:
        return Pairs(self.i[mask], self.j[mask], self.phash[mask], self.dhash[mask])


@intrinsic
def _popcount(typingctx, word):
    """The CPU's popcount instruction on one uint64 (LLVM's ctpop)."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@numba.njit(nogil=True, cache=True)
def _block_pairs(qp, qd, bp, bd, start, stop, self_join, max_p, max_d):
    """Pairs (i in start..stop of the query, j of the base) within both limits; compiled, GIL released.
    The second half of the pHash words, and the dHash, are compared only for pairs still within the limit."""
    capacity = 1024
    found = np.empty((capacity, 4), dtype=np.int64)
    n = 0
    half = qp.shape[1] // 2
    for i in range(start, stop):
        for j in range(i + 1 if self_join else 0, bp.shape[0]):
            p = 0
            for w in range(half):
                p += _popcount(qp[i, w] ^ bp[j, w])
            if p > max_p:  # most pairs of unrelated scans are out after half the words
                continue
            for w in range(half, qp.shape[1]):
                p += _popcount(qp[i, w] ^ bp[j, w])
            if p > max_p:
                continue
            d = 0
            for w in range(qd.shape[1]):
                d += _popcount(qd[i, w] ^ bd[j, w])
            if d > max_d:
                continue
            if n == capacity:
                capacity *= 2
                grown = np.empty((capacity, 4), dtype=np.int64)
                grown[:n] = found[:n]
                found = grown
            found[n, 0], found[n, 1], found[n, 2], found[n, 3] = i, j, p, d
            n += 1
    return found[:n]


def near_pairs(
    query: Hashes, max_phash: int, max_dhash: int, base: Hashes | None = None, workers: int | None = None
) -> Pairs:
    """All pairs within `max_phash` (pHash) and `max_dhash` (dHash).

    Without `base`, pairs within `query` itself, each once (i < j). With `base`, every (query, base) pair.
    Every pair is compared (exact, no approximate index) by a compiled loop over blocks of query rows, run
    in threads.
    """
    self_join = base is None
    base = query if base is None else base
    arrays = [np.ascontiguousarray(a) for a in (query.phash, query.dhash, base.phash, base.dhash)]

    def block(start: int) -> np.ndarray:
        return _block_pairs(*arrays, start, min(start + BLOCK_ROWS, len(query)), self_join, max_phash, max_dhash)

    with ThreadPoolExecutor(max_workers=worker_count(workers)) as pool:
        blocks = list(pool.map(block, range(0, len(query), BLOCK_ROWS)))
    found = np.concatenate(blocks) if blocks else np.zeros((0, 4), dtype=np.int64)
    return Pairs(found[:, 0], found[:, 1], found[:, 2], found[:, 3])
