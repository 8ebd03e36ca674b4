"""The dedup stage: exact and near duplicates across sources, label conflicts, every input kept or listed."""

import copy
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from braintumor.data.dedup import dedup, merged_groups
from braintumor.data.fetch import fetch
from braintumor.data.hashing import hash_images
from braintumor.params import load_params

from conftest import KAGGLE2018, KAGGLE2020, REPO, brain_image, kaggle_cache, save


def jpeg_reencoded(path, quality=70):
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def fetch_sources(in_tmp: Path, monkeypatch) -> dict:
    """Three sources with planted duplicates, fetched for real into `in_tmp` (the working folder): the params."""
    big = {i: save(in_tmp / f"src/{i}.png", brain_image(i, 256)) for i in range(7)}
    small_s0 = in_tmp / "src/small0.jpg"
    Image.open(big[0]).resize((128, 128)).convert("RGB").save(small_s0, quality=90)
    cache = in_tmp / "cache"
    kaggle_cache(
        cache,
        KAGGLE2020,
        {
            "Training/glioma_tumor/s0.png": big[0],
            "Training/no_tumor/s1.png": big[1],
            "Testing/meningioma_tumor/s2.png": big[2],
        },
    )
    kaggle_cache(
        cache, KAGGLE2018, {"yes/Y0.jpg": small_s0, "brain_tumor_dataset/yes/Y0.jpg": small_s0, "no/N3.png": big[3]}
    )
    save(in_tmp / "data/tumor/s4.png", brain_image(4, 256))
    save(in_tmp / "data/no_tumor/s4-again.png", brain_image(4, 256))  # same scan, other label: conflict
    save(in_tmp / "data/glioma/s6.png", brain_image(6, 256))
    (in_tmp / "data/meningioma").mkdir()
    (in_tmp / "data/meningioma/s6.jpg").write_bytes(jpeg_reencoded(big[6]))  # same scan, other subtype
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["fetch"]["workers"] = params["dedup"]["workers"] = 1
    fetch(params)
    return params


@pytest.fixture
def fetched(in_tmp, monkeypatch):
    """The planted sources fetched in this test's folder, for tests that change params or run dedup twice."""
    return fetch_sources(in_tmp, monkeypatch)


@pytest.fixture(scope="module")
def deduped(tmp_path_factory):
    """The planted sources fetched and deduplicated once, for the tests that only read the outputs:
    (the folder, dedup's metrics)."""
    root = tmp_path_factory.mktemp("deduped")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        metrics = dedup(fetch_sources(root, patch))
    return root, metrics


def test_each_cluster_keeps_its_largest_image_with_its_known_subtype(deduped):
    root, _ = deduped
    kept = pd.read_csv(root / "artifacts/dedup/manifest.csv", keep_default_na=False)
    names = dict(zip(kept.path.str.rsplit("/", n=1).str[-1], kept.subtype, strict=True))
    # s0: the 256 px 2020 scan beats its 128 px 2018 copies and passes on its subtype
    assert names == {
        "s0.png": "glioma",
        "s1.png": "none",
        "s2.png": "meningioma",
        "N3.png": "none",
        "s6.png": "unknown",
    }
    assert kept.loc[kept.path.str.endswith("s0.png"), "source"].item() == "kaggle2020"
    assert kept.group.is_unique


def test_copies_and_label_conflicts_are_listed_with_their_reason(deduped):
    root, _ = deduped
    dropped = pd.read_csv(root / "artifacts/dedup/duplicates.csv", keep_default_na=False)
    reasons = sorted(zip(dropped.path.str.split("/images/").str[-1], dropped.reason, strict=True))
    assert reasons == [
        # of two identical copies, the first by path is the near duplicate of s0, the second an exact one
        ("kaggle2018/brain_tumor_dataset/yes/Y0.jpg", "near_duplicate"),
        ("kaggle2018/yes/Y0.jpg", "exact_duplicate"),
        ("local/meningioma/s6.jpg", "near_duplicate"),
        ("local/no_tumor/s4-again.png", "label_conflict"),
        ("local/tumor/s4.png", "label_conflict"),
    ]
    copies = dropped[dropped.source == "kaggle2018"]
    assert copies.representative.str.endswith("s0.png").all() and (copies.phash_distance > 0).all()


def test_metrics_count_what_was_kept_and_dropped(deduped):
    root, metrics = deduped
    assert metrics == json.loads((root / "metrics/dedup.json").read_text())
    counts = (
        "images_in",
        "exact_duplicates",
        "near_duplicates",
        "cross_source_duplicates",
        "label_conflicts",
        "label_conflict_clusters",
        "subtype_conflicts",
        "images_out",
    )
    assert {key: metrics[key] for key in counts} == {
        "images_in": 10,
        "exact_duplicates": 1,
        "near_duplicates": 2,
        "cross_source_duplicates": 2,
        "label_conflicts": 2,
        "label_conflict_clusters": 1,
        "subtype_conflicts": 1,
        "images_out": 5,
    }
    assert metrics["per_source"]["kaggle2018"] == {
        "images_in": 3,
        "images_out": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
        "label_conflict": 0,
        "unreadable": 0,
    }


def test_the_kept_images_hashes_and_the_review_plot_are_written(deduped, monkeypatch):
    monkeypatch.chdir(deduped[0])
    kept = pd.read_csv("artifacts/dedup/manifest.csv", keep_default_na=False)
    hashes = np.load("artifacts/dedup/hashes.npz")  # the kept images' own hashes, in the manifest's order
    again, _ = hash_images(kept.path.tolist(), int(hashes["hash_size"]), workers=1)
    assert np.array_equal(hashes["phash"], again.phash) and np.array_equal(hashes["dhash"], again.dhash)
    Image.open("plots/dedup_review.png").verify()  # a readable PNG


def test_every_input_is_kept_or_listed(in_tmp, fetched):
    fetched["dedup"]["phash_max_distance"] = 0  # only identical pictures merge now
    fetched["dedup"]["dhash_max_distance"] = 0
    metrics = dedup(fetched)
    kept = pd.read_csv("artifacts/dedup/manifest.csv")
    dropped = pd.read_csv("artifacts/dedup/duplicates.csv")
    fetched_paths = set(pd.read_csv("artifacts/fetch/manifest.csv").path)
    assert set(kept.path) | set(dropped.path) == fetched_paths and not set(kept.path) & set(dropped.path)
    assert metrics["near_duplicates"] == 0 and metrics["exact_duplicates"] == 1


def test_deterministic(in_tmp, fetched):
    dedup(fetched)
    first = (
        (in_tmp / "artifacts/dedup/manifest.csv").read_bytes(),
        (in_tmp / "artifacts/dedup/duplicates.csv").read_bytes(),
    )
    dedup(fetched)
    assert first == (
        (in_tmp / "artifacts/dedup/manifest.csv").read_bytes(),
        (in_tmp / "artifacts/dedup/duplicates.csv").read_bytes(),
    )


def test_keep_clusters_keeps_near_duplicates_as_members_of_their_cluster(in_tmp, fetched):
    reps = dedup(fetched)
    representatives = pd.read_csv("artifacts/dedup/manifest.csv", keep_default_na=False)
    fetched["dedup"]["keep"] = "clusters"
    metrics = dedup(fetched)

    kept = pd.read_csv("artifacts/dedup/manifest.csv", keep_default_na=False)
    name = kept.path.str.split("/images/").str[-1]
    members = kept[~kept.representative]
    # the two near duplicates stay; the exact copy of Y0 and the label-conflict cluster are still dropped
    assert sorted(name[~kept.representative]) == [
        "kaggle2018/brain_tumor_dataset/yes/Y0.jpg",
        "local/meningioma/s6.jpg",
    ]
    assert kept[kept.representative].drop(columns="representative").reset_index(drop=True).equals(representatives)
    rep_of = kept[kept.representative].set_index("cluster")
    for column in ("group", "subtype", "subtype_conflict"):  # a member takes its cluster's
        assert (members[column].to_numpy() == rep_of.loc[members.cluster, column].to_numpy()).all()
    dropped = pd.read_csv("artifacts/dedup/duplicates.csv", keep_default_na=False)
    assert sorted(dropped.reason) == ["exact_duplicate", "label_conflict", "label_conflict"]
    assert metrics["images_out"] == 7 and metrics["clusters_out"] == reps["images_out"] == 5
    assert metrics["near_duplicates_kept"] == 2 and metrics["near_duplicates"] == 0
    assert len(np.load("artifacts/dedup/hashes.npz")["phash"]) == len(kept)  # one row per kept image


def test_a_cluster_and_a_subject_it_touches_become_one_group():
    # rows 0-1: cluster A (its group named after it); row 2: cluster B, of subject IXI7 like row 1; row 3 alone
    cluster_group = np.array(["cluster-A", "cluster-A", "cluster-B", "cluster-C"], dtype=object)
    own_group = np.array(["cluster-A", "IXI7", "IXI7", ""], dtype=object)
    assert merged_groups(cluster_group, own_group).tolist() == ["cluster-A", "cluster-A", "cluster-A", "cluster-C"]
