"""The split stage: seeded, stratified and group-aware, with no leakage, written as model-ready arrays."""

import numpy as np
import pandas as pd

from braintumor.data.datasets import split_images
from braintumor.data.hashing import Hashes
from braintumor.data.images import model_input
from braintumor.data.split import assign_splits, leakage, split
from braintumor.params import load_params

from conftest import REPO, brain_image, save

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


def dedup_output(root, members_per_cluster: dict[int, int], site_scans: int = 0) -> None:
    """A dedup stage output of 60 clusters (every fifth healthy), with the given number of members in some, then
    a site's first `site_scans` scans from `data/site-a/` (the local source, a cluster each)."""
    rng = np.random.default_rng(1)
    rows = []
    for cluster in range(60 + site_scans):
        site = cluster >= 60
        for k in range(1 + members_per_cluster.get(cluster, 0)):
            name = f"site-a-{cluster - 60:03d}" if site else f"c{cluster:02d}-{k}"
            path = save(root.parent / f"images/{name}.png", brain_image(cluster * 10 + k, 64))
            rows.append(
                {
                    "path": str(path),
                    "source": "local" if site else "synthetic",
                    "label": int(cluster % 5 != 0),
                    "subtype": "none" if cluster % 5 == 0 else "unknown",
                    "group": f"cluster-{cluster:05d}",
                    "cluster": cluster,
                    "sha256": f"{cluster}-{k}",
                    "representative": k == 0,
                }
            )
    frame = pd.DataFrame(rows)
    if not members_per_cluster:
        frame = frame.drop(columns="representative")  # as `dedup.keep: representatives` writes it
    root.mkdir(parents=True, exist_ok=True)
    frame.to_csv(root / "manifest.csv", index=False)
    words = rng.integers(0, 2**63, (len(frame), 4), dtype=np.uint64)
    np.savez(root / "hashes.npz", phash=words, dhash=words[:, ::-1].copy(), hash_size=16)


def test_members_follow_their_group_and_the_test_split_stays_the_same(in_tmp):
    params = load_params(REPO / "params.yaml")
    params["split"]["image_size"], params["split"]["workers"] = 32, 1
    dedup_output(in_tmp / "reps", {})
    split(params, in_tmp / "reps", in_tmp / "split-reps", in_tmp / "reps.json")
    dedup_output(in_tmp / "clusters", dict.fromkeys(range(0, 60, 2), 2))  # two members in every other cluster
    metrics = split(params, in_tmp / "clusters", in_tmp / "split-clusters", in_tmp / "clusters.json")

    before = pd.read_csv(in_tmp / "split-reps/manifest.csv")
    after = pd.read_csv(in_tmp / "split-clusters/manifest.csv")
    assert after[after.representative].set_index("cluster").split.equals(before.set_index("cluster").split)
    assert (after.groupby("group").split.nunique() == 1).all()
    with np.load(in_tmp / "split-reps/test.npz") as a, np.load(in_tmp / "split-clusters/test.npz") as b:
        assert all(np.array_equal(a[key], b[key]) for key in a.files)  # the same images, in the same order
    assert (in_tmp / "split-reps/test.x.npy").read_bytes() == (in_tmp / "split-clusters/test.x.npy").read_bytes()
    test_members = int((~after.representative & (after.split == "test")).sum())
    assert test_members > 0 and metrics["test_members_unused"] == test_members
    for name in ("train", "val"):
        with np.load(in_tmp / f"split-clusters/{name}.npz") as arrays:
            assert sorted(arrays["path"]) == sorted(after.path[after.split == name])  # members included
    assert metrics["cluster_members"] == 60 and metrics["images"] == 60 + 60 - test_members


def test_a_site_s_new_scans_move_no_image_already_placed(in_tmp):
    params = load_params(REPO / "params.yaml")
    params["split"]["image_size"], params["split"]["workers"] = 32, 1
    placed = {}
    for scans in (0, 30, 80):
        dedup_output(in_tmp / f"dedup{scans}", {3: 1}, site_scans=scans)
        split(params, in_tmp / f"dedup{scans}", in_tmp / f"split{scans}", in_tmp / f"split{scans}.json")
        placed[scans] = pd.read_csv(in_tmp / f"split{scans}/manifest.csv").set_index("path").split
    public = placed[0].index
    assert placed[30][public].equals(placed[0]) and placed[80][public].equals(placed[0])  # the public split stays
    first = placed[30].index.difference(public)
    assert placed[80][first].equals(placed[30][first])  # 50 more scans of the site move none of its first 30
    site = placed[80].drop(public).value_counts()
    assert set(site.index) == {"train", "val", "test"} and site["train"] > site["test"]  # drawn by the fractions
    with_seed = load_params(REPO / "params.yaml") | {"seed": params["seed"] + 1}
    with_seed["split"] = params["split"]
    split(with_seed, in_tmp / "dedup80", in_tmp / "reseeded", in_tmp / "reseeded.json")
    reseeded = pd.read_csv(in_tmp / "reseeded/manifest.csv").set_index("path").split
    assert not reseeded.drop(public).equals(placed[80].drop(public))  # the seed draws the site's places too


def test_images_are_written_a_chunk_at_a_time_in_manifest_order(in_tmp, monkeypatch):
    monkeypatch.setattr("braintumor.data.split.CHUNK", 7)  # 60 images: 9 chunks, the last one short
    params = load_params(REPO / "params.yaml")
    params["split"]["image_size"], params["split"]["workers"] = 32, 1
    dedup_output(in_tmp / "reps", {})
    split(params, in_tmp / "reps", in_tmp / "split", in_tmp / "split.json")
    for name in ("train", "val", "test"):
        images = split_images(in_tmp / "split", name)
        with np.load(in_tmp / f"split/{name}.npz") as data:
            paths = data["path"]
        assert images.dtype == np.uint8 and images.shape == (len(paths), 32, 32)
        for image, path in zip(images, paths, strict=True):
            assert np.array_equal(image, model_input(path, 32)[..., 0])
