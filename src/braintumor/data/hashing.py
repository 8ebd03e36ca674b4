"""Perceptual hashes of images and a vectorised search for near-duplicate pairs.

Two hash families (imagehash's pHash and dHash) are computed on the same normalised picture: 8-bit
grayscale, a square window centred on the head (`images.center_on_head`), so borders, padding, shifts,
colour mode and bit depth matter little. Brain slices look alike, so a pair counts as near-duplicate only
when *both* distances are within their thresholds. Hashes are packed into uint64 words. The pair search is
exact but skips groups of hashes that the triangle inequality rules out (`LeaderIndex`); it is a
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

from braintumor.data.images import center_on_head, load_grayscale
from braintumor.errors import ImageReadError
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
        # JPEG draft decoding at >= 8x the hash side is plenty for a 4x-oversampled pHash, and much faster;
        # fetch refused the images over its pixel limit, so none is applied again here.
        picture = Image.fromarray(center_on_head(load_grayscale(path, draft_size=8 * hash_size, max_pixels=None)))
    except ImageReadError as err:
        return err
    return (
        pack(imagehash.phash(picture, hash_size=hash_size).hash),
        pack(imagehash.dhash(picture, hash_size=hash_size).hash),
    )


def hash_images(paths: list[str], hash_size: int, workers: int | None) -> tuple[Hashes, list[ImageReadError]]:
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
def _append(found, n, i, j, p, d):
    """`found` with row n set to the pair (i, j) and its distances, its capacity doubled first when full.

    Args:
        found: the pair array being filled.
        n: the row to write.
        i: the query index.
        j: the base index.
        p: their pHash distance.
        d: their dHash distance.
    """
    if n == found.shape[0]:
        grown = np.empty((2 * n, 4), dtype=np.int64)
        grown[:n] = found
        found = grown
    found[n, 0], found[n, 1], found[n, 2], found[n, 3] = i, j, p, d
    return found


@numba.njit(nogil=True, cache=True)
def _distance(a, b, limit):
    """Hamming distance of two packed rows; stops at the first word that takes it past `limit`."""
    d = 0
    for w in range(a.shape[0]):
        d += _popcount(a[w] ^ b[w])
        if d > limit:
            return d
    return d


@numba.njit(nogil=True, cache=True)
def _assign_leaders(phash, radius):
    """Greedy leaders: each row joins the first leader within `radius` pHash bits, else leads its own group.
    Returns each row's group and its distance to the group's leader, and the leader rows."""
    n = phash.shape[0]
    leaders = np.empty(n, dtype=np.int64)
    group = np.empty(n, dtype=np.int64)
    distance = np.zeros(n, dtype=np.int64)
    count = 0
    for i in range(n):
        group[i] = -1
        for k in range(count):
            d = _distance(phash[i], phash[leaders[k]], radius)
            if d <= radius:
                group[i], distance[i] = k, d
                break
        if group[i] < 0:
            leaders[count], group[i] = i, count
            count += 1
    return group, distance, leaders[:count]


@dataclass(frozen=True)
class LeaderIndex:
    """Base rows grouped around leader rows by pHash distance, for an exact search that skips whole groups.

    By the triangle inequality, a query q is within `max_p` of some member m of a group only if
    d(q, leader) <= radius_of_group + max_p, and only members with |d(q, leader) - d(m, leader)| <= max_p
    can be. Members are stored group by group, sorted by their distance to the leader.
    """

    leaders: np.ndarray  # base row of each group's leader
    radii: np.ndarray  # pHash distance from each leader to its farthest member
    starts: np.ndarray  # members of group k: members[starts[k]:starts[k + 1]]
    members: np.ndarray  # base rows
    member_distance: np.ndarray  # their pHash distance to their leader (ascending within a group)


def leader_index(phash: np.ndarray, radius: int) -> LeaderIndex:
    """Group the rows of `phash` around greedy leaders, each member within `radius` bits of its leader."""
    group, distance, leaders = _assign_leaders(np.ascontiguousarray(phash), radius)
    order = np.lexsort((distance, group))
    starts = np.searchsorted(group[order], np.arange(len(leaders) + 1))
    radii = np.zeros(len(leaders), dtype=np.int64)
    np.maximum.at(radii, group, distance)
    return LeaderIndex(leaders, radii, starts, order, distance[order])


@numba.njit(nogil=True, cache=True)
def _block_pairs(
    qp, qd, bp, bd, leaders, radii, starts, members, member_distance, start, stop, self_join, max_p, max_d
):
    """Pairs (i in start..stop of the query, j of the base) within both limits; compiled, GIL released.
    Groups of the leader index that cannot hold a match are skipped; the rest are checked pair by pair,
    the dHash only for pairs within the pHash limit.

    Args:
        qp: pHash bits of the query, packed into uint64 words.
        qd: dHash bits of the query, packed likewise.
        bp: pHash bits of the base.
        bd: dHash bits of the base.
        leaders: the base row of each group's leader.
        radii: each group's largest member distance to its leader.
        starts: where each group's members begin in `members`.
        members: base rows grouped by leader.
        member_distance: each member's pHash distance to its leader.
        start: first query row of this block.
        stop: one past its last query row.
        self_join: query and base are one set: keep i < j only.
        max_p: the pHash limit.
        max_d: the dHash limit.
    """
    found = np.empty((1024, 4), dtype=np.int64)
    n = 0
    for i in range(start, stop):
        for k in range(leaders.shape[0]):
            reach = radii[k] + max_p
            to_leader = _distance(qp[i], bp[leaders[k]], reach)
            if to_leader > reach:
                continue
            group = member_distance[starts[k] : starts[k + 1]]
            first = starts[k] + np.searchsorted(group, to_leader - max_p)
            last = starts[k] + np.searchsorted(group, to_leader + max_p, side="right")
            for m in range(first, last):
                j = members[m]
                if self_join and j <= i:
                    continue
                p = _distance(qp[i], bp[j], max_p)
                if p > max_p:
                    continue
                d = _distance(qd[i], bd[j], max_d)
                if d > max_d:
                    continue
                found = _append(found, n, i, j, p, d)
                n += 1
    return found[:n]


def near_pairs(
    query: Hashes, max_phash: int, max_dhash: int, base: Hashes | None = None, workers: int | None = None
) -> Pairs:
    """All pairs within `max_phash` (pHash) and `max_dhash` (dHash), sorted by (i, j).

    Without `base`, pairs within `query` itself, each once (i < j). With `base`, every (query, base) pair.
    Exact: the base is grouped around leaders (`leader_index`) with radius `max_phash // 2`, so any two
    members of a group are within `max_phash` of each other; each query row is compared with every leader
    and then only with the members of groups that the triangle inequality cannot rule out. Copies of one
    scan share a group, so the work grows with N x groups rather than N^2. (Measured on 100k grown hashes:
    radius max_phash // 2 was the fastest; half of that splits the copies into 11x more groups, and a radius
    of max_phash loosens every bound.) Blocks of query rows run in threads (the compiled code releases the GIL).

    Args:
        query: the hashes to match.
        max_phash: the pHash limit (Hamming distance, inclusive).
        max_dhash: the dHash limit.
        base: the hashes to match against; None matches `query` with itself.
        workers: threads; None = all cores.
    """
    self_join = base is None
    base = query if base is None else base
    index = leader_index(base.phash, max_phash // 2)
    arrays = [np.ascontiguousarray(a) for a in (query.phash, query.dhash, base.phash, base.dhash)]
    lookup = (index.leaders, index.radii, index.starts, index.members, index.member_distance)

    def block(start: int) -> np.ndarray:
        return _block_pairs(
            *arrays, *lookup, start, min(start + BLOCK_ROWS, len(query)), self_join, max_phash, max_dhash
        )

    with ThreadPoolExecutor(max_workers=worker_count(workers)) as pool:
        blocks = list(pool.map(block, range(0, len(query), BLOCK_ROWS)))
    found = np.concatenate(blocks) if blocks else np.zeros((0, 4), dtype=np.int64)
    found = found[np.lexsort((found[:, 1], found[:, 0]))]
    return Pairs(found[:, 0], found[:, 1], found[:, 2], found[:, 3])
