"""The `dedup` stage: cluster exact and near duplicates across all sources; keep one image per cluster, or
(`dedup.keep: clusters`) every distinct image of a cluster, grouped by it.

Rules:
- Two images are linked when their pHash AND dHash distances are within `dedup.phash_max_distance` and
  `dedup.dhash_max_distance`; clusters are the connected components of these links (union-find).
- Representative of a cluster, deterministically: the largest image (width × height), then the source
  listed first in `fetch.sources`, then the smallest path.
- A cluster whose members disagree on tumor / no tumor is a label conflict: every member is dropped.
- A kept image takes the cluster's tumor subtype when its members name exactly one (a 2018 "yes" copy of
  a 2020 glioma scan is a glioma); members naming two subtypes make it "unknown" (a subtype conflict).
- A dropped image is an exact duplicate when its decoded pixels equal those of the representative or of
  another member listed before it; otherwise it is a near duplicate.
- `dedup.keep: clusters` keeps the near duplicates too (neighbouring slices of one patient are real training
  signal): each carries its representative's group, so the split and the folds keep the cluster together,
  and `representative: false`, so that the test split and out-of-fold scores still count each cluster once.
  Exact duplicates and label-conflict clusters are dropped as in `representatives` mode.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from braintumor import paths
from braintumor.atomic import atomic_path, write_csv, write_json
from braintumor.data.datasets import read_manifest, representatives
from braintumor.data.hashing import Hashes, Pairs, hamming, hash_images, near_pairs
from braintumor.data.images import center_on_head, load_grayscale, pixel_digest
from braintumor.params import validate_dedup

log = logging.getLogger(__name__)

KNOWN_SUBTYPES = ("glioma", "meningioma", "pituitary")
# The review montage also looks this far beyond the thresholds for the nearest pairs kept apart.
REVIEW_MARGIN = 1.25
DUPLICATE_COLUMNS = [
    "path",
    "source",
    "label",
    "subtype",
    "reason",
    "representative",
    "representative_source",
    "phash_distance",
    "dhash_distance",
    "cluster",
    "detail",
]


def cluster_ids(n: int, pairs: Pairs) -> np.ndarray:
    """Connected components of the duplicate links (a vectorised union-find)."""
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs.i, pairs.j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def choose_representatives(frame: pd.DataFrame, source_order: list[str]) -> pd.Series:
    """Index of each cluster's representative, by the documented rule (largest, source order, path)."""
    ranked = frame.assign(
        _area=-(frame.width * frame.height),
        _priority=frame.source.map({name: rank for rank, name in enumerate(source_order)}),
    ).sort_values(["cluster", "_area", "_priority", "path"])
    return ranked.groupby("cluster").head(1).set_index("cluster")["_row"]


def cluster_subtype(subtypes: pd.Series) -> str:
    known = sorted(set(subtypes) & set(KNOWN_SUBTYPES))
    if len(known) == 1:
        return known[0]
    return "unknown" if known or "unknown" in set(subtypes) else subtypes.iloc[0]


def dedup(
    params: dict,
    fetch_dir: str | Path = paths.FETCH_DIR,
    out_dir: str | Path = paths.DEDUP_DIR,
    metrics_path: str | Path = paths.STAGE_METRICS["dedup"],
    review_path: str | Path = paths.DEDUP_REVIEW,
) -> dict:
    """Run the dedup stage; writes the unique manifest, the duplicates table, hashes, metrics and a montage.

    Args:
        params: the whole params.yaml (its dedup and fetch.sources sections are used).
        fetch_dir: the fetch stage's output (manifest and images).
        out_dir: where the unique manifest, the duplicates table and the hashes go.
        metrics_path: the stage's metrics JSON.
        review_path: the montage of the pairs closest to the thresholds.
    """
    config = validate_dedup(params)
    max_p, max_d = config["phash_max_distance"], config["dhash_max_distance"]
    manifest = read_manifest(Path(fetch_dir) / "manifest.csv")
    hashes, errors = hash_images(manifest.path.tolist(), config["hash_size"], config.get("workers"))
    unreadable = {err.path: err for err in errors}
    readable = np.flatnonzero(~manifest.path.isin(unreadable).to_numpy())

    frame = manifest.iloc[readable].reset_index(drop=True).assign(_row=np.arange(len(readable)))
    good = hashes.take(readable)
    loose = near_pairs(
        good, math.ceil(max_p * REVIEW_MARGIN), math.ceil(max_d * REVIEW_MARGIN), workers=config.get("workers")
    )
    linked = (loose.phash <= max_p) & (loose.dhash <= max_d)
    frame["cluster"] = cluster_ids(len(frame), loose.where(linked))
    frame["cluster_size"] = frame.groupby("cluster")["path"].transform("size")

    conflict = frame.groupby("cluster")["label"].transform("nunique") > 1
    clean = frame[~conflict]
    reps = choose_representatives(clean, list(params["fetch"]["sources"]))
    subtypes = clean.groupby("cluster")["subtype"].agg(cluster_subtype)
    kept = frame.loc[reps.to_numpy()].copy()
    subtype_conflicts = clean.groupby("cluster")["subtype"].agg(lambda s: len(set(s) & set(KNOWN_SUBTYPES)) > 1)
    kept["subtype_conflict"] = kept.cluster.map(subtype_conflicts)
    kept["subtype"] = kept.cluster.map(subtypes)
    kept["group"] = [group or f"cluster-{cluster:05d}" for group, cluster in zip(kept.group, kept.cluster, strict=True)]
    duplicates = duplicate_rows(clean[~clean._row.isin(reps)], clean, reps, good)
    if config["keep"] == "clusters":
        kept, duplicates = with_members(kept, clean, duplicates)

    dropped = pd.concat(
        [
            duplicates,
            conflict_rows(frame[conflict], good),
            unreadable_rows(manifest, unreadable),
        ],
        ignore_index=True,
    )

    out_dir = Path(out_dir)
    kept_hashes = good.take(kept._row.to_numpy())
    kept = kept.drop(columns=["_row"]).reset_index(drop=True)
    with atomic_path(out_dir) as staging:
        staging.mkdir()
        write_csv(staging / "manifest.csv", kept)
        write_csv(staging / "duplicates.csv", dropped[DUPLICATE_COLUMNS])
        np.savez(
            staging / "hashes.npz", phash=kept_hashes.phash, dhash=kept_hashes.dhash, hash_size=config["hash_size"]
        )
    metrics = dedup_metrics(manifest, kept, dropped, config)
    write_json(metrics_path, metrics)
    review_montage(frame, loose, linked, max_p, max_d, config["review_pairs"], review_path)
    log.info(
        "dedup: %d images in, %d out; %d exact and %d near duplicates (%d across sources), "
        "%d dropped in %d label-conflict clusters, %d unreadable",
        metrics["images_in"],
        metrics["images_out"],
        metrics["exact_duplicates"],
        metrics["near_duplicates"],
        metrics["cross_source_duplicates"],
        metrics["label_conflicts"],
        metrics["label_conflict_clusters"],
        metrics["unreadable"],
    )
    return metrics


def with_members(
    kept: pd.DataFrame, clean: pd.DataFrame, duplicates: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`dedup.keep: clusters`: the near duplicates join the kept images as non-representative members of their
    cluster, with its group, subtype and subtype conflict; exact duplicates stay dropped.

    A member's own group (an IXI subject) and its cluster are merged into one group when they differ, so that
    neither a subject nor a cluster can straddle two splits."""
    near = duplicates.reason == "near_duplicate"
    by_path = clean.set_index("path")
    members = by_path.loc[duplicates.path[near]].reset_index()
    rep_of_cluster = kept.set_index("cluster")
    members["subtype"] = members.cluster.map(rep_of_cluster.subtype)
    members["subtype_conflict"] = members.cluster.map(rep_of_cluster.subtype_conflict)
    members["_own_group"] = members.group
    members["group"] = members.cluster.map(rep_of_cluster.group)
    # each representative first, then its members: the representatives keep their `representatives` order
    rows = pd.concat(
        [kept.assign(representative=True, _own_group=kept.group), members.assign(representative=False)],
        ignore_index=True,
    ).sort_values(["cluster", "representative", "path"], ascending=[True, False, True])
    rows["group"] = merged_groups(rows.group.to_numpy(), rows.pop("_own_group").to_numpy())
    return rows.reset_index(drop=True), duplicates[~near]


def merged_groups(cluster_group: np.ndarray, own_group: np.ndarray) -> np.ndarray:
    """One group name per connected set of rows that share a cluster's group or an own (non-empty) group."""
    names, index = np.unique(np.concatenate([cluster_group, own_group[own_group != ""]]), return_inverse=True)
    rows = len(cluster_group)
    links = np.flatnonzero(own_group != "")
    graph = coo_matrix(
        (np.ones(rows + len(links), dtype=np.int8), (np.r_[np.arange(rows), links], rows + index)),
        shape=(rows + len(names), rows + len(names)),
    )
    component_of_row = connected_components(graph, directed=False)[1][:rows]
    name_of = {}
    for row, component in enumerate(component_of_row):  # each component is named after its first row's group
        name_of.setdefault(component, cluster_group[row])
    return np.array([name_of[component] for component in component_of_row], dtype=object)


def pixel_keys(frame: pd.DataFrame, hashes: Hashes) -> pd.Series:
    """A key equal for images with identical decoded pixels: the file's sha256, or the pixel digest for the
    few images whose hashes equal another file's in their cluster (identical pixels need identical hashes)."""
    words = pd.Series(
        [both.tobytes() for both in np.hstack([hashes.phash, hashes.dhash])[frame._row]], index=frame.index
    )
    same_hash = frame.groupby([frame.cluster, words])["sha256"].transform("nunique") > 1
    keys = frame.sha256.copy()
    keys[same_hash] = [pixel_digest(path) for path in frame.path[same_hash]]
    return keys


def duplicate_rows(members: pd.DataFrame, frame: pd.DataFrame, reps: pd.Series, hashes: Hashes) -> pd.DataFrame:
    """Rows for images dropped in favour of their cluster's representative, with distances and reason.

    Within a cluster, images with the pixels of the representative or of an image listed before them are
    exact duplicates; the first image of each other set of identical pixels is a near duplicate.
    """
    keys = pixel_keys(frame, hashes)
    is_rep = frame._row.isin(reps)
    order = frame.assign(_key=keys, _rep=~is_rep).sort_values(["cluster", "_rep", "path"])
    exact_rows = set(order._row[order.duplicated(["cluster", "_key"])])
    rep_rows = reps.loc[members.cluster].to_numpy()
    rows = members._row.to_numpy()
    rep = frame.loc[rep_rows]
    exact = members._row.isin(exact_rows).to_numpy()
    return pd.DataFrame(
        {
            "path": members.path.to_numpy(),
            "source": members.source.to_numpy(),
            "label": members.label.to_numpy(),
            "subtype": members.subtype.to_numpy(),
            "reason": np.where(exact, "exact_duplicate", "near_duplicate"),
            "representative": rep.path.to_numpy(),
            "representative_source": rep.source.to_numpy(),
            "phash_distance": hamming(hashes.phash[rows], hashes.phash[rep_rows]),
            "dhash_distance": hamming(hashes.dhash[rows], hashes.dhash[rep_rows]),
            "cluster": members.cluster.to_numpy(),
            "detail": np.where(members.sha256.to_numpy() == rep.sha256.to_numpy(), "same file as representative", ""),
        }
    )


def conflict_rows(members: pd.DataFrame, hashes: Hashes) -> pd.DataFrame:
    """Rows for every member of a label-conflict cluster; the 'representative' is the first member by path."""
    first = members.sort_values("path").groupby("cluster")["_row"].first()
    ref = first.loc[members.cluster].to_numpy()
    rows = members._row.to_numpy()
    labels = members.groupby("cluster")["label"].agg(lambda s: "/".join(str(v) for v in sorted(set(s))))
    return pd.DataFrame(
        {
            "path": members.path.to_numpy(),
            "source": members.source.to_numpy(),
            "label": members.label.to_numpy(),
            "subtype": members.subtype.to_numpy(),
            "reason": "label_conflict",
            "representative": "",
            "representative_source": "",
            "phash_distance": hamming(hashes.phash[rows], hashes.phash[ref]),
            "dhash_distance": hamming(hashes.dhash[rows], hashes.dhash[ref]),
            "cluster": members.cluster.to_numpy(),
            "detail": [
                f"cluster of {size} with labels {labels[cluster]}"
                for size, cluster in zip(members.cluster_size, members.cluster, strict=True)
            ],
        }
    )


def unreadable_rows(manifest: pd.DataFrame, unreadable: dict) -> pd.DataFrame:
    """Rows for the images that could not be hashed, with the reader's reason (`unreadable`: path -> error)."""
    rows = manifest.loc[manifest.path.isin(unreadable), ["path", "source", "label", "subtype"]]
    return pd.DataFrame(
        {
            **{column: rows[column].to_numpy() for column in rows.columns},
            "reason": "unreadable",
            "detail": [unreadable[path].detail for path in rows.path],
        },
        columns=DUPLICATE_COLUMNS,
    )


def dedup_metrics(manifest: pd.DataFrame, kept: pd.DataFrame, dropped: pd.DataFrame, config: dict) -> dict:
    reasons = dropped.reason.value_counts()
    duplicates = dropped[dropped.reason.isin(["exact_duplicate", "near_duplicate"])]
    per_source = {}
    for name in manifest.source.unique():
        mine = dropped[dropped.source == name]
        per_source[name] = {
            "images_in": int((manifest.source == name).sum()),
            "images_out": int((kept.source == name).sum()),
            **{
                reason: int((mine.reason == reason).sum())
                for reason in ("exact_duplicate", "near_duplicate", "label_conflict", "unreadable")
            },
        }
    conflicts = dropped[dropped.reason == "label_conflict"]
    return {
        "images_in": len(manifest),
        "exact_duplicates": int(reasons.get("exact_duplicate", 0)),
        "near_duplicates": int(reasons.get("near_duplicate", 0)),
        "cross_source_duplicates": int((duplicates.source != duplicates.representative_source).sum()),
        "label_conflicts": len(conflicts),
        "label_conflict_clusters": int(conflicts.cluster.nunique()),
        "subtype_conflicts": int(kept.subtype_conflict.sum()),
        "unreadable": int(reasons.get("unreadable", 0)),
        "images_out": len(kept),
        "clusters_out": int(kept.cluster.nunique()),
        "near_duplicates_kept": int((~representatives(kept)).sum()),
        "clusters_with_duplicates": int((kept.drop_duplicates("cluster").cluster_size > 1).sum()),
        "thresholds": {
            "hash_size": config["hash_size"],
            "phash": config["phash_max_distance"],
            "dhash": config["dhash_max_distance"],
        },
        "per_source": per_source,
    }


def review_montage(
    frame: pd.DataFrame, loose: Pairs, linked: np.ndarray, max_p: int, max_d: int, count: int, path: str | Path
) -> None:
    """Plot the merged pairs closest to the thresholds (top) and the nearest pairs kept apart (bottom).

    Identical pairs are left out: they need no review. Closeness is max(pHash/limit, dHash/limit).

    Args:
        frame: the readable rows of the fetched manifest, in hash order.
        loose: every pair within REVIEW_MARGIN times the limits, with its pHash and dHash distances.
        linked: for each loose pair, whether dedup merged it.
        max_p: the pHash limit.
        max_d: the dHash limit.
        count: pairs per row.
        path: the PNG to write.
    """
    closeness = np.maximum(loose.phash / max(max_p, 1), loose.dhash / max(max_d, 1))
    merged = np.flatnonzero(linked & (closeness > 0))
    merged = merged[np.argsort(-closeness[merged], kind="stable")][:count]
    apart = np.flatnonzero(~linked)
    apart = apart[np.argsort(closeness[apart], kind="stable")][:count]
    columns = max(len(merged), len(apart), 1)
    fig, axes = plt.subplots(4, columns, figsize=(1.6 * columns, 7.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for block, (picks, title) in enumerate([(merged, "merged"), (apart, "kept apart")]):
        for col, k in enumerate(picks):
            for offset, row in enumerate((loose.i[k], loose.j[k])):
                ax = axes[2 * block + offset, col]
                gray = load_grayscale(frame.path.iloc[row], draft_size=128, max_pixels=None)  # fetch checked sizes
                ax.imshow(center_on_head(gray), cmap="gray")
                ax.set_title(f"{frame.source.iloc[row]} y={frame.label.iloc[row]}", fontsize=6)
            axes[2 * block, col].set_title(
                f"{title}: p={loose.phash[k]} d={loose.dhash[k]}\n{frame.source.iloc[loose.i[k]]} "
                f"y={frame.label.iloc[loose.i[k]]}",
                fontsize=6,
            )
    fig.suptitle(
        f"dedup review: thresholds pHash<={max_p}, dHash<={max_d}; rows 1-2 merged pairs nearest the "
        f"limit, rows 3-4 closest pairs kept apart",
        fontsize=7,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
