"""Perceptual hashes of images and a vectorised search for near-duplicate pairs.

Two hash families (imagehash's pHash and dHash) are computed on the same normalised picture: 8-bit
grayscale, a square window centred on the head (`images.center_on_head`), so borders, padding, shifts,
colour mode and bit depth matter little. Brain slices look alike, so a pair counts as near-duplicate only when *both* distances are
within their thresholds. Hashes are packed into uint64 words; pair distances are numpy popcounts over
blocks of rows, run in threads (numpy releases the GIL), never a Python loop over pairs.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

from braintumor.images import ImageReadError, center_on_head, load_grayscale
from braintumor.parallel import parallel_map, worker_count

# Rows of the left operand compared per block: a block of 256 rows × 100k columns is 25 MB of uint8.
BLOCK_ROWS = 256


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


def near_pairs(
    query: Hashes, max_phash: int, max_dhash: int, base: Hashes | None = None, workers: int | None = None
) -> Pairs:
    """All pairs within `max_phash` (pHash) and `max_dhash` (dHash).

    Without `base`, pairs within `query` itself, each once (i < j). With `base`, every (query, base) pair.
    """
    self_join = base is None
    base = query if base is None else base
    base_words = np.ascontiguousarray(base.phash.T)  # (words, M): each word row is contiguous

    def block(start: int) -> tuple[np.ndarray, np.ndarray]:
        stop = min(start + BLOCK_ROWS, len(query))
        first_col = start + 1 if self_join else 0
        width = len(base) - first_col
        distance = np.zeros((stop - start, max(width, 0)), dtype=np.uint16)
        for word in range(base_words.shape[0]):
            distance += np.bitwise_count(query.phash[start:stop, word, None] ^ base_words[word, None, first_col:])
        rows, cols = np.nonzero(distance <= max_phash)
        rows, cols = rows + start, cols + first_col
        if self_join:
            keep = cols > rows
            rows, cols = rows[keep], cols[keep]
        return rows, cols

    with ThreadPoolExecutor(max_workers=worker_count(workers)) as pool:
        blocks = list(pool.map(block, range(0, len(query), BLOCK_ROWS)))
    i = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros(0, dtype=np.int64)
    j = np.concatenate([b[1] for b in blocks]) if blocks else np.zeros(0, dtype=np.int64)
    dp = hamming(query.phash[i], base.phash[j])
    dd = hamming(query.dhash[i], base.dhash[j])
    return Pairs(i, j, dp, dd).where(dd <= max_dhash)
