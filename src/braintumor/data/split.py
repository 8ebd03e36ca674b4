"""The `split` stage: a seeded, label-stratified, group-aware train/val/test split and model-ready arrays.

Groups (a dedup cluster, or an IXI subject whose slices are separate images) never straddle two splits. The
public sources' groups are drawn together; the user's `data/` is placed a group at a time (`placement.py`), so
that a site's new verdicts never move an image already placed.
With `dedup.keep: clusters` the splits are assigned from the clusters' representatives alone, exactly as
without their members, and each member follows its group: so the test split is the same either way. The test
arrays hold the representatives only (a cluster is scored once); train and val hold every member.
Each split's images are prepared once (grayscale, cropped to the head, padded square, resized to
`split.image_size`, uint8) into `artifacts/split/<split>.x.npy`, one channel (the model's three are copies
of it), written a chunk at a time and memory-mapped by its readers; labels, subtypes and paths go to
`<split>.npz`. `metrics/split.json` reports a computed
leakage check: validation and test images with a near duplicate (by the dedup criterion) in train.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from braintumor import paths
from braintumor.atomic import atomic_path, write_csv, write_json
from braintumor.data.datasets import IMAGES_SUFFIX, read_manifest, representatives
from braintumor.data.hashing import Hashes, near_pairs
from braintumor.data.images import model_input
from braintumor.data.placement import in_fixed_group, splits_of_groups
from braintumor.parallel import parallel_map
from braintumor.params import SPLIT_NAMES, validate_dedup, validate_split

log = logging.getLogger(__name__)

CHUNK = 4096  # images prepared at a time (about 38 MB at 96 px)


def assign_splits(frame: pd.DataFrame, fractions: dict[str, float], seed: int) -> pd.Series:
    """Split name per row. Within each label, groups in seeded random order go to the split furthest below
    its share of that label's images, so every split gets each class in proportion and no group is cut."""
    rng = np.random.default_rng(seed)
    assignment: dict[tuple[int, str], str] = {}
    for label in sorted(frame.label.unique()):
        sizes = frame[frame.label == label].groupby("group").size()
        order = sizes.index.to_numpy()[rng.permutation(len(sizes))]
        total = sizes.sum()
        filled = dict.fromkeys(SPLIT_NAMES, 0)
        for group in order:
            target = max(SPLIT_NAMES, key=lambda name: fractions[name] * total - filled[name])
            filled[target] += sizes[group]
            assignment[(label, group)] = target
    return pd.Series([assignment[key] for key in zip(frame.label, frame.group, strict=True)], index=frame.index)


def write_images(path: Path, files: list[str], size: int, workers: int | None, name: str) -> None:
    """Prepare `files` into one (n, size, size) uint8 .npy at `path`, a chunk at a time: the stage holds one
    chunk of images, never the split, so its memory does not grow with the number of images. (Plain file
    writes, not a memory map: the written pages then stay in the page cache, not in the stage's memory.)

    Args:
        path: the .npy to write.
        files: image files, in the split's order.
        size: side of the square arrays.
        workers: preparing processes; None = all cores.
        name: the split's name, for the progress bar.
    """
    prepare = functools.partial(model_channel, size=size)
    with open(path, "wb") as out:
        np.lib.format.write_array_header_1_0(
            out,
            {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                "fortran_order": False,
                "shape": (len(files), size, size),
            },
        )
        for start in range(0, len(files), CHUNK):
            chunk = files[start : start + CHUNK]
            desc = f"split: {name} images {start + 1}-{start + len(chunk)} of {len(files)}"
            images = parallel_map(prepare, chunk, workers, desc=desc)
            out.write(np.stack(images).astype(np.uint8).tobytes() if images else b"")


def model_channel(path: str, size: int) -> np.ndarray:
    """The one channel of an image's model input (its three channels are identical)."""
    return model_input(path, size=size, max_pixels=None)[..., 0]  # fetch refused the images over its limit


def leakage(hashes: Hashes, split: pd.Series, max_p: int, max_d: int) -> dict[str, int]:
    """Validation and test images that have a near duplicate in train, by the dedup thresholds."""
    train = hashes.take(np.flatnonzero(split == "train"))
    counts = {}
    for name in ("val", "test"):
        pairs = near_pairs(hashes.take(np.flatnonzero(split == name)), max_p, max_d, base=train)
        counts[f"{name}_in_train"] = int(np.unique(pairs.i).size)
    return counts


def split(
    params: dict,
    dedup_dir: str | Path = paths.DEDUP_DIR,
    out_dir: str | Path = paths.SPLIT_DIR,
    metrics_path: str | Path = paths.STAGE_METRICS["split"],
) -> dict:
    """Run the split stage: `out_dir/manifest.csv`, `out_dir/{train,val,test}.npz` and `metrics_path`."""
    config = validate_split(params)
    dedup_config = validate_dedup(params)
    dedup_dir = Path(dedup_dir)
    frame = read_manifest(dedup_dir / "manifest.csv")
    with np.load(dedup_dir / "hashes.npz") as saved:
        hashes = Hashes(saved["phash"], saved["dhash"])
    if len(hashes) != len(frame):
        raise ValueError(f"{dedup_dir}: hashes.npz and manifest.csv disagree in length; re-run `dvc repro dedup`")

    representative = pd.Series(representatives(frame), index=frame.index)
    fixed = in_fixed_group(frame.source.to_numpy(), frame.group.to_numpy())
    reps = frame[representative & fixed]
    split_of = dict(zip(reps.group, assign_splits(reps, config["fractions"], params["seed"]), strict=True))
    growing = frame[~fixed]
    split_of |= splits_of_groups(growing.path.to_numpy(), growing.group.to_numpy(), config["fractions"], params["seed"])
    frame["split"] = frame.group.map(split_of)
    straddling = int((frame.groupby("group")["split"].nunique() > 1).sum())
    if straddling or frame.split.isna().any():  # cannot happen by construction; leakage is the costliest bug here
        raise AssertionError(f"{straddling} groups straddle two splits, {frame.split.isna().sum()} rows have none")
    scored = frame.split.where(representative | (frame.split == "train"), "unscored")
    checks = leakage(hashes, scored, dedup_config["phash_max_distance"], dedup_config["dhash_max_distance"])

    size = config["image_size"]  # (fetch refused the images over its pixel limit: none is applied again)
    stored = frame[representative | (frame.split != "test")]  # a test cluster's members are never scored
    with atomic_path(out_dir) as staging:
        staging.mkdir()
        write_csv(staging / "manifest.csv", frame)
        for name in SPLIT_NAMES:
            part = stored[stored.split == name]
            write_images(staging / f"{name}{IMAGES_SUFFIX}", part.path.tolist(), size, config.get("workers"), name)
            np.savez(
                staging / f"{name}.npz",
                y=part.label.to_numpy().astype(np.int8),
                subtype=part.subtype.to_numpy().astype(str),
                path=part.path.to_numpy().astype(str),
            )
    metrics = {
        "images": len(stored),
        "image_size": size,
        **(
            {"cluster_members": int((~representative).sum()), "test_members_unused": len(frame) - len(stored)}
            if "representative" in frame
            else {}
        ),
        "leakage": checks,
        "groups_in_two_splits": straddling,
        "per_split": {
            name: {
                "images": int((stored.split == name).sum()),
                "tumor": int(((stored.split == name) & (stored.label == 1)).sum()),
                "no_tumor": int(((stored.split == name) & (stored.label == 0)).sum()),
                "by_subtype": stored[stored.split == name].subtype.value_counts().sort_index().to_dict(),
                "by_source": stored[stored.split == name].source.value_counts().sort_index().to_dict(),
            }
            for name in SPLIT_NAMES
        },
    }
    write_json(metrics_path, metrics)
    log.info(
        "split: %s; leakage val/test in train: %d/%d",
        ", ".join(f"{n} {metrics['per_split'][n]['images']}" for n in SPLIT_NAMES),
        checks["val_in_train"],
        checks["test_in_train"],
    )
    return metrics
