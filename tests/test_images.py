"""Reading images of every format and shape into the 8-bit grayscale the hashes and the model see."""

import numpy as np
import pytest
from PIL import Image

from braintumor.data.images import (
    HASH_WINDOW_RADII,
    center_on_head,
    crop_to_content,
    model_input,
    open_image,
    percentiles,
    to_grayscale,
)
from braintumor.errors import ImageReadError

from conftest import brain_image, save


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "LA"])
def test_every_mode_becomes_the_same_8bit_grayscale(tmp_path, mode):
    pixels = brain_image(1)
    path = save(tmp_path / "scan.png", pixels, mode)
    gray = to_grayscale(open_image(path))
    assert gray.dtype == np.uint8 and gray.shape == pixels.shape
    # 16-bit is rescaled min..max, palettes quantise: all stay within a few levels of the original.
    assert np.abs(gray.astype(int) - pixels.astype(int)).mean() < 6


def test_transparent_background_is_composited_on_black(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white but fully transparent...
    rgba[8:24, 8:24, 3] = 255  # ...except an opaque square
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    gray = to_grayscale(open_image(path))
    assert gray[0, 0] == 0 and gray[16, 16] == 255


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty_file"), (b"not an image at all", "not_an_image")],
)
def test_unreadable_files_raise_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as err:
        open_image(path)
    assert err.value.reason == reason and str(path) in str(err.value)


def test_truncated_jpeg_is_reported_as_corrupt(tmp_path):
    path = save(tmp_path / "full.jpg", brain_image(2, 256))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageReadError) as err:
        open_image(cut)
    assert err.value.reason == "truncated_or_corrupt"


def test_model_input_is_square_uint8_with_three_equal_channels(tmp_path):
    pixels = np.pad(brain_image(3, 80), ((10, 10), (40, 0)))  # off-centre, non-square frame
    path = save(tmp_path / "scan.png", pixels, "RGB")
    arr = model_input(path, 64)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_crop_and_centre_ignore_padding():
    pixels = brain_image(4, 64)
    padded = np.pad(pixels, ((30, 5), (0, 50)))
    assert crop_to_content(padded).shape == crop_to_content(pixels).shape
    assert center_on_head(padded).shape == center_on_head(pixels).shape


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 64), (173, 211)])
def test_histogram_percentiles_equal_numpy_s(shape):
    rng = np.random.default_rng(shape[0])
    for gray in (
        rng.integers(0, 256, shape, dtype=np.uint8),
        np.full(shape, 9, np.uint8),
        (rng.random(shape) < 0.3).astype(np.uint8) * 200,
    ):
        q = [0, 1, 37.5, 50, 99, 100]
        assert percentiles(gray, q).tolist() == np.percentile(gray, q).tolist()  # the very same floats


def disc(radius: int, frame: tuple[int, int], centre: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[: frame[0], : frame[1]]
    return np.where((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2, 200, 0).astype(np.uint8)


def test_the_hash_window_follows_the_head_wherever_it_sits_and_grows_with_it():
    """A copy moved or padded within its frame hashes alike only if its window is the same: the window is
    centred on the head, its side set by the head's size (a uniform disc has radius √2 radii of gyration)."""
    window = center_on_head(disc(15, (64, 64), (32, 32)))
    assert np.array_equal(center_on_head(disc(15, (90, 140), (50, 97))), window)  # moved, in a larger frame
    assert window.shape[0] == window.shape[1]
    assert abs(window.shape[0] - 2 * HASH_WINDOW_RADII * 15 / np.sqrt(2)) <= 2
    twice = center_on_head(disc(30, (128, 128), (64, 64)))
    assert abs(twice.shape[0] - 2 * window.shape[0]) <= 2
    edge = disc(15, (64, 64), (8, 32))  # cut by the top of the frame: zeros beyond it, nothing of the head lost
    cut = center_on_head(edge)
    assert (cut > 0).sum() == (edge > 0).sum() and not cut[0].any()
