import numpy as np
import pandas as pd

from braintumor.hashing import Hashes
from braintumor.splitting import assign_splits, leakage

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def frame(seed=0):
    """600 tumor singletons, 100 healthy singletons and 20 IXI subjects of 5 healthy slices each."""
    rows = [{"label": 1, "group": f"c{i}"} for i in range(600)]
    rows += [{"label": 0, "group": f"c{600 + i}"} for i in range(100)]
    rows += [{"label": 0, "group": f"IXI{s:03d}"} for s in range(20) for _ in range(5)]
    return pd.DataFrame(rows).sample(frac=1, random_state=seed).reset_index(drop=True)


def test_stratified_grouped_and_seeded():
    data = frame()
    split = assign_splits(data, FRACTIONS, seed=3)
    assert (data.assign(split=split).groupby("group")["split"].nunique() == 1).all()
    for label, total in ((1, 600), (0, 200)):
        counts = split[data.label == label].value_counts()
        for name, share in FRACTIONS.items():
            assert abs(counts[name] - share * total) <= 5  # within one IXI subject of the target
    assert split.equals(assign_splits(data, FRACTIONS, seed=3))
    assert not split.equals(assign_splits(data, FRACTIONS, seed=4))


def test_leakage_counts_near_duplicates_across_splits():
    rng = np.random.default_rng(0)
    phash = rng.integers(0, 2**63, (6, 4), dtype=np.uint64)
    dhash = rng.integers(0, 2**63, (6, 4), dtype=np.uint64)
    phash[4], dhash[4] = phash[0] ^ np.uint64(1), dhash[0]  # val image 4 is a near copy of train image 0
    split = pd.Series(["train", "train", "val", "test", "val", "test"])
    assert leakage(Hashes(phash, dhash), split, 10, 10) == {"val_in_train": 1, "test_in_train": 0}
