"""Healthy-brain slices from the IXI dataset (BrainDevelopment.org), streamed rather than downloaded.

`IXI-T1.tar` is ~4.5 GB of gzipped NIfTI volumes, one per subject. The tar is read as a stream over HTTP
and the connection is closed after `max_subjects` volumes, so 40 subjects cost ~40 volumes of traffic. A bad
volume is skipped and recorded; a volume over the size caps too, without being read whole into memory.
Each volume is cut by `data/volumes.py` (RAS, `slices_per_volume` slices per plane from the part of the
volume that holds brain, windowed to the head's 0.5-99.5 percentiles) and written as 8-bit PNG.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from PIL import Image

from braintumor.data.volumes import (
    MAX_MEMBER_BYTES,
    PLANE_AXIS,
    brain_slice_indices,
    head_window,
    read_nifti,
    render_slice,
)
from braintumor.errors import SourceError, VolumeTooLarge

log = logging.getLogger(__name__)

SUBJECT = re.compile(r"(IXI\d+)")


@dataclass(frozen=True)
class Slice:
    name: str  # PNG file name
    subject: str
    original: str  # tar URL and member


def fetch_slices(
    urls: list[str],
    dest: Path,
    max_subjects: int,
    slices_per_volume: int,
    planes: list[str],
    timeout_s: int,
    deadline_s: int = 3600,
) -> tuple[list[Slice], list[tuple[str, str, str]]]:
    """Stream each tar in `urls` and write slices of its first `max_subjects` volumes into `dest`.

    Returns the written slices and the (member, reason, detail) of volumes that were not used: unreadable
    (bad gzip, bad NIfTI header, not 3D) or over the size caps. A failed download, or one that outlasts
    `deadline_s` (per tar; `timeout_s` bounds each read), raises `SourceError` naming the URL; the caller
    discards everything written.

    Args:
        urls: IXI tar files to stream.
        dest: folder for the slice PNGs.
        max_subjects: volumes to use per tar.
        slices_per_volume: slices per plane, from the part of the volume that holds brain.
        planes: any of axial, coronal, sagittal.
        timeout_s: bound on each read of a download.
        deadline_s: bound on each tar as a whole.
    """
    dest.mkdir(parents=True, exist_ok=True)
    slices: list[Slice] = []
    skipped: list[tuple[str, str, str]] = []
    for url in urls:
        volumes, deadline = 0, time.monotonic() + deadline_s
        try:
            with requests.get(url, stream=True, timeout=timeout_s) as response:
                response.raise_for_status()
                response.raw.decode_content = True
                with tarfile.open(fileobj=response.raw, mode="r|*") as tar:
                    for member in tar:
                        if volumes >= max_subjects:
                            break
                        _check_deadline(url, deadline, deadline_s)
                        if not member.isfile() or not re.search(r"\.nii(\.gz)?$", member.name):
                            continue
                        volumes += 1
                        original = f"{url}#{member.name}"
                        if member.size > MAX_MEMBER_BYTES:
                            skipped.append(
                                (
                                    original,
                                    "volume_too_large",
                                    f"{member.size} bytes in the tar, over the cap of {MAX_MEMBER_BYTES}",
                                )
                            )
                            continue
                        raw = _read(tar.extractfile(member), url, deadline, deadline_s)
                        try:
                            slices += volume_slices(raw, member.name, original, dest, slices_per_volume, planes)
                        except VolumeTooLarge as err:
                            skipped.append((original, "volume_too_large", str(err)))
                        except Exception as err:  # noqa: BLE001 - any bad volume is skipped, never the whole tar
                            skipped.append((original, "unreadable_volume", f"{type(err).__name__}: {err}"))
        except (requests.RequestException, tarfile.TarError, EOFError, OSError) as err:
            raise SourceError(
                f"fetch.sources.ixi: download of {url} failed ({type(err).__name__}: {err}). Check "
                f"`fetch.sources.ixi.urls`, or switch the source off with `fetch.sources.ixi.enabled: false`."
            ) from err
        log.info("ixi: %d volumes read from %s", volumes, url)
    return slices, skipped


def _check_deadline(url: str, deadline: float, deadline_s: int) -> None:
    if time.monotonic() > deadline:
        raise SourceError(
            f"fetch.sources.ixi: reading {url} took longer than `fetch.sources.ixi.deadline_s` "
            f"({deadline_s} s); raise it, lower `max_subjects`, or switch the source off"
        )


def _read(stream, url: str, deadline: float, deadline_s: int) -> bytes:
    """A tar member's bytes, read in chunks so that the deadline holds during a slow transfer too."""
    chunks = []
    while chunk := stream.read(1 << 16):
        chunks.append(chunk)
        _check_deadline(url, deadline, deadline_s)
    return b"".join(chunks)


def volume_slices(
    raw: bytes, member: str, original: str, dest: Path, slices_per_volume: int, planes: list[str]
) -> list[Slice]:
    """Decode one (optionally gzipped) NIfTI volume and write its chosen slices as PNG, under a folder per
    subject and named after the volume and a digest of where it came from, so that no two volumes collide.

    Args:
        raw: the volume's bytes, gzipped or not.
        member: its name inside the tar.
        original: the URL of the tar, for the file names' digest.
        dest: folder for the PNGs.
        slices_per_volume: slices per plane.
        planes: any of axial, coronal, sagittal.
    """
    data = read_nifti(raw)
    match = SUBJECT.search(Path(member).name)
    subject = match.group(1) if match else Path(member).name.split(".")[0]
    stem = f"{Path(member).name.split('.')[0]}-{hashlib.sha256(original.encode()).hexdigest()[:8]}"
    foreground, lo, hi = head_window(data)
    (dest / subject).mkdir(parents=True, exist_ok=True)
    written = []
    for plane in planes:
        axis = PLANE_AXIS[plane]
        for index in brain_slice_indices(foreground, axis, slices_per_volume):
            name = f"{subject}/{stem}-{plane}-{index:03d}.png"
            Image.fromarray(render_slice(data, axis, index, lo, hi)).save(dest / name)
            written.append(Slice(name, subject, original))
    return written
