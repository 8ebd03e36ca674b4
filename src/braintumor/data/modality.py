"""Which modality an image shows: brain MR or head CT, read from its own pixels, unless a reviewer said. No model
is involved.

The public "MRI" collections hold head CT slices too (Kaggle 2020's healthy folders above all). The product
reads brain MR only, so `fetch` keeps MR and lists the rest (`fetch.modalities`). A CT slice shown in a brain
window is recognised by its skull: bone is the brightest tissue, a thick ring all round the head, clipped to one
even white, and the brain meets it directly. On MR the bright ring at the head's edge is scalp fat: thinner,
uneven, and with dark bone and CSF between it and the brain. The thresholds were set on 1,019 files reviewed by
eye (`labels/modality_review.csv`; `benchmarks/modality_review.py` reports the agreement folder by folder).
What a reviewer saw an image to be (mr, ct, or other: a CT of the body, a film photograph) is recorded there
and wins over the check (`fetch.modality_review`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from braintumor.data.images import colour_refusal, foreground
from braintumor.labels import CT, MR

# The image is measured at this side (a thumbnail): every measure below is relative to the head's size.
SIDE = 256
# Bright: at least this fraction of the head's bright level (its 99.5th percentile).
BRIGHT = 0.8
# The ring is looked for within this many head radii of the head's outline; the core lies deeper than CORE_RADII.
EDGE_RADII = 0.2
CORE_RADII = 0.3
# "Just inside the ring": within this many head radii of a ring pixel, deeper than nine in ten of them.
INSIDE_RADII = 0.06
# A CT skull closes round this share of the head at least; it is at least MIN_RING and less than MAX_RING head
# radii thick on average (thicker is a bright frame round the picture, not a skull); its pixels are even (their
# interquartile range, as a share of the bright level, at most EVEN_RING), or nearly even (UNEVEN_RING) with no
# dark band inside (the darkest tenth just inside the ring at least BRAIN_INSIDE of the core's median).
MIN_COVER = 0.9
MIN_RING, MAX_RING = 0.035, 0.3
EVEN_RING, UNEVEN_RING = 0.035, 0.05
BRAIN_INSIDE = 0.5


@dataclass(frozen=True)
class Modality:
    """The answer for one image, with the evidence it was read from."""

    modality: str
    ring_thickness: float  # mean thickness of the bright edge ring, in head radii
    ring_cover: float  # share of 10-degree sectors round the head's centre that hold some of that ring
    ring_spread: float  # interquartile range of the ring's pixels, as a share of the bright level
    inside_ring: float  # darkest tenth just inside the ring, relative to the core's median

    def evidence(self) -> str:
        return (
            f"bright ring {self.ring_thickness:.3f} head radii thick round {self.ring_cover:.0%} of the head, "
            f"spread {self.ring_spread:.3f}, inside it {self.inside_ring:.2f} of the brain's grey"
        )


def modality_of(gray: np.ndarray, evidence: bool = True) -> Modality:
    """Brain MR or head CT, read from an 8-bit grayscale slice of any size. Without `evidence`, a slice whose
    bright ring is too thin, too thick or too open for a skull is answered MR at once, its ring's evenness and
    what lies inside it left unmeasured (NaN): the same answer, in about half the time (what serving needs)."""
    thumb = Image.fromarray(gray)
    thumb.thumbnail((SIDE, SIDE), Image.Resampling.BILINEAR)
    pixels = np.asarray(thumb)
    head = _largest_blob(foreground(pixels))
    if head.sum() < 64:  # nothing that could be a head: the gate refuses such images
        return Modality(MR, 0.0, 0.0, 0.0, 1.0)
    radius = float(np.sqrt(head.sum() / np.pi))
    depth = ndimage.distance_transform_edt(head)
    relative = pixels.astype(np.float32) / max(float(np.percentile(pixels[head], 99.5)), 1.0)
    ring = head & (depth <= EDGE_RADII * radius) & (relative >= BRIGHT)
    if ring.sum() < 10:
        return Modality(MR, 0.0, 0.0, 0.0, 1.0)
    thickness = float(ring.sum() / max(int((head & (depth <= 1)).sum()), 1) / radius)
    rows, cols = np.nonzero(ring)
    centre_row, centre_col = ndimage.center_of_mass(head)
    sectors = np.floor((np.arctan2(rows - centre_row, cols - centre_col) + np.pi) / (2 * np.pi) * 36)
    cover = len(np.unique(np.minimum(sectors, 35))) / 36
    skull_like = cover >= MIN_COVER and MIN_RING <= thickness < MAX_RING
    if not skull_like and not evidence:
        return Modality(MR, thickness, cover, float("nan"), float("nan"))
    spread = float(np.subtract(*np.percentile(relative[ring], [75, 25])))
    core = relative[depth > CORE_RADII * radius]
    near_ring = ndimage.distance_transform_edt(~ring) <= INSIDE_RADII * radius
    inside = head & near_ring & ~ring & (depth > np.percentile(depth[ring], 90))
    inside_ring = (
        float(np.percentile(relative[inside], 10) / max(float(np.median(core)), 1e-3))
        if inside.sum() > 10 and core.size
        else 1.0
    )
    is_ct = skull_like and (spread <= EVEN_RING or (spread <= UNEVEN_RING and inside_ring >= BRAIN_INSIDE))
    return Modality(CT if is_ct else MR, thickness, cover, spread, inside_ring)


class Refusal(NamedTuple):
    """Why an input is not read: a code to count by (metrics, audit log) and a sentence for the reader."""

    code: str  # colour | head_ct | not_mr_modality (a DICOM series), or the model's: gate | no_slice_read
    text: str


def reading_refusal(img: Image.Image, gray: np.ndarray) -> Refusal | None:
    """Why an image file is not read as a brain MR slice (its colour, or a head CT's skull), or None. `predict`
    and `serve` answer such a file "not read" without scoring it, as fetch leaves it out of the data."""
    colour = colour_refusal(img)
    if colour is not None:
        return Refusal("colour", colour)
    answer = modality_of(gray, evidence=False)
    if answer.modality == MR:
        return None
    return Refusal("head_ct", f"a head CT slice by its pixels ({answer.evidence()}); only brain MR is read")


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest connected part of `mask` with its holes filled: the head without labels or annotations."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
