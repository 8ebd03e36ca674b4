"""IXI: a tar of tiny NIfTI volumes, written by the test and served over HTTP on loopback."""

import copy
import functools
import gzip
import http.server
import io
import tarfile
import threading

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from braintumor.errors import SourceError
from braintumor.ixi import fetch_slices
from braintumor.params import load_params
from braintumor.sources import fetch
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
    slices, skipped = fetch_slices([f"{server}/IXI-T1.tar"], out, max_subjects=3, slices_per_volume=2,
                                   planes=["axial", "coronal"], timeout_s=10)
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
