"""Brain MR only: the pixel check tells head CT from brain MR, fetch keeps what `fetch.modalities` lists and lists
the rest with the evidence, and a reviewer's recorded modality wins over the check."""

import hashlib

import numpy as np
import pandas as pd
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from scipy import ndimage
from skimage.data import shepp_logan_phantom

from braintumor.data.fetch import fetch
from braintumor.data.images import window
from braintumor.data.modality import modality_of
from braintumor.errors import ParamError, SourceError
from braintumor.params import validate_fetch

from conftest import brain_image, local_only_params, save


def head_slice(ring: float, ring_level: float, ring_noise: float, gap: float, brain: float, seed: int = 0):
    """A 256 px axial slice: an elliptic head whose outer `ring` (head radii) is at `ring_level` with
    `ring_noise` of uneven brightness, then a band of `gap` head radii at 10 % grey, then textured brain at
    `brain` grey with a darker pair of ventricles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:256, :256]
    radius = np.hypot((yy - 128) / 100, (xx - 128) / 84)  # 1 at the head's outline
    texture = ndimage.gaussian_filter(rng.random((256, 256)), 3)
    texture = (texture - texture.mean()) / texture.std()
    pixels = np.zeros((256, 256))
    pixels[radius < 1] = ring_level * (1 + ring_noise * texture[radius < 1])
    pixels[radius < 1 - ring] = 0.1
    inside = radius < 1 - ring - gap
    pixels[inside] = brain * (1 + 0.08 * texture[inside])
    pixels[inside & (np.hypot((yy - 118) / 30, np.abs(xx - 128) / 8 - 1.5) < 1)] = 0.1
    return np.clip(pixels * 255, 0, 255).astype(np.uint8)


def ct_slice(seed: int = 0) -> np.ndarray:
    """Head CT in a brain window: a thick skull clipped to white, the brain directly inside it."""
    return head_slice(ring=0.09, ring_level=1.2, ring_noise=0.1, gap=0.0, brain=0.4, seed=seed)


def mr_slice(seed: int = 0) -> np.ndarray:
    """T1 MR: a thin uneven scalp-fat ring, dark bone and CSF under it, then brain."""
    return head_slice(ring=0.03, ring_level=0.9, ring_noise=0.15, gap=0.04, brain=0.5, seed=seed)


def test_real_head_ct_reads_as_ct_and_real_brain_mr_as_mr():
    from nilearn.datasets import load_mni152_template

    phantom = shepp_logan_phantom()  # the CT head phantom: skull, brain, ventricles
    assert modality_of(window(phantom, 0, phantom.max())).modality == "ct"
    ct = dcmread(get_testdata_file("CT_small.dcm", download=False))
    assert modality_of(window(apply_modality_lut(ct.pixel_array, ct), 0, 80)).modality == "ct"
    template = np.asarray(load_mni152_template().dataobj, dtype=np.float32)  # T1 MR, skull stripped or not
    for z in range(60, 140, 10):
        plane = np.rot90(template[:, :, z])
        assert modality_of(window(plane, 0, np.percentile(plane, 99.5))).modality == "mr", z
    mr = dcmread(get_testdata_file("MR_small.dcm", download=False))
    assert modality_of(window(mr.pixel_array, 0, mr.pixel_array.max())).modality == "mr"


def test_each_piece_of_a_skull_s_evidence_decides():
    assert modality_of(ct_slice()).modality == "ct"
    assert modality_of(mr_slice()).modality == "mr"
    thin_skull = head_slice(ring=0.015, ring_level=1.2, ring_noise=0.1, gap=0.0, brain=0.4)
    assert modality_of(thin_skull).modality == "mr"  # a thin bright rim is scalp fat
    uneven_with_dark_band = head_slice(ring=0.09, ring_level=0.9, ring_noise=0.15, gap=0.04, brain=0.4)
    assert modality_of(uneven_with_dark_band).modality == "mr"  # thick fat, but bone and CSF show dark under it
    open_ring = ct_slice()
    open_ring[:128] = np.where(open_ring[:128] > 200, 100, open_ring[:128])  # a skull round half the head
    assert modality_of(open_ring).modality == "mr"
    framed = mr_slice()
    framed[:, :40] = framed[:, -40:] = 255  # white bars beside the slice are no skull
    assert modality_of(framed).modality == "mr"
    answer = modality_of(ct_slice(seed=3))
    assert answer.ring_cover == 1.0 and answer.ring_thickness > 0.05 and answer.ring_spread < 0.035
    assert "head radii" in answer.evidence()


def test_the_serving_path_answers_as_the_full_check_and_skips_measuring_what_cannot_make_a_skull():
    from nilearn.datasets import load_mni152_template

    phantom = shepp_logan_phantom()
    template = np.asarray(load_mni152_template().dataobj, dtype=np.float32)
    open_ring = ct_slice()
    open_ring[:128] = np.where(open_ring[:128] > 200, 100, open_ring[:128])
    slices = [window(phantom, 0, phantom.max()), ct_slice(), ct_slice(seed=3), mr_slice(), open_ring]
    slices += [head_slice(ring=0.09, ring_level=0.9, ring_noise=0.15, gap=0.04, brain=0.4)]  # thick, dark band
    slices += [window(np.rot90(template[:, :, z]), 0, np.percentile(template[:, :, z], 99.5)) for z in (70, 100)]
    for k, pixels in enumerate(slices):
        full, quick = modality_of(pixels), modality_of(pixels, evidence=False)
        assert quick.modality == full.modality, k
        if full.modality == "ct":  # a refusal names all of its evidence
            assert quick == full
    thin_skull = head_slice(ring=0.015, ring_level=1.2, ring_noise=0.1, gap=0.0, brain=0.4)
    assert np.isnan(modality_of(thin_skull, evidence=False).inside_ring)  # the thin ring settled it
    assert not np.isnan(modality_of(thin_skull).inside_ring)


@pytest.fixture
def params():
    return local_only_params()


def review(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["image", "sha256", "modality", "reviewer"]).to_csv(path, index=False)


def test_fetch_keeps_brain_mr_lists_the_rest_and_a_reviewer_s_word_wins(in_tmp, params):
    save(in_tmp / "data/no_tumor/ct.png", ct_slice())
    save(in_tmp / "data/no_tumor/mr.png", mr_slice())
    save(in_tmp / "data/tumor/mr2.png", mr_slice(seed=2))
    save(in_tmp / "data/tumor/scan.png", brain_image(5, size=256))

    metrics = fetch(params)

    manifest = pd.read_csv("artifacts/fetch/manifest.csv", keep_default_na=False)
    assert sorted(manifest.original) == ["no_tumor/mr.png", "tumor/mr2.png", "tumor/scan.png"]
    assert set(manifest.modality) == {"mr"}
    skipped = pd.read_csv("artifacts/fetch/skipped.csv").set_index("original")
    assert skipped.loc["no_tumor/ct.png", "reason"] == "not_brain_mr"
    detail = skipped.loc["no_tumor/ct.png", "detail"]
    assert "CT by its pixels" in detail and "head radii" in detail and "fetch.modalities" in detail
    assert not (in_tmp / "artifacts/fetch/images/local/no_tumor/ct.png").exists()
    assert metrics["modality"]["images"] == {"mr": 3, "ct": 1} and metrics["modality"]["excluded"] == 1
    assert metrics["per_source"]["local"]["skipped"] == {"not_brain_mr": 1}

    # A reviewer saw the "CT" as MR (the check was wrong) and one MR file as something else: their word wins.
    digest = dict(zip(manifest.original, manifest.sha256, strict=True))
    ct_sha = hashlib.sha256((in_tmp / "data/no_tumor/ct.png").read_bytes()).hexdigest()
    review(
        in_tmp / params["fetch"]["modality_review"],
        [["local/no_tumor/ct.png", ct_sha, "mr", "A. Reviewer"], ["local/mr2", digest["tumor/mr2.png"], "other", "B."]],
    )
    metrics = fetch(params)
    manifest = pd.read_csv("artifacts/fetch/manifest.csv", keep_default_na=False).set_index("original")
    assert sorted(manifest.index) == ["no_tumor/ct.png", "no_tumor/mr.png", "tumor/scan.png"]
    assert manifest.loc["no_tumor/ct.png", "modality"] == "mr"
    skipped = pd.read_csv("artifacts/fetch/skipped.csv").set_index("original")
    assert skipped.loc["tumor/mr2.png", "detail"].startswith("OTHER, reviewed by B.")
    assert metrics["modality"]["reviewed"] == 2 and metrics["modality"]["check_overruled"] == 2

    # Kept on request: fetch.modalities lists every modality, and the manifest says which each image is.
    params["fetch"]["modalities"] = ["mr", "ct", "other"]
    (in_tmp / params["fetch"]["modality_review"]).unlink()
    fetch(params)
    manifest = pd.read_csv("artifacts/fetch/manifest.csv", keep_default_na=False).set_index("original")
    assert manifest.modality.to_dict() == {
        "no_tumor/ct.png": "ct",
        "no_tumor/mr.png": "mr",
        "tumor/mr2.png": "mr",
        "tumor/scan.png": "mr",
    }


@pytest.mark.parametrize(
    "row, message",
    [
        (["a.png", "abc", "mr", "A."], "line 2: sha256 'abc'"),
        (["a.png", "0" * 64, "xray", "A."], "line 2: modality 'xray' must be one of mr, ct, other"),
        (["a.png", "0" * 64, "ct", " "], "line 2: name the reviewer"),
    ],
)
def test_a_bad_modality_review_row_stops_fetch_before_any_work(in_tmp, params, row, message):
    save(in_tmp / "data/tumor/scan.png", mr_slice())
    review(in_tmp / params["fetch"]["modality_review"], [row])
    with pytest.raises(SourceError, match=message):
        fetch(params)
    assert not (in_tmp / "artifacts/fetch").exists()


@pytest.mark.parametrize("value", [[], ["xray"], "mr", None])
def test_fetch_modalities_is_validated(params, value):
    params["fetch"]["modalities"] = value
    with pytest.raises(ParamError, match="fetch.modalities"):
        validate_fetch(params)
