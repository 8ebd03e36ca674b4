"""Perceptual hashes and the pair search that finds near duplicates."""

import numpy as np
import pytest

import braintumor.data.hashing as hashing
from braintumor.data.hashing import Hashes, hamming, hash_images, leader_index, near_pairs
from braintumor.params import load_params

from conftest import REPO, brain_image, save


def random_hashes(n, words, seed, clones=0):
    """Random hashes, the last `clones` rows being copies of earlier rows with a few bits flipped."""
    rng = np.random.default_rng(seed)
    phash = rng.integers(0, 2**63, (n, words), dtype=np.uint64)
    dhash = rng.integers(0, 2**63, (n, words), dtype=np.uint64)
    for row in range(n - clones, n):
        src = rng.integers(0, n - clones)
        flips = np.uint64(1) << rng.integers(0, 63, (words,)).astype(np.uint64)
        phash[row], dhash[row] = phash[src] ^ flips, dhash[src]
    return Hashes(phash, dhash)


def brute_force(a, b, max_p, max_d, self_join):
    found = set()
    for i in range(len(a)):
        for j in range(i + 1 if self_join else 0, len(b)):
            p = sum(bin(int(x ^ y)).count("1") for x, y in zip(a.phash[i], b.phash[j], strict=True))
            d = sum(bin(int(x ^ y)).count("1") for x, y in zip(a.dhash[i], b.dhash[j], strict=True))
            if p <= max_p and d <= max_d:
                found.add((i, j, p, d))
    return found


@pytest.mark.parametrize("self_join", [True, False])
def test_near_pairs_matches_brute_force_across_blocks(monkeypatch, self_join):
    monkeypatch.setattr(hashing, "BLOCK_ROWS", 7)  # many blocks, ragged last one
    a = random_hashes(60, 2, seed=1, clones=15)
    b = a if self_join else random_hashes(40, 2, seed=2, clones=0)
    if not self_join:  # plant near copies of `a` rows in `b`
        b.phash[:10] = a.phash[5:15] ^ np.uint64(0b1011)
        b.dhash[:10] = a.dhash[5:15]
    # thresholds around the random-pair distance (64 of 128 bits) so that both filters matter
    pairs = near_pairs(a, 60, 62, base=None if self_join else b, workers=2)
    got = set(zip(pairs.i.tolist(), pairs.j.tolist(), pairs.phash.tolist(), pairs.dhash.tolist(), strict=True))
    expected = brute_force(a, b, 60, 62, self_join)
    assert got == expected and len(expected) >= 15


def clustered_hashes(originals, copies, words, max_flips, seed):
    """Random originals (unrelated: ~half their bits differ) and copies of them with up to `max_flips` bits
    flipped in each hash, shuffled, so that near pairs sit in tight groups as real duplicates do."""
    rng = np.random.default_rng(seed)
    phash = rng.integers(0, 2**63, (originals, words), dtype=np.uint64)
    dhash = rng.integers(0, 2**63, (originals, words), dtype=np.uint64)
    source = rng.integers(0, originals, copies)
    parts = [phash, dhash]
    for k, words_of in enumerate((phash, dhash)):
        grown = words_of[source].copy()
        for row in range(copies):
            for bit in rng.choice(words * 64, rng.integers(0, max_flips + 1), replace=False):
                grown[row, bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
        parts[k] = np.concatenate([words_of, grown])
    order = rng.permutation(originals + copies)
    return Hashes(parts[0][order], parts[1][order])


@pytest.mark.parametrize("self_join", [True, False])
def test_near_pairs_skips_groups_and_still_finds_every_pair(self_join):
    # copies of one original are within 6 pHash bits of each other: one group each at near_pairs' radius
    # (12 // 2); the dHash limit of 4 cuts some copy pairs
    hashes = clustered_hashes(originals=30, copies=90, words=2, max_flips=3, seed=3)
    a, b = (hashes, hashes) if self_join else (hashes.take(np.arange(40)), hashes.take(np.arange(40, 120)))
    assert len(leader_index(b.phash, 12 // 2).leaders) <= 30  # so whole groups can be skipped
    pairs = near_pairs(a, 12, 4, base=None if self_join else b, workers=2)
    got = list(zip(pairs.i.tolist(), pairs.j.tolist(), pairs.phash.tolist(), pairs.dhash.tolist(), strict=True))
    expected = brute_force(a, b, 12, 4, self_join)
    assert got == sorted(expected)  # every pair, once, in (i, j) order
    assert len(expected) < len(brute_force(a, b, 12, 8, self_join))  # the dHash limit mattered
    assert len(got) >= 30


def test_leader_index_groups_every_row_within_the_radius():
    hashes = clustered_hashes(originals=20, copies=60, words=4, max_flips=12, seed=4)
    index = leader_index(hashes.phash, 18)
    assert sorted(index.members.tolist()) == list(range(80))  # a partition of the rows
    for k, leader in enumerate(index.leaders):
        rows = index.members[index.starts[k] : index.starts[k + 1]]
        distance = hamming(hashes.phash[rows], hashes.phash[leader])
        assert distance.tolist() == index.member_distance[index.starts[k] : index.starts[k + 1]].tolist()
        assert leader in rows and distance.max() == index.radii[k] <= 18
        assert list(distance) == sorted(distance)


def test_hamming_counts_bits():
    a = np.array([[0b1111, 0]], dtype=np.uint64)
    b = np.array([[0b0101, 2**63]], dtype=np.uint64)
    assert hamming(a, b).tolist() == [3]


def test_hash_images_reports_unreadable_and_ignores_mode_and_padding(tmp_path):
    pixels = brain_image(7, 128)
    paths = [
        save(tmp_path / "a.png", pixels),
        save(tmp_path / "b.jpg", np.pad(pixels, 20), "RGB"),
        save(tmp_path / "c.png", brain_image(8, 128)),
    ]
    broken = tmp_path / "d.png"
    broken.write_bytes(b"nope")
    hashes, errors = hash_images([str(p) for p in paths] + [str(broken)], hash_size=16, workers=1)
    assert hashes.phash.shape == (4, 4)
    assert [e.path for e in errors] == [str(broken)]
    same = hamming(hashes.phash[0], hashes.phash[1]), hamming(hashes.dhash[0], hashes.dhash[1])
    other = hamming(hashes.phash[0], hashes.phash[2]), hamming(hashes.dhash[0], hashes.dhash[2])
    limits = load_params(REPO / "params.yaml")["dedup"]
    limit = (limits["phash_max_distance"], limits["dhash_max_distance"])
    assert same[0] <= limit[0] // 2 and same[1] <= limit[1] // 2  # re-encoded, padded, RGB: well within
    assert other[0] > limit[0] or other[1] > limit[1]  # a different scan: outside
