"""Bad files and odd folder entries: each becomes a row naming it and why, and none stops a later stage."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from braintumor.data import images
from braintumor.data.dedup import dedup
from braintumor.data.fetch import fetch
from braintumor.data.images import open_image
from braintumor.errors import ImageReadError
from braintumor.serve.predict import image_files

from conftest import EPS, bomb_png, brain_image, local_only_params, save


@pytest.fixture
def params():
    return local_only_params()


def skipped_reasons() -> dict[str, tuple[str, str]]:
    table = pd.read_csv("artifacts/fetch/skipped.csv", keep_default_na=False)
    return {
        original.rsplit("/", 1)[-1]: (reason, detail)
        for original, reason, detail in table[["original", "reason", "detail"]].itertuples(index=False)
    }


def test_bad_files_are_recorded_and_the_later_stages_still_run(in_tmp, params):
    for k in range(3):
        save(in_tmp / f"data/tumor/ok{k}.png", brain_image(k))
    Image.fromarray(brain_image(7)).convert("LAB").save(in_tmp / "data/tumor/lab.tif")  # dedup crashed on it
    (in_tmp / "data/no_tumor/bomb.png").parent.mkdir(parents=True)
    (in_tmp / "data/no_tumor/bomb.png").write_bytes(bomb_png(10_000))
    (in_tmp / "data/no_tumor/poster.jpg").write_bytes(EPS)  # Pillow would hand it to Ghostscript
    (in_tmp / "data/no_tumor/garbage.jpg").write_bytes(b"\x00\x01 definitely not an image " * 10)
    save(in_tmp / "data/no_tumor/ok.png", brain_image(9))
    odd_name = os.fsencode(in_tmp / "data/no_tumor") + b"/scan-\xff\xfe.png"
    with open(odd_name, "wb") as out:
        out.write((in_tmp / "data/no_tumor/ok.png").read_bytes())

    metrics = fetch(params)

    reasons = skipped_reasons()
    assert reasons["bomb.png"][0] == "too_large" and "10000 x 10000" in reasons["bomb.png"][1]
    kind, detail = reasons["poster.jpg"]  # names what the file is and what would be read instead
    assert kind == "unsupported_format" and "EPS" in detail and all(f in detail for f in ("JPEG", "PNG"))
    assert reasons["garbage.jpg"][0] == "not_an_image" and "BytesIO" not in reasons["garbage.jpg"][1]
    assert reasons["scan-\\xff\\xfe.png"][0] == "file_name_not_utf8"
    manifest = pd.read_csv("artifacts/fetch/manifest.csv", keep_default_na=False)
    assert sorted(manifest.path.str.rsplit("/", n=1).str[-1]) == ["lab.tif", "ok.png", "ok0.png", "ok1.png", "ok2.png"]
    assert metrics["skipped"] == 4
    result = dedup(params)  # the LAB image stopped this stage before
    assert result["images_out"] == 5 and result["unreadable"] == 0


def test_pixels_a_later_step_cannot_use_are_a_skipped_row(in_tmp, params, monkeypatch):
    save(in_tmp / "data/tumor/good.png", brain_image(1))
    save(in_tmp / "data/tumor/odd.png", brain_image(2))
    real = images.to_grayscale

    def fails_on_odd(img):
        if img.getpixel((48, 48)) == brain_image(2)[48, 48]:
            raise ValueError("image mode X has no grayscale conversion")
        return real(img)

    monkeypatch.setattr(images, "to_grayscale", fails_on_odd)
    fetch(params)
    kind, detail = skipped_reasons()["odd.png"]  # the reason code, and the failure itself for whoever fixes it
    assert kind == "unusable_pixels" and "image mode X has no grayscale conversion" in detail


def test_links_fifos_and_unlistable_folders_each_get_a_row(in_tmp, params, tmp_path_factory, monkeypatch):
    outside = tmp_path_factory.mktemp("outside")
    save(outside / "linked.png", brain_image(3))
    save(in_tmp / "data/tumor/a.png", brain_image(1))
    (in_tmp / "data/tumor/link").symlink_to(outside, target_is_directory=True)  # followed
    (in_tmp / "data/tumor/same").symlink_to(outside, target_is_directory=True)  # the same folder again
    (in_tmp / "data/tumor/loop").symlink_to(in_tmp / "data/tumor", target_is_directory=True)
    (in_tmp / "data/tumor/gone.png").symlink_to(in_tmp / "nowhere.png")
    os.mkfifo(in_tmp / "data/tumor/pipe.png")
    save(in_tmp / "data/no_tumor/locked/b.png", brain_image(2))
    real_scandir = os.scandir

    def refuses_locked(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refuses_locked)  # root can read any folder, so refuse one here
    fetch(params)

    reasons = {name: reason for name, (reason, _) in skipped_reasons().items()}
    assert reasons == {
        "same": "linked_folder_read_already",
        "loop": "linked_folder_read_already",
        "gone.png": "broken_link",
        "pipe.png": "not_a_file",
        "locked": "unreadable_folder",
    }
    manifest = pd.read_csv("artifacts/fetch/manifest.csv", keep_default_na=False)
    assert sorted(manifest.original) == ["tumor/a.png", "tumor/link/linked.png"]


def test_open_image_refuses_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(10_000))
    with pytest.raises(ImageReadError) as err:
        open_image(bomb)
    assert err.value.reason == "too_large"
    small = save(tmp_path / "small.png", brain_image(1))
    with pytest.raises(ImageReadError, match="too_large"):
        open_image(small, max_pixels=96 * 96 - 1)
    assert open_image(small, max_pixels=96 * 96).size == (96, 96)


def test_sixteen_bit_conversion_stays_in_small_types(tmp_path):
    wide = np.linspace(0, 65535, 256 * 256).reshape(256, 256).astype(np.uint16)
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    gray = images.to_grayscale(open_image(path))
    assert gray.dtype == np.uint8 and gray.min() == 0 and gray.max() == 255
    assert np.abs(gray.astype(int) - np.round(wide / 257.0)).max() <= 1


def test_predict_lists_every_file_of_a_folder(tmp_path):
    save(tmp_path / "scans/a.png", brain_image(1))
    (tmp_path / "scans/notes.txt").write_text("x")
    (tmp_path / "scans/.hidden.png").write_bytes(b"x")
    found = [p.name for p in image_files([str(tmp_path / "scans")])]
    assert found == [".hidden.png", "a.png", "notes.txt"]  # each gets a result, an error for the odd ones
