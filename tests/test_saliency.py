"""The maps that show a reader where the tumor score comes from must land on the evidence the model uses."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest

from braintumor.data.datasets import load_split
from braintumor.model.architectures import BUILDERS
from braintumor.model.inference import average_of, tumor_probability
from braintumor.model.intensity import HeadStandardization
from braintumor.model.saliency import evidence_map, occlusion, peak
from braintumor.model.train import fit

from conftest import brain_image
from fixtures.split import LESION_RADIUS, make_split, tiny_params

NAMES = ["no_tumor", "tumor"]


def lesion_detector(size: int, standardized: bool = False) -> keras.Model:
    """A network that looks at nothing but the synthetic lesion: a 5x5 mean brightness above 0.8 (the heads
    stay below 0.6, the lesion is 1.0), pooled into the tumor score. Its true evidence is the lesion alone.
    `standardized`: the same on the head-standardised image (`train.standardize`), where a tumor scan's lesion
    stays above 0.9 and the rest of its head below 0.6."""
    inputs = keras.Input((size, size, 3), name="image")
    bright = keras.layers.Conv2D(1, 5, padding="same", activation="relu")
    score = keras.layers.Dense(1, activation="sigmoid", name="prediction")
    x = HeadStandardization(name="head_standardization")(inputs) if standardized else inputs
    x = bright(keras.layers.Rescaling(1 / 255)(x))
    model = keras.Model(inputs, score(keras.layers.GlobalAveragePooling2D()(x)))
    bright.set_weights([np.full((5, 5, 3, 1), 1 / 75, dtype="float32"), np.array([-0.8], dtype="float32")])
    score.set_weights([np.array([[500.0]], dtype="float32"), np.array([-1.0], dtype="float32")])
    return model


@pytest.mark.parametrize("standardized", [False, True])
def test_the_shipped_form_explains_the_lesion_and_nothing_else(tmp_path, standardized):
    """The shipped form (an average of members, each also on the mirrored image): the evidence map and occlusion
    both peak on each synthetic tumor's lesion, whose position is known, and the evidence map is dark away
    from it; for a standardised model too, which is explained from its standardised image."""
    split = make_split(tmp_path / "split", counts=(("train", 2), ("val", 2), ("test", 24)))
    test = load_split(split, "test", "binary")
    manifest = pd.read_csv(split / "manifest.csv").set_index("path")
    shipped = average_of([lesion_detector(48, standardized), lesion_detector(48, standardized)], mirrored=True)
    tumors = np.flatnonzero(test["label"] == 1)
    assert (tumor_probability(shipped, test["x"][tumors], NAMES) > 0.5).all()
    maps = evidence_map(shipped, test["x"][tumors], NAMES)
    occluded = occlusion(shipped, test["x"][tumors], NAMES, patch=8, stride=4)
    radius = LESION_RADIUS * 48
    for evidence, drop, path in zip(maps, occluded, test["path"][tumors], strict=True):
        lesion = manifest.loc[path, ["lesion_row", "lesion_col"]].to_numpy(float)
        assert np.hypot(*(peak(evidence) - lesion)) <= radius, f"{path}: evidence peak at {peak(evidence)}"
        assert np.hypot(*(peak(drop) - lesion)) <= radius, f"{path}: occlusion peak at {peak(drop)}"
        far = np.hypot(*np.mgrid[:48, :48] - lesion[:, None, None]) > 2 * radius
        assert evidence[far].max() < 0.1 * evidence.max()


def test_occlusion_measures_the_drop_in_probability_under_each_patch():
    """A model whose score is the mean brightness of the top-left quarter: covering it with the (dark) median
    drops P(tumor), covering anything else changes nothing."""
    inputs = keras.Input((32, 32, 3))
    corner = keras.layers.Cropping2D(((0, 16), (0, 16)))(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(corner)[:, :1])
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    image[0, :16, :16] = 200
    drop = occlusion(model, image, NAMES, patch=8, stride=8)[0]
    assert drop[:16, :16] == pytest.approx(np.full((16, 16), 200 / 255 / 4), abs=1e-5)  # a quarter of it each
    assert np.abs(drop[16:]).max() == 0 and np.abs(drop[:, 16:]).max() == 0


DISC = 6  # px radius of the pasted lesion at 64 px (the 7 px disc at 96 px)
PLACES = [(0.3, 0.35), (0.3, 0.65), (0.5, 0.5), (0.7, 0.35), (0.7, 0.65), (0.45, 0.3), (0.55, 0.7)]


def with_disc(seed: int, centre: tuple[float, float] | None, size: int = 64) -> np.ndarray:
    """A synthetic head, with a bright disc (235, as pasted into real scans in issue 31) at `centre` (fractions
    of the side) when given."""
    gray = brain_image(seed, size).astype(float) * 0.6
    if centre is not None:
        yy, xx = np.mgrid[:size, :size]
        gray[(yy - centre[0] * size) ** 2 + (xx - centre[1] * size) ** 2 < DISC**2] = 235
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)


def disc_data(count: int, first_seed: int) -> dict:
    """Half healthy heads, half with a disc anywhere inside the head."""
    rng = np.random.default_rng(first_seed)
    places = [tuple(rng.uniform(0.28, 0.72, 2)) if k % 2 else None for k in range(count)]
    x = np.stack([with_disc(first_seed + k, place) for k, place in enumerate(places)])
    y = np.array([place is not None for place in places], dtype=np.int8)
    return {
        "x": x,
        "y": y,
        "source": np.array(["synthetic"] * count, dtype=object),
        "collection": np.array([""] * count, dtype=object),
        "cluster": np.arange(count),
    }


# efficientnetb0 from random weights learns nothing usable at inference in a test-sized training: its batch
# norm's moving statistics lag (validation loss best at epoch 1, every output the prior, with 32 or 8 images a
# batch), so there is no evidence to find. The map has no architecture-specific part.
LEARNS_HERE = sorted(set(BUILDERS) - {"efficientnetb0"})


@pytest.mark.slow
@pytest.mark.parametrize("variant", LEARNS_HERE)
def test_every_trained_variant_shows_its_evidence_on_the_disc(variant):
    """Each `train.model` variant, trained (random init) on heads with a bright disc anywhere inside: wherever a
    disc is pasted into a healthy head, occlusion says the model's evidence is the disc, and the evidence map's
    peak lies on the disc. Grad-CAM of the last feature layer, which this map replaced, failed it: 11 px low
    and 7 px left on average on the small Xception, in a corner of the image on the flattened heads."""
    params = tiny_params(variant, epochs=12, early_stopping_patience=12, batch_size=32, dropout=0.0)
    params["split"]["image_size"] = 64
    params["train"]["small_xception"]["widths"] = [32, 64, 128]  # the shipped widths: a 4 x 4 last map here
    params["train"]["augment"] = dict.fromkeys(params["train"]["augment"], 0) | {"horizontal_flip": True}
    model, _ = fit(params, disc_data(160, 0), disc_data(32, 1000), verbose=0)
    places = np.array(PLACES) * 64
    pasted = np.stack([with_disc(5000 + k, (row / 64, col / 64)) for k, (row, col) in enumerate(places)])
    found = tumor_probability(model, pasted, NAMES) > 0.5
    assert found.mean() >= 0.7, f"{variant} did not learn the disc: {found}"
    evidence = evidence_map(model, pasted[found], NAMES)
    drops = occlusion(model, pasted[found], NAMES, patch=16, stride=4)
    for place, evidence_of, drop in zip(places[found], evidence, drops, strict=True):
        assert np.hypot(*(peak(drop) - place)) <= 2 * DISC, f"{variant}: the model's evidence is not the disc"
        assert np.hypot(*(peak(evidence_of) - place)) <= DISC, f"{variant}: disc at {place}, map at {peak(evidence_of)}"
