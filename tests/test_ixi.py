"""IXI: a tar of tiny NIfTI volumes, written by the test and served over HTTP on loopback."""

import copy
import functools
import gzip
import http.server
import io
import tarfile
import threading
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from braintumor.data.fetch import fetch
from braintumor.data.ixi import fetch_slices
from braintumor.errors import SourceError
from braintumor.params import load_params

from conftest import REPO


def tiny_volume(seed: int, shape=(24, 28, 20)) -> bytes:
    """A gzipped NIfTI volume: an ellipsoid 'brain' with texture inside a dark field."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = ((grid / np.array([0.8, 0.85, 0.7])[:, None, None, None]) ** 2).sum(0) < 1
    data = np.where(inside, 400 + 300 * rng.random(shape), 5 * rng.random(shape)).astype(np.int16)
    return gzip.compress(nib.Nifti1Image(data, np.diag([1.2, 1.0, 1.5, 1.0])).to_bytes())


def make_tar(path, subjects: int, corrupt: str | None = None):
    with tarfile.open(path, "w") as tar:
        for i in range(subjects):
            name = f"IXI{100 + i:03d}-Guys-{i:04d}-T1.nii.gz"
            payload = b"\x1f\x8bnot really gzip" if name.startswith(corrupt or "?") else tiny_volume(i)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def server(tmp_path):
    """A static file server for tmp_path on 127.0.0.1; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_streams_only_max_subjects_and_writes_brain_slices(tmp_path, server):
    make_tar(tmp_path / "IXI-T1.tar", subjects=5)
    out = tmp_path / "slices"
    slices, skipped = fetch_slices(
        [f"{server}/IXI-T1.tar"], out, max_subjects=3, slices_per_volume=2, planes=["axial", "coronal"], timeout_s=10
    )
    assert skipped == []
    assert sorted({s.subject for s in slices}) == ["IXI100", "IXI101", "IXI102"]
    assert len(slices) == 3 * 2 * 2
    for s in slices:
        pixels = np.asarray(Image.open(out / s.name))
        assert pixels.dtype == np.uint8 and pixels.max() >= 200  # windowed to (almost) the full 8-bit range
        # taken from the part of the volume with brain: at least half the central cross-section (~53%)
        assert (pixels > 20).mean() > 0.25


def test_corrupt_volume_is_skipped_and_reported(tmp_path, server):
    make_tar(tmp_path / "IXI-T1.tar", subjects=3, corrupt="IXI101")
    slices, skipped = fetch_slices([f"{server}/IXI-T1.tar"], tmp_path / "s", 3, 1, ["axial"], 10)
    assert sorted({s.subject for s in slices}) == ["IXI100", "IXI102"]
    assert len(skipped) == 1 and "IXI101" in skipped[0][0] and skipped[0][1] == "unreadable_volume"


def ixi_only(params, url):
    params = copy.deepcopy(params)
    for name, source in params["fetch"]["sources"].items():
        source["enabled"] = name == "ixi"
    params["fetch"]["sources"]["ixi"].update(urls=[url], max_subjects=2, slices_per_volume=3, planes=["axial"])
    params["fetch"]["workers"] = 1
    return params


def test_fetch_stage_labels_ixi_healthy_grouped_by_subject(tmp_path, server, monkeypatch):
    make_tar(tmp_path / "IXI-T1.tar", subjects=4)
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    metrics = fetch(ixi_only(load_params(REPO / "params.yaml"), f"{server}/IXI-T1.tar"))
    manifest = pd.read_csv("artifacts/fetch/manifest.csv", keep_default_na=False)
    assert metrics["per_source"]["ixi"]["images"] == len(manifest) == 6
    assert set(manifest.label) == {0} and set(manifest.subtype) == {"none"}
    assert manifest.groupby("group").size().to_dict() == {"IXI100": 3, "IXI101": 3}
    assert all((repo / p).is_file() for p in manifest.path)
    assert not (repo / "artifacts/fetch/ixi-slices").exists()


def test_failed_download_names_url_and_param_and_leaves_no_output(tmp_path, server, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    url = f"{server}/missing/IXI-T1.tar"
    with pytest.raises(SourceError) as err:
        fetch(ixi_only(load_params(REPO / "params.yaml"), url))
    assert url in str(err.value) and "fetch.sources.ixi.enabled: false" in str(err.value)
    assert not (repo / "artifacts").exists() or not any((repo / "artifacts").iterdir())
    assert not (repo / "metrics").exists()


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_bad_volumes_are_skipped_each_with_its_reason(tmp_path, server, monkeypatch):
    """A bad gzip body, a bad NIfTI header and a gzip bomb each cost one volume, never the whole fetch."""
    from braintumor.data import volumes

    monkeypatch.setattr(volumes, "MAX_VOLUME_BYTES", 1 << 20)  # so that the bomb stays small in the test
    good = tiny_volume(1)
    with tarfile.open(tmp_path / "IXI-T1.tar", "w") as tar:
        add_member(tar, "IXI200-HH-0001-T1.nii.gz", good[:40] + bytes(len(good) - 40))  # body zeroed
        add_member(tar, "IXI201-HH-0002-T1.nii.gz", gzip.compress(b"\x00" * 348))  # no valid header
        add_member(tar, "IXI202-HH-0003-T1.nii.gz", gzip.compress(b"\x00" * (4 << 20)))  # 4 MB out of 4 KB
        add_member(tar, "IXI203-HH-0004-T1.nii.gz", good)
    slices, skipped = fetch_slices([f"{server}/IXI-T1.tar"], tmp_path / "s", 10, 1, ["axial"], 10)
    reasons = {original.rsplit("#", 1)[1][:6]: reason for original, reason, _ in skipped}
    assert reasons == {"IXI200": "unreadable_volume", "IXI201": "unreadable_volume", "IXI202": "volume_too_large"}
    assert {s.subject for s in slices} == {"IXI203"}


def test_two_volumes_with_one_name_keep_both_slices(tmp_path, server):
    """The same member name in two tars (or two folders) must not overwrite the other's slices."""
    for tar_name, seed in (("a.tar", 1), ("b.tar", 2)):
        with tarfile.open(tmp_path / tar_name, "w") as tar:
            add_member(tar, "IXI300-IOP-0001-T1.nii.gz", tiny_volume(seed))
    out = tmp_path / "s"
    slices, _ = fetch_slices([f"{server}/a.tar", f"{server}/b.tar"], out, 5, 2, ["axial"], 10)
    files = [out / s.name for s in slices]
    assert len(files) == 4 and len(set(files)) == 4
    assert all(f.parent.name == "IXI300" for f in files)  # grouped by subject on disk too
    first, second = (np.asarray(Image.open(f)) for f in files[::2])
    assert not np.array_equal(first, second)


@pytest.fixture
def slow_server(tmp_path):
    """Serves tmp_path on loopback at about 200 KB/s; yields its URL and the count of bytes it sent."""
    sent = [0]

    class Slow(http.server.SimpleHTTPRequestHandler):
        def copyfile(self, source, outputfile):
            while chunk := source.read(20_000):
                outputfile.write(chunk)
                sent[0] += len(chunk)
                time.sleep(0.1)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Slow, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", sent
    httpd.shutdown()


def test_the_deadline_bounds_the_whole_download(tmp_path, slow_server):
    """Every read is quick (so the per-read timeout never fires), but the download as a whole is too slow."""
    with tarfile.open(tmp_path / "IXI-T1.tar", "w") as tar:
        add_member(tar, "IXI400-HH-0001-T1.nii.gz", np.random.default_rng(0).bytes(1_000_000))
    url, sent = slow_server
    with pytest.raises(SourceError, match="fetch.sources.ixi.deadline_s"):
        fetch_slices([f"{url}/IXI-T1.tar"], tmp_path / "s", 5, 1, ["axial"], timeout_s=10, deadline_s=1)
    time.sleep(0.5)  # the server notices the closed connection at its next write
    assert sent[0] < 0.6 * (tmp_path / "IXI-T1.tar").stat().st_size  # given up part-way, not read to the end


def test_real_anatomy_gives_windowed_brain_slices_per_subject(tmp_path, server):
    """The MNI152 T1 template (shipped inside nilearn's wheel) packed under IXI's naming: the slices taken must
    show brain, not the empty edges of the volume."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    payload = gzip.compress(nib.Nifti1Image(np.asarray(template.dataobj, dtype=np.float32), template.affine).to_bytes())
    with tarfile.open(tmp_path / "IXI-T1.tar", "w") as tar:
        add_member(tar, "IXI500-Guys-0001-T1.nii.gz", payload)
        add_member(tar, "IXI501-HH-0002-T1.nii.gz", payload)
    out = tmp_path / "s"
    slices, skipped = fetch_slices([f"{server}/IXI-T1.tar"], out, 5, 3, ["axial", "coronal", "sagittal"], 10)
    assert skipped == []
    assert {s.subject for s in slices} == {"IXI500", "IXI501"} and len(slices) == 2 * 3 * 3
    for s in slices:
        pixels = np.asarray(Image.open(out / s.name))
        assert pixels.dtype == np.uint8 and pixels.max() >= 200
        brain = pixels > 0.2 * pixels.max()
        assert brain.mean() > 0.15, f"{s.name}: {brain.mean():.2f} of the slice is brain"
        rows, cols = np.flatnonzero(brain.any(1)), np.flatnonzero(brain.any(0))
        assert rows.size > 0.4 * pixels.shape[0] and cols.size > 0.4 * pixels.shape[1]  # a head, not a sliver
