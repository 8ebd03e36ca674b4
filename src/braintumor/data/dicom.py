"""DICOM objects as the model sees them: 8-bit frames, and where each frame lies in its series.

The stored values go through the modality LUT (RescaleSlope/Intercept) first, then the VOI LUT or the first
window (WindowCenter/Width, DICOM PS3.3 C.11.2.1.2), else the head's 0.5-99.5 percentile window as for NIfTI
volumes; MONOCHROME1 is inverted after that (pydicom leaves it to the caller). Colour objects (RGB, YBR,
palette) are converted to RGB and then to grayscale, with their colourfulness kept for the caller to judge.
Compressed transfer syntaxes decode through pydicom's plugins (Pillow for JPEG and JPEG 2000, pyjpegls for
JPEG-LS, pylibjpeg-openjpeg for HTJ2K, pydicom itself for RLE); one with no plugin installed (JPEG Lossless,
whose only plugin is GPL) is refused as `unsupported_transfer_syntax`, naming it. Nothing identifying is read
into what this returns: UIDs only, which callers hash before showing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from braintumor.data.images import colourfulness, to_grayscale, window
from braintumor.data.volumes import MAX_VOLUME_VOXELS, head_window
from braintumor.errors import ImageReadError

PREAMBLE = 128  # a DICOM file's "DICM" marker follows a 128-byte preamble
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420", "PALETTE COLOR")


@contextlib.contextmanager
def quiet_pydicom():
    """pydicom warns and logs about every non-conformant value it reads, and logs a traceback for each codec
    plugin that fails before it raises; the caller gets the error instead, with the file's name."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: the "DICM" marker after the preamble."""
    return data[PREAMBLE : PREAMBLE + 4] == b"DICM"


@dataclass
class DicomImage:
    """One DICOM object's frames (8-bit), with what grouping and ordering them into a series needs."""

    frames: list[np.ndarray]
    modality: str  # "" when the object does not say
    series_uid: str  # "" when the object does not say
    study_uid: str
    patient_id: str  # in memory only: `scans` hashes it into a group that keeps a patient in one split
    positions: list[float | None]  # each frame's position along the slice normal (mm), when the object gives it
    instance: int | None  # InstanceNumber
    colourfulness: float  # of the colour object before grayscale; 0 for a monochrome one


def read_dicom(name: str, data: bytes, max_pixels: int | None) -> DicomImage:
    """Decode one DICOM file's bytes; `ImageReadError` with a reason for anything that is not a readable image.

    Args:
        name: what error messages call the file.
        data: its bytes.
        max_pixels: the most pixels a frame may have (None: no limit); the whole object may hold at most
            `volumes.MAX_VOLUME_VOXELS`, checked from its header before anything is decoded.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    with quiet_pydicom():
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
            raise ImageReadError(name, "not_dicom", f"not a readable DICOM file ({type(err).__name__}: {err})") from err
        try:
            frames, rendered, colour = render(name, dataset, max_pixels)
            instance = str(dataset.get("InstanceNumber", "")).strip()
            positions = frame_positions(dataset, frames)
        except ImageReadError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
            raise ImageReadError(name, "bad_header", f"{type(err).__name__}: {err}") from err
    return DicomImage(
        frames=rendered,
        modality=str(dataset.get("Modality", "")).strip().upper(),
        series_uid=str(dataset.get("SeriesInstanceUID", "")),
        study_uid=str(dataset.get("StudyInstanceUID", "")),
        patient_id=str(dataset.get("PatientID", "")),
        positions=positions,
        instance=int(instance) if instance.isdigit() else None,
        colourfulness=colour,
    )


def render(name: str, dataset, max_pixels: int | None) -> tuple[int, list[np.ndarray], float]:
    """(frames, their 8-bit renderings, colourfulness) of a dataset; size limits checked from its header."""
    if "PixelData" not in dataset:
        kind = getattr(dataset.get("SOPClassUID"), "name", None) or dataset.get("Modality") or "unknown kind"
        raise ImageReadError(name, "no_pixel_data", f"a DICOM object without an image ({kind}); nothing to read")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if max_pixels is not None and rows * columns > max_pixels:
        raise ImageReadError(name, "too_large", f"{columns} x {rows} pixels, over the limit of {max_pixels}")
    if rows * columns * frames > MAX_VOLUME_VOXELS:
        raise ImageReadError(name, "too_large", f"{frames} frames of {columns} x {rows}, over {MAX_VOLUME_VOXELS}")
    pixels = decode(name, dataset)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    stack = pixels if frames > 1 else pixels[None]
    if photometric in COLOUR:
        rendered, colour = colour_frames(stack, dataset, photometric)
    else:
        rendered, colour = monochrome_frames(stack, dataset, photometric == "MONOCHROME1"), 0.0
    return len(rendered), rendered, colour


def decode(name: str, dataset) -> np.ndarray:
    """The stored pixel values (colour converted to RGB); refusals name the transfer syntax or the damage."""
    from pydicom.pixels.decoders.base import get_decoder

    syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise ImageReadError(
                name,
                "unsupported_transfer_syntax",
                f"{syntax.name} ({syntax}); no decoder for it is installed: re-export the series uncompressed, "
                "as JPEG 2000 or as JPEG-LS",
            )
    try:
        return np.asarray(dataset.pixel_array)
    except Exception as err:  # noqa: BLE001 - truncated data, a broken codestream, inconsistent header values
        reason = "unsupported_transfer_syntax" if "does not support" in str(err) else "truncated_or_corrupt"
        raise ImageReadError(name, reason, f"its pixel data cannot be decoded ({type(err).__name__}: {err})") from err


def monochrome_frames(stack: np.ndarray, dataset, inverted: bool) -> list[np.ndarray]:
    """Modality LUT, then VOI LUT or window and MONOCHROME1 inversion, or else the percentile window."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    if "ModalityLUTSequence" in dataset:
        values = np.asarray(apply_modality_lut(stack, dataset), dtype=np.float32)
    else:  # either rescale element alone still applies (pydicom's helper wants both)
        slope, intercept = (first_value(dataset.get(k, d)) for k, d in (("RescaleSlope", 1), ("RescaleIntercept", 0)))
        values = stack.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if "VOILUTSequence" in dataset:
        descriptor = dataset.VOILUTSequence[0].LUTDescriptor
        rendered = window(apply_voi(values, dataset), 0, 2 ** int(descriptor[2]) - 1)
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        center, width = (first_value(dataset.get(k)) for k in ("WindowCenter", "WindowWidth"))
        width = max(width, 1.0)
        rendered = window(values, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)
    else:  # no window in the header: the head's percentiles, on values turned the MONOCHROME2 way up first
        values = values.max() - values if inverted else values
        if not (values > 0.1 * np.percentile(values, 99)).any():
            return list(np.zeros(values.shape, np.uint8))  # a blank frame (outside the head) stays blank
        _, lo, hi = head_window(values)
        return list(window(values, lo, hi))
    if inverted:
        rendered = 255 - rendered
    return list(rendered)


def colour_frames(stack: np.ndarray, dataset, photometric: str) -> tuple[list[np.ndarray], float]:
    """Grayscale of each RGB frame (a palette first through its colour LUT), and the most colourful frame's
    colourfulness."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        stack = apply_color_lut(stack, dataset)
        if stack.ndim == 3:
            stack = stack[None]
    rendered, colour = [], 0.0
    for frame in stack:
        if frame.dtype != np.uint8:  # 16-bit colour (and palettes with 16-bit entries): to 8 bits
            frame = window(frame, 0, np.iinfo(frame.dtype).max if frame.dtype.kind in "ui" else frame.max())
        img = Image.fromarray(frame[..., :3].astype(np.uint8), "RGB")
        rendered.append(to_grayscale(img))
        colour = max(colour, colourfulness(img))
    return rendered, colour


def frame_positions(dataset, count: int) -> list[float | None]:
    """Each frame's position along the slice normal: ImagePositionPatient projected on the cross product of
    ImageOrientationPatient's row and column directions (per frame for enhanced multi-frame objects). The normal
    projection orders axial, sagittal and oblique series alike, where z alone would not."""
    shared = dataset.get("SharedFunctionalGroupsSequence")
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    orientation = dataset.get("ImageOrientationPatient")
    if orientation is None and shared:
        orientation = _first(shared[0], "PlaneOrientationSequence", "ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return [None] * count
    normal = np.cross(np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float))
    if per_frame and len(per_frame) == count:
        points = [_first(group, "PlanePositionSequence", "ImagePositionPatient") for group in per_frame]
    else:
        points = [dataset.get("ImagePositionPatient")] * (1 if count == 1 else 0)
    if len(points) != count or any(p is None or len(p) != 3 for p in points):
        return [None] * count
    return [float(np.dot(normal, np.asarray(p, dtype=float))) for p in points]


def first_value(value) -> float:
    """The first of a multi-valued number (WindowCenter may hold several windows)."""
    return float(np.ravel(np.asarray(value, dtype=float))[0])


def _first(group, sequence: str, keyword: str):
    items = group.get(sequence)
    return items[0].get(keyword) if items else None
