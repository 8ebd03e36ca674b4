"""Image decoding and normalisation shared by every stage (and by inference later).

Sources mix JPEG/PNG, RGB/grayscale/palette/RGBA and 8/16-bit images of any size. Everything that
looks at pixels goes through `load_grayscale` (one 8-bit grayscale channel) so that hashing, the model
arrays and prediction see the same picture; hashing then centres on the head, the model crops to it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from braintumor.errors import ImageReadError

# Pixels less than this fraction of the way from the image's dark to its bright level are background.
BACKGROUND_FRACTION = 0.1
# A row or column belongs to the head when at least this fraction of its pixels are foreground;
# this ignores thin text labels and scanner annotations in the corners.
MIN_FOREGROUND_SHARE = 0.02
# Half-side of the hashing window in radii of gyration of the head (a uniform disc has radius 1.41 of them).
HASH_WINDOW_RADII = 2.0
# The image formats decoded here; any other (EPS, which Pillow hands to Ghostscript, PSD, ICO, ...) is refused
# as `unsupported_format` before decoding.
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")
# Images larger than this (width x height) are refused as `too_large` from their header, before decoding:
# a 200 KB PNG can hold 10000 x 10000 16-bit pixels. 4096 x 4096 covers scanners and photos of film; params
# (`fetch.max_image_pixels`) and `braintumor predict --max-pixels` can change it.
DEFAULT_MAX_PIXELS = 4096 * 4096
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# An MR slice is grayscale. On Hasler and Süsstrunk's colourfulness scale (2003: 15 "slightly", 33 "moderately
# colourful") the most colourful of the 3,770 Kaggle images scores 15.5 (a tinted JPEG) and a colour photograph
# 36-100; a file at or above this is answered "not a brain MR slice" without being scored.
MAX_COLOURFULNESS = 33.0
COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA")


def identify(data: bytes | Path) -> str | None:
    """The format Pillow would read `data` as (header only, nothing decoded), or None."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return img.format
    except Exception:  # noqa: BLE001 - any failure means: no format Pillow knows
        return None


def open_image(
    path: str | Path,
    draft_size: int | None = None,
    data: bytes | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Fully decode an image file, raising `ImageReadError` with a reason instead of PIL's zoo of errors.

    Only `FORMATS` are decoded (`unsupported_format` otherwise), and an image over `max_pixels` is refused as
    `too_large` from its header (None: no limit of ours, for stages whose input fetch already checked).
    `draft_size` lets the JPEG decoder scale down while decoding (1/2 to 1/8), which is several
    times faster when only a small version of the image is needed (hashing). `data`, the file's bytes
    when the caller has read them already, saves reading the file again; `path` then only names it.
    """
    path = Path(path)
    source = io.BytesIO(data) if data is not None else path
    try:
        if (len(data) if data is not None else path.stat().st_size) == 0:
            raise ImageReadError(path, "empty_file", "file has 0 bytes")
        with warnings.catch_warnings():  # Pillow's own bomb warning (past 89.5 M pixels): our limit replaces it
            warnings.simplefilter("ignore" if max_pixels is not None else "error", Image.DecompressionBombWarning)
            with Image.open(source, formats=FORMATS) as img:
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise ImageReadError(
                        path,
                        "too_large",
                        f"{img.width} x {img.height} pixels, over the limit of {max_pixels}; not decoded",
                    )
                if draft_size is not None and img.format == "JPEG":
                    img.draft("L", (draft_size, draft_size))
                img.load()
                return img.copy()
    except ImageReadError:
        raise
    except UnidentifiedImageError as err:
        found = identify(data if data is not None else path)
        if found:
            raise ImageReadError(
                path, "unsupported_format", f"{found} image; only {', '.join(FORMATS)} are decoded"
            ) from err
        raise ImageReadError(path, "not_an_image", f"not a {', '.join(FORMATS)} image") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(path, "too_large", str(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageReadError(path, "truncated_or_corrupt", f"{type(err).__name__}: {err}") from err


def colourfulness(img: Image.Image) -> float:
    """Hasler and Süsstrunk's colourfulness of an image (0 for any grayscale one), on a 128 px copy."""
    if img.mode not in COLOUR_MODES:
        return 0.0
    rgb = np.asarray(img.convert("RGB").resize((128, 128), Image.Resampling.BILINEAR), dtype=np.float64)
    red_green = rgb[..., 0] - rgb[..., 1]
    yellow_blue = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    return float(np.hypot(red_green.std(), yellow_blue.std()) + 0.3 * np.hypot(red_green.mean(), yellow_blue.mean()))


def colour_refusal(img: Image.Image) -> str | None:
    """Why a decoded image is no MR slice by its colour alone, or None."""
    score = colourfulness(img)
    if score < MAX_COLOURFULNESS:
        return None
    return (
        f"a colour image (colourfulness {score:.0f}, refused from {MAX_COLOURFULNESS:.0f}); MR slices are "
        "grayscale: export the slice without colour overlays"
    )


def window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The 8-bit rendering of any scalar image: `low` and below black, `high` and above white, linear between.
    DICOM, NIfTI and high-bit-depth files all end here, so one scan scores alike in any of those formats."""
    scale = np.float32(255.0 / max(float(high) - float(low), 1e-6))
    scaled = (np.asarray(values, dtype=np.float32) - np.float32(low)) * scale
    return np.round(np.clip(scaled, 0, 255)).astype(np.uint8)


def to_grayscale(img: Image.Image) -> np.ndarray:
    """8-bit grayscale array of any PIL image: alpha is composited on black, high bit depths rescaled (in
    float32: a full-size float64 copy of a large 16-bit image would cost 8 bytes a pixel), LAB keeps its
    lightness. A mode that has no grayscale raises ValueError naming it."""
    if img.mode in HIGH_BIT_MODES:
        pixels = np.asarray(img)
        lo, hi = pixels.min(), pixels.max()
        if hi <= lo:
            return np.zeros(pixels.shape, dtype=np.uint8)
        return window(pixels, lo, hi)
    if img.mode == "LAB":
        return np.asarray(img.getchannel("L"), dtype=np.uint8)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    try:
        return np.asarray(img.convert("L"), dtype=np.uint8)
    except ValueError as err:
        raise ValueError(f"image mode {img.mode} has no grayscale conversion ({err})") from err


def percentiles(gray: np.ndarray, q: list[float]) -> np.ndarray:
    """`np.percentile(gray, q)` of an 8-bit image, read off its histogram (same linear rule, same floats):
    a bincount and a cumulative sum cost a fraction of the partial sort that np.percentile does."""
    position = np.asarray(q, dtype=np.float64) / 100 * (gray.size - 1)
    below = np.floor(position).astype(np.int64)
    cumulative = np.cumsum(np.bincount(gray.ravel(), minlength=256))
    a, b = (
        np.searchsorted(cumulative, k, side="right").astype(np.float64)
        for k in (below, np.minimum(below + 1, gray.size - 1))
    )
    t = position - below
    return np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)  # numpy's lerp, both branches


def foreground(gray: np.ndarray) -> np.ndarray:
    """Mask of the head: pixels clearly brighter than the image's own dark level (robust to contrast changes)."""
    dark, bright = percentiles(gray, [1, 99])
    return gray > dark + BACKGROUND_FRACTION * (bright - dark) + 2


def crop_to_content(gray: np.ndarray) -> np.ndarray:
    """Crop the dark background around the head, so borders and padding do not matter."""
    mask = foreground(gray)
    rows = np.flatnonzero(mask.mean(axis=1) >= MIN_FOREGROUND_SHARE)
    cols = np.flatnonzero(mask.mean(axis=0) >= MIN_FOREGROUND_SHARE)
    if rows.size < 2 or cols.size < 2:
        return gray
    return gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def center_on_head(gray: np.ndarray) -> np.ndarray:
    """Square window centred on the head's centroid, its half-side twice the head's radius of gyration.

    Moments move little when a copy is cropped, shifted or padded (a bounding box jumps as soon as the
    skull touches the frame), so hashes of such copies stay close. Used for hashing only.
    """
    mask = foreground(gray)
    rows, cols = np.count_nonzero(mask, axis=1), np.count_nonzero(mask, axis=0)  # moments from the marginals
    total = int(rows.sum())
    if total < 16:
        return gray
    y, x = np.arange(len(rows)), np.arange(len(cols))
    cy, cx = rows @ y / total, cols @ x / total
    half = max(4, int(round(HASH_WINDOW_RADII * np.sqrt((rows @ (y - cy) ** 2 + cols @ (x - cx) ** 2) / total))))
    top, left = int(round(cy)) - half, int(round(cx)) - half
    window = np.zeros((2 * half, 2 * half), dtype=gray.dtype)  # zero beyond the image's edges
    inside = gray[max(top, 0) : top + 2 * half, max(left, 0) : left + 2 * half]
    window[max(-top, 0) : max(-top, 0) + inside.shape[0], max(-left, 0) : max(-left, 0) + inside.shape[1]] = inside
    return window


def load_grayscale(
    path: str | Path, draft_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode and convert to 8-bit grayscale."""
    return to_grayscale(open_image(path, draft_size, max_pixels=max_pixels))


def square_resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square (keeping the aspect ratio) and resize to `size`×`size`, 3 identical channels, uint8."""
    h, w = gray.shape
    side = max(h, w)
    canvas = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = gray
    resized = Image.fromarray(canvas).resize((size, size), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(resized)[:, :, None], 3, axis=2)


def prepare(gray: np.ndarray, size: int) -> np.ndarray:
    """The model-ready array of a grayscale image: (size, size, 3) uint8."""
    return square_resize(crop_to_content(gray), size)


def model_input(path: str | Path, size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The model-ready array of one image file: (size, size, 3) uint8. Training and inference share it."""
    return prepare(load_grayscale(path, max_pixels=max_pixels), size)


def check_usable(img: Image.Image) -> np.ndarray:
    """Run every step later stages take on a decoded image (grayscale, the hashing window, the model crop),
    so that an image that would fail there fails here, once, with its name; raises ValueError if one fails.
    Returns the grayscale, for the checks that read pixels next."""
    gray = to_grayscale(img)
    center_on_head(gray)
    prepare(gray, 32)
    return gray


def pixel_digest(path: str | Path) -> str:
    """sha256 of the fully decoded pixels (mode, size and bytes): equal digests mean identical images."""
    img = open_image(path, max_pixels=None)
    digest = hashlib.sha256(f"{img.mode}:{img.size}:".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()
