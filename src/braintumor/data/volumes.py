"""Brain slices of a 3-D volume: the IXI source, NIfTI files handed to `predict` and `serve`, and DICOM series.

A volume is decompressed under a cap (a gzip bomb is refused, never inflated), reoriented to RAS, and cut in one
plane through the run of slices that holds most of the brain; each slice is windowed to the head's 0.5-99.5
percentiles by `images.window`, the rendering every format shares.
"""

from __future__ import annotations

import zlib

import nibabel as nib
import numpy as np

from braintumor.data.images import window
from braintumor.errors import VolumeTooLarge

PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # axes of a RAS-canonical volume
# A slice is "brain" when its foreground covers at least this share of the best slice's foreground.
MIN_BRAIN_SHARE = 0.5
# Caps per volume: an IXI T1 volume is about 10 MB gzipped and 20 MB decoded; far larger is no single volume.
MAX_MEMBER_BYTES = 256 << 20
MAX_VOLUME_BYTES = 1 << 30
MAX_VOLUME_VOXELS = MAX_VOLUME_BYTES // 4  # decoded as float32


def gunzip(raw: bytes) -> bytes:
    """`raw` decompressed when gzipped, refusing output past MAX_VOLUME_BYTES instead of exhausting memory."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    inflater = zlib.decompressobj(wbits=31)
    data = inflater.decompress(raw, MAX_VOLUME_BYTES + 1)
    if len(data) > MAX_VOLUME_BYTES or inflater.unconsumed_tail:
        raise VolumeTooLarge(f"decompresses to more than the cap of {MAX_VOLUME_BYTES} bytes")
    if not inflater.eof:
        raise ValueError("the gzip stream ends early (truncated)")
    return data


def read_nifti(raw: bytes) -> np.ndarray:
    """The (optionally gzipped) NIfTI volume in `raw` as a RAS-canonical float32 array (the first volume of a 4-D
    file); `VolumeTooLarge` past the caps, ValueError when it is not a 3-D image."""
    volume = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(gunzip(raw)))
    if int(np.prod(volume.shape[:3])) > MAX_VOLUME_VOXELS:
        raise VolumeTooLarge(f"{volume.shape} voxels, over the cap of {MAX_VOLUME_VOXELS}")
    data = np.asarray(volume.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    return data


def head_window(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The head's mask (voxels above a tenth of the 99th percentile) and its 0.5-99.5 percentile window."""
    foreground = data > 0.1 * np.percentile(data, 99)
    if not foreground.any():
        raise ValueError("volume is empty")
    lo, hi = np.percentile(data[foreground], [0.5, 99.5])
    return foreground, float(lo), float(hi)


def brain_run(foreground: np.ndarray, axis: int) -> tuple[int, int]:
    """First and last slice along `axis` whose head area is at least MIN_BRAIN_SHARE of the largest."""
    return brain_run_of(foreground.sum(axis=tuple(a for a in range(3) if a != axis)))


def brain_run_of(area: np.ndarray) -> tuple[int, int]:
    """First and last of a series of slices whose head `area` is at least MIN_BRAIN_SHARE of the largest."""
    brain = np.flatnonzero(np.asarray(area) >= MIN_BRAIN_SHARE * np.max(area))
    return int(brain[0]), int(brain[-1])


def brain_slice_indices(foreground: np.ndarray, axis: int, count: int) -> list[int]:
    """`count` evenly spaced slice indices inside the run of slices that contain most of the brain."""
    first, last = brain_run(foreground, axis)
    positions = np.linspace(first, last, count + 2)[1:-1] if last > first else np.full(count, first)
    return sorted(set(int(round(p)) for p in positions))


def render_slice(data: np.ndarray, axis: int, index: int, lo: float, hi: float) -> np.ndarray:
    """Slice `index` along `axis` of a RAS volume as an 8-bit image, anterior (or superior) up."""
    return window(np.rot90(np.take(data, index, axis=axis)), lo, hi)


def brain_slices(data: np.ndarray, plane: str) -> list[tuple[int, np.ndarray]]:
    """Every slice of the brain run in `plane`, as (index, 8-bit image), in order."""
    foreground, lo, hi = head_window(data)
    axis = PLANE_AXIS[plane]
    first, last = brain_run(foreground, axis)
    return [(index, render_slice(data, axis, index, lo, hi)) for index in range(first, last + 1)]
