"""Intensity standardisation and MRI-style intensity augmentation: what each layer does to a head, that
training-only layers leave inference alone, and that a model holding them saves and loads in safe mode."""

import keras
import numpy as np
import pytest

from braintumor.model.architectures import build_model
from braintumor.model.inference import load_model
from braintumor.model.intensity import (
    HeadStandardization,
    RandomBiasField,
    RandomContrastMap,
    RandomGamma,
    RandomRicianNoise,
)

from conftest import brain_image
from fixtures.split import tiny_params

AUGMENTATIONS = [(RandomGamma, 0.3), (RandomBiasField, 0.5), (RandomRicianNoise, 0.05), (RandomContrastMap, 1.0)]


def heads(n: int = 4, size: int = 48) -> np.ndarray:
    """n textured heads on black, as the model takes them: float32 0..255, three equal channels."""
    return np.stack([np.repeat(brain_image(seed, size)[:, :, None], 3, axis=2) for seed in range(n)]).astype("float32")


def numpy_of(tensor) -> np.ndarray:
    return keras.ops.convert_to_numpy(tensor)


def test_standardisation_maps_another_scanners_gain_and_offset_to_the_same_image():
    x = heads()
    head = x > 0
    other_scanner = np.where(head, 0.6 * x + 30, 0).astype("float32")  # darker, lower contrast, same anatomy
    first, second = numpy_of(HeadStandardization()(x)), numpy_of(HeadStandardization()(other_scanner))
    assert np.abs(first - second).max() < 1.0  # under one grey level
    assert np.abs(x - other_scanner)[head].mean() > 20  # while the inputs differed by tens of grey levels


def test_standardisation_centres_each_head_and_keeps_the_background_black():
    x = heads()
    out = numpy_of(HeadStandardization()(x))
    head = x[..., 0] > 0
    assert (out[~head] == 0).all()
    for image, mask in zip(out[..., 0], head, strict=True):
        assert abs(image[mask].mean() - 127.5) < 4  # the head's mean at mid-grey (clipping moves it a little)


@pytest.mark.parametrize("layer_class, amount", AUGMENTATIONS)
def test_an_augmentation_changes_images_only_in_training(layer_class, amount):
    x = heads()
    layer = layer_class(amount, seed=3)
    np.testing.assert_array_equal(numpy_of(layer(x, training=False)), x)
    changed = numpy_of(layer(x, training=True))
    assert np.abs(changed - x).mean() > 1.0
    assert changed.min() >= 0 and changed.max() <= 255
    np.testing.assert_array_equal(changed[..., 0], changed[..., 2])  # still one grayscale image
    again = numpy_of(layer_class(amount, seed=3)(x, training=True))
    np.testing.assert_array_equal(changed, again)  # seeded


def test_gamma_keeps_the_order_of_intensities():
    x = heads(2)
    out = numpy_of(RandomGamma(0.3, seed=0)(x, training=True))
    for before, after in zip(x[..., 0], out[..., 0], strict=True):
        order = np.argsort(before.ravel(), kind="stable")
        assert (np.diff(after.ravel()[order]) >= -1e-3).all()


def test_the_bias_field_is_smooth_and_within_its_amount():
    x = np.full((2, 48, 48, 3), 100.0, dtype="float32")
    field = numpy_of(RandomBiasField(0.5, seed=0)(x, training=True))[..., 0] / 100.0
    assert np.abs(np.log(field)).max() <= 0.5 + 1e-5
    assert np.abs(np.log(field)).max() > 0.1
    assert np.abs(np.diff(np.log(field), axis=1)).max() < 0.1  # neighbours differ by under 10 %


def test_rician_noise_lifts_the_black_background():
    x = heads(2)
    out = numpy_of(RandomRicianNoise(0.05, seed=0)(x, training=True))
    assert out[x == 0].mean() > 1.0  # magnitude noise is never negative: the mean of black rises


def test_a_standardised_model_gives_the_same_answer_under_another_scanners_gain(tmp_path):
    params = tiny_params("small_xception", standardize=True)
    params["train"]["augment"] |= {"bias_field": 0.5, "gamma": 0.3, "blur": 0.5, "noise": 0.03}
    model, _ = build_model("small_xception", 48, 1, params["train"], seed=0)
    x = heads()
    other_scanner = np.where(x > 0, 0.6 * x + 30, 0).astype("float32")
    p, q = numpy_of(model(x, training=False)), numpy_of(model(other_scanner, training=False))
    np.testing.assert_allclose(p, q, atol=1e-3)
    model.save(tmp_path / "model.keras")
    reloaded = load_model(tmp_path / "model.keras")  # safe mode: the registered layers, no code from the file
    np.testing.assert_allclose(numpy_of(reloaded(x, training=False)), p, atol=1e-6)


def test_a_random_contrast_is_one_curve_per_image_that_keeps_black():
    x = heads(3)
    out = numpy_of(RandomContrastMap(1.0, seed=0)(x, training=True))
    assert (out[x == 0] == 0).all()
    for before, after in zip(x[..., 0], out[..., 0], strict=True):
        for level in np.unique(before)[:20]:  # one input level, one output level: a curve, not noise
            assert np.ptp(after[before == level]) < 1e-3
    assert np.abs(out - x).mean() > 5.0
