"""Reading what the data stages wrote: their manifests, and the split stage's model-ready arrays.

Training, evaluation and explanation read the splits through `load_split`, so none of them needs the code
of another stage to do so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import numpy as np
import pandas as pd

from braintumor.labels import MULTICLASS_CLASSES, SUBTYPE_CLASS, collection_of


def read_manifest(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"group": str, "subtype": str}, keep_default_na=False)


def representatives(manifest: pd.DataFrame) -> np.ndarray:
    """Which rows stand for their dedup cluster: all, unless dedup kept the clusters' members too
    (`dedup.keep: clusters` writes a `representative` column)."""
    if "representative" not in manifest:
        return np.ones(len(manifest), dtype=bool)
    return manifest["representative"].astype(str).str.lower().eq("true").to_numpy()


IMAGES_SUFFIX = ".x.npy"  # <split>.x.npy: (n, size, size) uint8, one channel


def split_images(split_dir: str | Path, name: str) -> np.ndarray:
    """The split's images as written, memory-mapped: (n, size, size) uint8, one channel."""
    return np.load(Path(split_dir) / f"{name}{IMAGES_SUFFIX}", mmap_mode="r")


class SplitImages:
    """Images of one or more splits, left in their memory-mapped files until a batch is read.

    Indexing (a slice, integer rows or a mask) gives another `SplitImages` without reading anything;
    `np.asarray(images, dtype)` reads the rows, as (n, size, size, 3): the three channels the models take.
    So training can hold a fold's images by reference and read one batch at a time (`train.loader: stream`).
    """

    def __init__(self, files: list[np.ndarray], rows: np.ndarray | None = None):
        self.files = files
        self.offsets = np.cumsum([0] + [len(f) for f in files])
        self.rows = np.arange(self.offsets[-1]) if rows is None else np.asarray(rows, dtype=np.int64)

    @classmethod
    def concatenate(cls, parts: list[SplitImages]) -> SplitImages:
        files, rows, offset = [], [], 0
        for part in parts:
            files += part.files
            rows.append(part.rows + offset)
            offset += part.offsets[-1]
        return cls(files, np.concatenate(rows))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.files[0].shape[1:], 3)

    def __getitem__(self, index) -> SplitImages:
        return SplitImages(self.files, self.rows[index])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        gray = np.empty((len(self.rows), *self.files[0].shape[1:]), dtype=np.uint8)
        for k, images in enumerate(self.files):
            mine = (self.rows >= self.offsets[k]) & (self.rows < self.offsets[k + 1])
            gray[mine] = images[self.rows[mine] - self.offsets[k]]
        x = np.repeat(gray[..., None], 3, axis=-1)
        return x if dtype is None else x.astype(dtype)


class SplitArrays(TypedDict):
    """One split (or the train+val pool) as the model side reads it: one row per image in every array."""

    x: np.ndarray | SplitImages  # uint8 (images, side, side, 3), or read from the split's files when lazy
    y: np.ndarray  # the task's class index
    label: np.ndarray  # 1 tumor, 0 no tumor
    subtype: np.ndarray
    path: np.ndarray
    source: np.ndarray
    collection: np.ndarray  # the source's folders above the class folder (Kaggle 2020's Training, Testing)
    group: np.ndarray  # never straddles two splits or folds
    cluster: np.ndarray
    representative: np.ndarray  # false for the members `dedup.keep: clusters` keeps
    modality: np.ndarray  # mr, ct or other (fetch.modalities keeps only mr by default)


def load_split(split_dir: str | Path, name: str, task: str, lazy: bool = False) -> SplitArrays:
    """Arrays of one split for `task`: x (uint8 images, 3 channels; a `SplitImages` when `lazy`), y (class
    index), plus path/subtype/label, and each image's source, dedup group and cluster, sub-collection, and
    whether it stands for its cluster (`representative`: false for the members `dedup.keep: clusters` keeps)
    and its modality from the split's manifest.

    The multiclass task keeps only images whose tumor type is known."""
    with np.load(Path(split_dir) / f"{name}.npz") as data:
        arrays = {key: data[key] for key in data.files}
    images = SplitImages([split_images(split_dir, name)])
    arrays["x"] = images if lazy else np.asarray(images)
    manifest_path = Path(split_dir) / "manifest.csv"
    manifest = pd.read_csv(manifest_path, keep_default_na=False).set_index("path")
    missing = ~np.isin(arrays["path"].astype(object), manifest.index)
    if missing.any():
        raise ValueError(
            f"{manifest_path}: {missing.sum()} images of {name}.npz are not listed (first: "
            f"{arrays['path'][missing][0]}); the split is inconsistent, re-run `dvc repro split`"
        )
    rows = manifest.loc[arrays["path"].astype(object)]
    arrays["source"], arrays["group"] = rows["source"].to_numpy(), rows["group"].to_numpy()
    arrays["cluster"] = rows["cluster"].to_numpy().astype(np.int64)
    arrays["representative"] = representatives(rows)
    arrays["modality"] = rows["modality"].to_numpy().astype(object)
    arrays["collection"] = np.array(
        [collection_of(source, original) for source, original in zip(rows["source"], rows["original"], strict=True)],
        dtype=object,
    )
    arrays["label"] = arrays.pop("y").astype(np.int64)
    if task == "binary":
        arrays["y"] = arrays["label"]
        return arrays
    known = np.isin(arrays["subtype"], list(SUBTYPE_CLASS))
    arrays = {key: value[known] for key, value in arrays.items()}
    arrays["y"] = np.array([MULTICLASS_CLASSES.index(SUBTYPE_CLASS[s]) for s in arrays["subtype"]], dtype=np.int64)
    return arrays


def load_splits(split_dir: str | Path, names: tuple[str, ...], task: str, lazy: bool = False) -> SplitArrays:
    """Several splits as one set (`load_split` of each, concatenated in order); `lazy` leaves the images in
    their memory-mapped files."""
    parts = [load_split(split_dir, name, task, lazy=lazy) for name in names]
    joined = {key: np.concatenate([part[key] for part in parts]) for key in parts[0] if key != "x"}
    join = SplitImages.concatenate if lazy else np.concatenate
    return {**joined, "x": join([part["x"] for part in parts])}
