"""A person's decisions, applied by the fetch stage: labels in `labels/overrides.csv` (`fetch.overrides`), and
what modality a file shows in `labels/modality_review.csv` (`fetch.modality_review`, `read_modality_review`).

The pipeline never relabels an image by itself: the review stage ranks suspects, a reviewer decides, and
each decision is a row of this version-controlled file:

    image,label,reason,reviewer
    9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08,exclude,CT slice not MRI,A. Reviewer
    kaggle2018/brain_tumor_dataset/no/15 no.jpg,tumor,mass in the left frontal lobe,A. Reviewer

`image` is a file's sha256 (every copy of those bytes, in any source) or `<source>/<path in the source>` (the
`source` and `original` columns of the review CSV); `label` is a class folder name (tumor, no_tumor, glioma,
meningioma, pituitary) or `exclude`, which lists the image among the skipped files. Every applied row, and
every row that matched no image, is recorded in `artifacts/fetch/overrides_applied.csv`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from braintumor.errors import SourceError
from braintumor.labels import CLASS_FOLDERS, MODALITIES

log = logging.getLogger(__name__)

COLUMNS = ["image", "label", "reason", "reviewer"]
LABELS = CLASS_FOLDERS["local"]  # label name -> (label, subtype)
EXCLUDE = "exclude"
SHA256 = re.compile(r"[0-9a-f]{64}")
REVIEW_COLUMNS = ["image", "sha256", "modality", "reviewer"]  # labels/modality_review.csv
APPLIED_COLUMNS = ["image", "decision", "reason", "reviewer", "path", "label_was", "subtype_was"]


def read_overrides(path: str | Path) -> pd.DataFrame:
    """The decisions of `path`, checked row by row; a missing file means no decisions."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns) != COLUMNS:
        raise SourceError(f"{path}: the header must be `{','.join(COLUMNS)}` (got `{','.join(table.columns)}`)")
    for line, row in enumerate(table.itertuples(index=False), start=2):
        where = f"{path}, line {line}"
        if not (SHA256.fullmatch(row.image) or "/" in row.image):
            raise SourceError(f"{where}: image {row.image!r} is neither a sha256 nor <source>/<path in the source>")
        if row.label not in LABELS and row.label != EXCLUDE:
            raise SourceError(f"{where}: label {row.label!r} must be one of {', '.join(LABELS)} or {EXCLUDE}")
        if not row.reason.strip() or not row.reviewer.strip():
            raise SourceError(f"{where}: give the reason and the reviewer of every decision")
    repeated = table.image[table.image.duplicated()]
    if len(repeated):
        raise SourceError(f"{path}: image {repeated.iloc[0]} is decided twice; keep one row per image")
    return table


def apply_overrides(manifest: pd.DataFrame, overrides: pd.DataFrame) -> tuple[pd.DataFrame, list[dict], pd.DataFrame]:
    """(relabelled manifest without the excluded images, skipped rows for them, the record of every decision)."""
    manifest = manifest.copy()
    keys = manifest.source + "/" + manifest.original
    excluded, record = pd.Series(False, index=manifest.index), []
    for row in overrides.itertuples(index=False):
        hits = manifest.index[(manifest.sha256 == row.image) | (keys == row.image)]
        if not len(hits):
            log.warning("fetch: override for %s matches no fetched image (source off, or a typo?)", row.image)
            record.append({"image": row.image, "decision": row.label, "reason": row.reason, "reviewer": row.reviewer})
        for hit in hits:
            record.append(
                {
                    "image": row.image,
                    "decision": row.label,
                    "reason": row.reason,
                    "reviewer": row.reviewer,
                    "path": manifest.at[hit, "path"],
                    "label_was": manifest.at[hit, "label"],
                    "subtype_was": manifest.at[hit, "subtype"],
                }
            )
            if row.label == EXCLUDE:
                excluded[hit] = True
            else:
                manifest.loc[hit, ["label", "subtype"]] = LABELS[row.label]
    skipped = [
        {
            "source": s,
            "original": o,
            "reason": "excluded_by_review",
            "detail": next(r["reason"] + " (" + r["reviewer"] + ")" for r in record if r.get("path") == p),
        }
        for s, o, p in manifest.loc[excluded, ["source", "original", "path"]].itertuples(index=False)
    ]
    applied = pd.DataFrame(record, columns=APPLIED_COLUMNS).astype({"label_was": "Int64"})
    return manifest[~excluded], skipped, applied


def read_modality_review(path: str | Path) -> dict[str, tuple[str, str]]:
    """sha256 -> (modality, reviewer) of every file a reviewer looked at; a missing file means none. A bad row
    stops fetch before any work, naming its line."""
    path = Path(path)
    if not path.is_file():
        return {}
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns) != REVIEW_COLUMNS:
        raise SourceError(f"{path}: the header must be `{','.join(REVIEW_COLUMNS)}` (got `{','.join(table.columns)}`)")
    reviewed: dict[str, tuple[str, str]] = {}
    for line, row in enumerate(table.itertuples(index=False), start=2):
        where = f"{path}, line {line}"
        if not SHA256.fullmatch(row.sha256):
            raise SourceError(f"{where}: sha256 {row.sha256!r} is not the file's SHA-256 (64 hex digits)")
        if row.modality not in MODALITIES:
            raise SourceError(f"{where}: modality {row.modality!r} must be one of {', '.join(MODALITIES)}")
        if not row.reviewer.strip():
            raise SourceError(f"{where}: name the reviewer")
        if reviewed.get(row.sha256, (row.modality,))[0] != row.modality:
            raise SourceError(f"{where}: {row.image} has the bytes of a file reviewed as {reviewed[row.sha256][0]}")
        reviewed[row.sha256] = (row.modality, row.reviewer)
    return reviewed
