"""Healthy-brain slices from the IXI dataset (BrainDevelopment.org), streamed rather than downloaded.

`IXI-T1.tar` is ~4.5 GB of gzipped NIfTI volumes, one per subject. The tar is read as a stream over HTTP
and the connection is closed after `max_subjects` volumes, so 40 subjects cost ~40 volumes of traffic.
Each volume is reoriented to RAS, and `slices_per_volume` slices per plane are taken from the part of
the volume that holds brain, windowed to the 0.5-99.5 percentiles of the head and written as 8-bit PNG.
"""

from __future__ import annotations

import gzip
import logging
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
from PIL import Image

from braintumor.errors import SourceError

log = logging.getLogger(__name__)

PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # axes of a RAS-canonical volume
SUBJECT = re.compile(r"(IXI\d+)")
# A slice is "brain" when its foreground covers at least this share of the best slice's foreground.
MIN_BRAIN_SHARE = 0.5


@dataclass(frozen=True)
class Slice:
    name: str  # PNG file name
    subject: str
    original: str  # tar URL and member


def fetch_slices(
    urls: list[str], dest: Path, max_subjects: int, slices_per_volume: int, planes: list[str], timeout_s: int
) -> tuple[list[Slice], list[tuple[str, str, str]]]:
    """Stream each tar in `urls` and write slices of its first `max_subjects` volumes into `dest`.

    Returns the written slices and the (member, reason, detail) of volumes that could not be read.
    A failed download raises `SourceError` naming the URL; the caller discards everything written.
    """
    dest.mkdir(parents=True, exist_ok=True)
    slices: list[Slice] = []
    skipped: list[tuple[str, str, str]] = []
    for url in urls:
        volumes = 0
        try:
            with requests.get(url, stream=True, timeout=timeout_s) as response:
                response.raise_for_status()
                response.raw.decode_content = True
                with tarfile.open(fileobj=response.raw, mode="r|*") as tar:
                    for member in tar:
                        if volumes >= max_subjects:
                            break
                        if not member.isfile() or not re.search(r"\.nii(\.gz)?$", member.name):
                            continue
                        volumes += 1
                        original = f"{url}#{member.name}"
                        raw = tar.extractfile(member).read()
                        try:
                            slices += volume_slices(raw, member.name, original, dest, slices_per_volume, planes)
                        except (ValueError, OSError, EOFError, nib.filebasedimages.ImageFileError) as err:
                            skipped.append((original, "unreadable_volume", str(err)))
        except (requests.RequestException, tarfile.TarError, EOFError, OSError) as err:
            raise SourceError(
                f"fetch.sources.ixi: download of {url} failed ({type(err).__name__}: {err}). Check "
                f"`fetch.sources.ixi.urls`, or switch the source off with `fetch.sources.ixi.enabled: false`."
            ) from err
        log.info("ixi: %d volumes read from %s", volumes, url)
    return slices, skipped


def volume_slices(
    raw: bytes, member: str, original: str, dest: Path, slices_per_volume: int, planes: list[str]
) -> list[Slice]:
    """Decode one (optionally gzipped) NIfTI volume and write its chosen slices as PNG."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    volume = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(raw))
    data = np.asarray(volume.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    match = SUBJECT.search(Path(member).name)
    subject = match.group(1) if match else Path(member).name.split(".")[0]
    stem = Path(member).name.split(".")[0]
    foreground = data > 0.1 * np.percentile(data, 99)
    if not foreground.any():
        raise ValueError("volume is empty")
    lo, hi = np.percentile(data[foreground], [0.5, 99.5])
    written = []
    for plane in planes:
        axis = PLANE_AXIS[plane]
        for index in brain_slice_indices(foreground, axis, slices_per_volume):
            section = np.take(data, index, axis=axis)
            pixels = np.clip((section - lo) / max(hi - lo, 1e-6), 0, 1) * 255
            name = f"{stem}-{plane}-{index:03d}.png"
            Image.fromarray(np.rot90(pixels).round().astype(np.uint8)).save(dest / name)
            written.append(Slice(name, subject, original))
    return written


def brain_slice_indices(foreground: np.ndarray, axis: int, count: int) -> list[int]:
    """`count` evenly spaced slice indices inside the run of slices that contain most of the brain."""
    other = tuple(a for a in range(3) if a != axis)
    area = foreground.sum(axis=other)
    brain = np.flatnonzero(area >= MIN_BRAIN_SHARE * area.max())
    first, last = int(brain[0]), int(brain[-1])
    positions = np.linspace(first, last, count + 2)[1:-1] if last > first else np.full(count, first)
    return sorted(set(int(round(p)) for p in positions))
