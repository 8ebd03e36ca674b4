"""The `fetch` stage: gather images from every enabled source into one folder and one manifest.

Sources (params `fetch.sources`): the two Kaggle datasets through the real `kagglehub.dataset_download`
(offline when `KAGGLEHUB_CACHE` points at a local copy), healthy IXI slices (see `data/ixi.py`) and the user's
own `data/` folder. Every file is decoded once here; unreadable ones are skipped and listed with a reason, and so
is every image whose modality (`data/modality.py`: a reviewer's word, else the pixel check) `fetch.modalities`
does not keep. Duplicates are kept on purpose: `dedup` finds them across sources.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from braintumor import paths
from braintumor.atomic import atomic_path, write_csv, write_json
from braintumor.data import ixi
from braintumor.data.images import check_usable, foreground, open_image
from braintumor.data.listing import printable, walk_files
from braintumor.data.modality import modality_of
from braintumor.data.overrides import EXCLUDE, apply_overrides, read_modality_review, read_overrides
from braintumor.data.scans import is_clinical, kind_suffix, read_scans
from braintumor.data.volumes import brain_run_of
from braintumor.errors import ImageReadError, SourceError
from braintumor.labels import CLASS_FOLDERS, NO_TUMOR, SITE_PREFIX, TUMOR, class_folder
from braintumor.parallel import parallel_map
from braintumor.params import validate_fetch

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "path", "source", "label", "subtype", "group", "sha256", "width", "height", "mode", "original", "modality"
]  # fmt: skip


SCAN_FOLDER = re.compile(r"[0-9a-f]{64}")  # a folder of one scan's slices, named by the scan's digest


@dataclass(frozen=True)
class Candidate:
    """One file found in a source, before it is checked and copied."""

    source: str
    src: str  # where the file is now
    dest: str  # where it goes, relative to the repository root
    label: int
    subtype: str
    group: str
    original: str  # provenance: path inside the source


def kaggle_root(name: str, handle: str) -> Path:
    """Download (or find in the kagglehub cache) one pinned Kaggle dataset version."""
    import kagglehub

    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as err:  # kagglehub raises many types; the user needs the same advice for all
        raise SourceError(
            f"fetch.sources.{name}: kagglehub could not get {handle!r} ({type(err).__name__}: {err}). "
            f"Offline, point KAGGLEHUB_CACHE at a kagglehub cache holding it; "
            f"or switch the source off with `fetch.sources.{name}.enabled: false`."
        ) from err


def find_candidates(
    name: str, root: Path, images_dir: Path, strict_folders: bool
) -> tuple[list[Candidate], list[dict]]:
    """Files under `root`, labelled by the nearest enclosing class folder; every other entry gets a skipped row.

    With `strict_folders` (the user's `data/`), a first-level folder that is neither a class name nor a site's
    folder (`site-<name>/`, holding class folders: what `braintumor feedback accept` writes) is an error, since a
    typo would otherwise drop a whole class. The slices of one scan, in a folder named by the scan's digest,
    share a group (one patient's slices never straddle the split).
    """
    classes = CLASS_FOLDERS[name]
    if strict_folders:
        for child in sorted(c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")):
            site = child.name.startswith(SITE_PREFIX)
            inside = sorted(c for c in child.iterdir() if c.is_dir() and not c.name.startswith(".")) if site else []
            for folder in inside if site else [child]:
                if folder.name not in classes:
                    raise SourceError(
                        f"{printable(folder)}: unknown class folder in the local source; name it one of "
                        f"{', '.join(classes)} (or move it out of {root})"
                    )
    files, problems = walk_files(root)
    candidates, skipped = [], [_skip(name, path, reason, detail) for path, reason, detail in problems]
    for path in files:
        rel = path.relative_to(root)
        if printable(rel) != str(rel):
            skipped.append(_skip(name, path, "file_name_not_utf8", "rename the file: its name is not valid UTF-8"))
            continue
        if any(part.startswith(".") for part in rel.parts):
            skipped.append(_skip(name, path, "hidden_file", "dot-files are not images"))
            continue
        folder = class_folder(rel.parts[:-1], classes)
        if folder is None:
            skipped.append(_skip(name, path, "not_in_class_folder", f"expected under one of {', '.join(classes)}"))
            continue
        label, subtype = classes[rel.parts[folder]]
        dest = images_dir / name / rel
        scan = next((part for part in rel.parts[folder + 1 : -1] if SCAN_FOLDER.fullmatch(part)), None)
        group = f"scan-{scan[:16]}" if scan else ""
        candidates.append(Candidate(name, str(path), str(dest), label, subtype, group, str(rel)))
    return candidates, skipped


def _skip(source: str, path: Path | str, reason: str, detail: str) -> dict:
    return {"source": source, "original": printable(path), "reason": reason, "detail": detail}


def check_and_copy(candidate: Candidate, max_pixels: int) -> dict:
    """Decode one file fully and run every step later stages take on it (grayscale, hashing window, model
    crop); copy its bytes to `dest` when all pass, else report why not. No failure of one file stops the stage."""
    try:
        data = Path(candidate.src).read_bytes()
        img = open_image(candidate.src, data=data, max_pixels=max_pixels)
        modality = modality_of(check_usable(img))
    except ImageReadError as err:
        return _skip(candidate.source, candidate.src, err.reason, err.detail)
    except OSError as err:
        return _skip(candidate.source, candidate.src, "unreadable_file", f"{type(err).__name__}: {err.strerror or err}")
    except Exception as err:  # noqa: BLE001 - pixels that a later step cannot use: recorded, never fatal
        return _skip(candidate.source, candidate.src, "unusable_pixels", f"{type(err).__name__}: {err}")
    dest = Path(candidate.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    width, height = img.size
    return {
        **asdict(candidate),
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": width,
        "height": height,
        "mode": img.mode,
        "modality": modality.modality,
        "modality_evidence": modality.evidence(),
    }


def keep_modalities(
    manifest: pd.DataFrame, reviewed: dict[str, tuple[str, str]], kept: list[str], review_path: str
) -> tuple[pd.DataFrame, list[dict], dict]:
    """(the images whose modality `kept` lists, a skipped row for each other one, what this step did). An image's
    modality is what a reviewer recorded for its bytes, else what the pixel check read from it."""
    decision = manifest.sha256.map(reviewed)
    by_review = decision.notna().to_numpy()
    final = manifest.modality.to_numpy(dtype=object, copy=True)
    final[by_review] = [modality for modality, _ in decision[by_review]]
    dropped = ~np.isin(final, kept)
    skipped = []
    for k in np.flatnonzero(dropped):
        row = manifest.iloc[k]
        if by_review[k]:
            why = f"{final[k].upper()}, reviewed by {decision.iloc[k][1]}"
        else:
            why = (
                f"{final[k].upper()} by its pixels ({row.modality_evidence}); a reviewer who sees brain MR "
                f"records it in {review_path}"
            )
        skipped.append(
            {
                "source": row.source,
                "original": row.original,
                "reason": "not_brain_mr",
                "detail": f"{why}; fetch.modalities keeps {', '.join(kept)}",
            }
        )
    metrics = {
        "kept": kept,
        "images": {modality: int(n) for modality, n in Counter(final).items()},
        "excluded": int(dropped.sum()),
        "reviewed": int(by_review.sum()),
        "check_overruled": int((by_review & (final != manifest.modality.to_numpy())).sum()),
        "excluded_by_check_alone": int((~by_review & dropped).sum()),
    }
    return manifest.assign(modality=final)[~dropped], skipped, metrics


def ixi_candidates(name: str, source: dict, images_dir: Path, staging: Path) -> tuple[list[Candidate], list[dict]]:
    """Healthy slices of the IXI volumes, streamed and sliced into the staging folder's scratch space."""
    scratch = staging / "ixi-slices"
    found, bad = ixi.fetch_slices(
        source["urls"],
        scratch,
        source["max_subjects"],
        source["slices_per_volume"],
        source["planes"],
        source["timeout_s"],
        source["deadline_s"],
    )
    candidates = [
        Candidate(
            name,
            str(scratch / sliced.name),
            str(images_dir / name / sliced.name),
            NO_TUMOR,
            "none",
            sliced.subject,
            sliced.original,
        )
        for sliced in found
    ]
    return candidates, [_skip(name, original, reason, detail) for original, reason, detail in bad]


def local_candidates(name: str, source: dict, images_dir: Path, staging: Path) -> tuple[list[Candidate], list[dict]]:
    """The user's own images under `data/<class>/...` (every folder must name a class), and the brain slices of
    the DICOM series and NIfTI volumes among them (`series_candidates`)."""
    root = Path(source["path"])
    if not root.is_dir():
        raise SourceError(
            f"fetch.sources.{name}: folder {root} does not exist; create it (see README) "
            f"or switch the source off with `fetch.sources.{name}.enabled: false`"
        )
    found, bad = find_candidates(name, root, images_dir, strict_folders=True)
    images = [candidate for candidate in found if not is_clinical(Path(candidate.src))]
    slices, refused = series_candidates(name, [c for c in found if c not in images], images_dir, staging / "series")
    log.info("source %s: %d files under %s, %d series slices", name, len(images), root, len(slices))
    return images + slices, bad + refused


def series_candidates(
    name: str, candidates: list[Candidate], images_dir: Path, scratch: Path
) -> tuple[list[Candidate], list[dict]]:
    """The brain slices of the DICOM series and NIfTI volumes among `candidates`, as PNG files in `scratch`.

    Each class folder is read as one set of files (`scans.read_scans`: a series is grouped by its UID, never by
    its folder); a series' slices carry its patient (else study, else series) as their group, so that the split
    never puts one patient on both sides. What the manifest records of a slice is its class folder, the series'
    salted name and the slice's position: never an export's own folder or file names, which often name the
    patient. Files that cannot be read are skipped as `<class>/#<k>`, k their position in the folder's sorted
    list of such files; non-MR and colour series are skipped whole with the reason.
    """
    by_class: dict[tuple[str, int, str], list[Candidate]] = {}
    for candidate in candidates:
        key = (Path(candidate.original).parts[0], candidate.label, candidate.subtype)
        by_class.setdefault(key, []).append(candidate)
    found, skipped = [], []
    for (folder, label, subtype), members in sorted(by_class.items()):
        members.sort(key=lambda c: c.original)
        entries = [
            (folder, f"{folder}/#{k}{kind_suffix(c.src)}", Path(c.src).read_bytes())
            for k, c in enumerate(members, start=1)
        ]
        series, errors = read_scans(entries, None)
        skipped += [_skip(name, where, *error.split(": ", 1)) for _, where, error in errors]
        for one in series:
            where = f"{folder}/{one.name}"
            if one.refusal is not None:
                reason = "colour_image" if one.refusal.code == "colour" else "not_mr"
                skipped.append(_skip(name, where, reason, one.refusal.text))
                continue
            areas = [int(foreground(pixels).sum()) for pixels in one.slices]
            first, last = brain_run_of(areas) if one.kind == "dicom" else (0, len(one.slices) - 1)
            (scratch / folder).mkdir(parents=True, exist_ok=True)
            for k in range(first, last + 1):
                png = scratch / folder / f"{one.name}-{k:03d}.png"
                Image.fromarray(one.slices[k]).save(png)
                found.append(
                    Candidate(
                        name,
                        str(png),
                        str(images_dir / name / folder / png.name),
                        label,
                        subtype,
                        one.patient or one.study or one.name,
                        f"{where}#{k}",
                    )
                )
    return found, skipped


def kaggle_candidates(name: str, source: dict, images_dir: Path, staging: Path) -> tuple[list[Candidate], list[dict]]:
    """A Kaggle dataset at its pinned version, through kagglehub (its cache, offline)."""
    root = kaggle_root(name, source["handle"])
    found, bad = find_candidates(name, root, images_dir, strict_folders=False)
    log.info("source %s: %d files under %s", name, len(found), root)
    return found, bad


def fetch(
    params: dict, out_dir: str | Path = paths.FETCH_DIR, metrics_path: str | Path = paths.STAGE_METRICS["fetch"]
) -> dict:
    """Run the fetch stage: `out_dir/images/...`, `out_dir/manifest.csv`, `out_dir/skipped.csv` and metrics."""
    config = validate_fetch(params)
    decisions = read_overrides(config["overrides"])  # a bad row stops the stage before any download
    reviewed = read_modality_review(config["modality_review"])
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as staging:
        images_dir = out_dir / "images"  # paths recorded relative to the repository root
        staged_images = staging / "images"
        candidates, skipped = [], []
        for name, source in config["sources"].items():
            if not source["enabled"]:
                log.info("source %s: disabled in params", name)
                continue
            candidates_of = {"ixi": ixi_candidates, "local": local_candidates}.get(name, kaggle_candidates)
            found, bad = candidates_of(name, source, images_dir, staging)
            candidates += found
            skipped += bad
        # Workers write straight into the staging folder; the recorded paths stay the final ones.
        staged = [
            replace(candidate, dest=str(staged_images / Path(candidate.dest).relative_to(images_dir)))
            for candidate in candidates
        ]
        results = parallel_map(
            functools.partial(check_and_copy, max_pixels=config["max_image_pixels"]),
            staged,
            config.get("workers"),
            desc="fetch: check and copy",
        )
        rows = []
        for final, result in zip(candidates, results, strict=True):
            if "reason" in result:
                skipped.append(result)
            else:
                rows.append({**result, "path": final.dest})
        shutil.rmtree(staging / "ixi-slices", ignore_errors=True)
        shutil.rmtree(staging / "series", ignore_errors=True)
        manifest = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, "modality_evidence"])
        manifest, excluded, applied = apply_overrides(manifest, decisions)
        checked = manifest.path
        manifest, not_mr, modalities = keep_modalities(
            manifest, reviewed, config["modalities"], config["modality_review"]
        )
        excluded_paths = applied.path[(applied.decision == EXCLUDE) & applied.path.notna()]  # matched rows only
        gone = [*excluded_paths, *checked[~checked.isin(manifest.path)]]
        for path in gone:  # the copy of an excluded image goes too
            (staged_images / Path(path).relative_to(images_dir)).unlink(missing_ok=True)
        skipped += excluded + not_mr
        manifest = manifest[MANIFEST_COLUMNS]
        write_csv(staging / "overrides_applied.csv", applied)
        skipped_frame = pd.DataFrame(skipped, columns=["source", "original", "reason", "detail"])
        write_csv(staging / "manifest.csv", manifest)
        write_csv(staging / "skipped.csv", skipped_frame)
        metrics = fetch_metrics(manifest, skipped_frame, [n for n, s in config["sources"].items() if s["enabled"]])
        metrics["overrides"] = {
            "relabelled": int(((applied.decision != EXCLUDE) & (applied.path.notna())).sum()),
            "excluded": len(excluded),
            "unmatched": int(applied.path.isna().sum()),
        }
        metrics["modality"] = modalities
    write_json(metrics_path, metrics)
    log.info(
        "fetch: %d images from %d sources, %d files skipped (%s)",
        len(manifest),
        len(metrics["per_source"]),
        len(skipped_frame),
        ", ".join(f"{k}: {v}" for k, v in metrics["skipped_by_reason"].items()) or "none",
    )
    return metrics


def fetch_metrics(manifest: pd.DataFrame, skipped: pd.DataFrame, sources: list[str]) -> dict:
    per_source = {}
    for name in sources:
        mine = manifest[manifest.source == name]
        per_source[name] = {
            "images": len(mine),
            "tumor": int((mine.label == TUMOR).sum()),
            "no_tumor": int((mine.label == NO_TUMOR).sum()),
            "skipped": dict(Counter(skipped.loc[skipped.source == name, "reason"])),
        }
    return {
        "images": len(manifest),
        "skipped": len(skipped),
        "skipped_by_reason": dict(Counter(skipped["reason"])),
        "per_source": per_source,
    }
