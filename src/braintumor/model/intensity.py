"""Intensity layers: per-image standardisation (training and inference alike) and MRI-style intensity
augmentation (training only), as Keras layers inside the model.

In the public collections the classes come from different scanners and sequences, so an image's brightness
histogram alone tells tumor from healthy (benchmarks/histogram_probe.py): a model can learn the collection
instead of the lesion. `HeadStandardization` puts every head on one intensity scale, and the augmentations
(gamma, a smooth multiplicative bias field, Rician noise, random contrast curves; blur is Keras' own) show the model
the same anatomy under many scanner-like intensity changes, in the spirit of BigAug (Zhang et al., IEEE TMI
2020) and with TorchIO's defaults as the reference. They live in the saved model, so `braintumor predict` and
the web service standardise exactly as training did; every layer is registered with Keras, so safe-mode
loading needs no code from the file.
"""

from __future__ import annotations

import keras
from keras import ops

# Same rule as braintumor.data.images.foreground: a pixel is head when it is this fraction of the way from the
# image's 1st to its 99th percentile, plus 2 grey levels.
BACKGROUND_FRACTION = 0.1
# Standardised heads: the mean at mid-grey, +-SPREAD standard deviations across the 0..255 range.
SPREAD = 3.0


@keras.saving.register_keras_serializable(package="braintumor")
class HeadStandardization(keras.layers.Layer):
    """Each image to z-scores of its own head pixels, drawn back into 0..255 (mean at 127.5, +-3 sd at the
    ends, clipped), the background set to 0: the same anatomy under another scanner or sequence lands on the
    same numbers, and the dark background (padding, the scanner's noise floor) carries nothing."""

    def call(self, images):
        gray = ops.mean(images, axis=-1)
        flat = ops.reshape(gray, (ops.shape(gray)[0], -1))
        dark = ops.quantile(flat, 0.01, axis=1, keepdims=True)
        bright = ops.quantile(flat, 0.99, axis=1, keepdims=True)
        head = ops.cast(flat > dark + BACKGROUND_FRACTION * (bright - dark) + 2.0, images.dtype)
        count = ops.maximum(ops.sum(head, axis=1, keepdims=True), 1.0)
        mean = ops.sum(flat * head, axis=1, keepdims=True) / count
        variance = ops.sum(ops.square(flat - mean) * head, axis=1, keepdims=True) / count
        std = ops.sqrt(variance + 1.0)  # one grey level of floor: a flat image does not blow up
        mean, std = ops.reshape(mean, (-1, 1, 1, 1)), ops.reshape(std, (-1, 1, 1, 1))
        mask = ops.reshape(head, ops.shape(gray))[..., None]
        scaled = ops.clip(127.5 + (images - mean) / std * (127.5 / SPREAD), 0.0, 255.0)
        return scaled * mask

    def compute_output_shape(self, input_shape):
        return input_shape


class _RandomIntensity(keras.layers.Layer):
    """Base of the training-only intensity augmentations: identity at inference, a seeded draw per image in
    training, on inputs in 0..255."""

    def __init__(self, amount: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.amount, self.seed = float(amount), seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        return self.augment(images) if training else images

    def per_image(self, images, low: float, high: float):
        """One uniform draw per image, shaped to broadcast over its pixels."""
        batch = ops.shape(images)[0]
        return keras.random.uniform((batch, 1, 1, 1), low, high, seed=self.generator)

    def get_config(self):
        return {**super().get_config(), "amount": self.amount, "seed": self.seed}

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="braintumor")
class RandomGamma(_RandomIntensity):
    """255 * (x / 255) ** gamma, log(gamma) uniform in +-amount (TorchIO's RandomGamma: 0.3): the contrast
    curve of another sequence or windowing."""

    def augment(self, images):
        gamma = ops.exp(self.per_image(images, -self.amount, self.amount))
        return 255.0 * ops.power(ops.clip(images / 255.0, 1e-6, 1.0), gamma)


@keras.saving.register_keras_serializable(package="braintumor")
class RandomBiasField(_RandomIntensity):
    """A smooth multiplicative field exp(f), f drawn on a 4 x 4 grid in +-amount and resized bilinearly (no overshoot)
    to the image (TorchIO's RandomBiasField: coefficients 0.5): the coil shading that differs between
    scanners."""

    GRID = 4

    def augment(self, images):
        batch, height, width = ops.shape(images)[0], ops.shape(images)[1], ops.shape(images)[2]
        grid = keras.random.uniform((batch, self.GRID, self.GRID, 1), -self.amount, self.amount, seed=self.generator)
        field = ops.exp(ops.image.resize(grid, (height, width), interpolation="bilinear"))
        return ops.clip(images * field, 0.0, 255.0)


@keras.saving.register_keras_serializable(package="braintumor")
class RandomRicianNoise(_RandomIntensity):
    """Magnitude-image noise: |x + n1 + i n2| with n1, n2 Gaussian of a standard deviation drawn per image up
    to `amount` of the full scale. MRI magnitude images carry Rician, not Gaussian, noise: it lifts the
    dark background, as low-field and fast scans do."""

    def augment(self, images):
        sigma = 255.0 * self.per_image(images, 0.0, self.amount)
        shape = (*ops.shape(images)[:3], 1)  # one draw for the three equal channels
        real = images + sigma * keras.random.normal(shape, seed=self.generator)
        imaginary = sigma * keras.random.normal(shape, seed=self.generator)
        return ops.clip(ops.sqrt(ops.square(real) + ops.square(imaginary)), 0.0, 255.0)


@keras.saving.register_keras_serializable(package="braintumor")
class RandomContrastMap(_RandomIntensity):
    """With probability `amount`, a random contrast: intensities through a random piecewise-linear curve of
    CURVE_POINTS levels (black stays black), not necessarily monotone, so tissue that is bright in one
    sequence may be dark in the next, as between T1 and T2. The classes in these collections differ by sequence
    (contrast T1 tumors, T2 and FLAIR healthy scans: benchmarks/RESULTS.md); under random contrasts the
    sequence stops telling them apart and the lesion's shape and mass effect remain (SynthSeg's domain
    randomisation, Billot et al., Medical Image Analysis 2023, in a simple form)."""

    CURVE_POINTS = 6

    def augment(self, images):
        batch = ops.shape(images)[0]
        levels = keras.random.uniform((batch, self.CURVE_POINTS - 1), 0.0, 1.0, seed=self.generator)
        curve = ops.concatenate([ops.zeros((batch, 1)), levels], axis=1)  # (batch, points): black stays black
        position = ops.clip(images[..., :1] / 255.0, 0.0, 1.0) * (self.CURVE_POINTS - 1)
        low = ops.clip(ops.floor(position), 0, self.CURVE_POINTS - 2)
        fraction = position - low
        flat = ops.reshape(ops.cast(low, "int32"), (batch, -1))
        below = ops.take_along_axis(curve, flat, axis=1)
        above = ops.take_along_axis(curve, flat + 1, axis=1)
        mapped = ops.reshape(below, ops.shape(fraction)) * (1.0 - fraction)
        mapped = mapped + ops.reshape(above, ops.shape(fraction)) * fraction
        chosen = ops.cast(self.per_image(images, 0.0, 1.0) < self.amount, images.dtype)
        remapped = ops.repeat(255.0 * mapped, ops.shape(images)[-1], axis=-1)
        return chosen * remapped + (1.0 - chosen) * images
