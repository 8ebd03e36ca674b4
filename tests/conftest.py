"""Shared fixtures: synthetic brain-like images and a copy of a small subset of the real Kaggle mirror."""

from __future__ import annotations

import copy
import io
import shutil
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
SHARED_KAGGLE = REPO.parent / "shared" / "kagglehub"
KAGGLE2018 = "navoneel/brain-mri-images-for-brain-tumor-detection/versions/1"
KAGGLE2020 = "sartajbhuvaji/brain-tumor-classification-mri/versions/2"

pytest_plugins = ["fixtures.servers"]  # MLflow server and trained-state fixtures
# Tests that use these start a server (MLflow's, or test_ixi's HTTP servers) or train models first:
# `make test-fast` leaves them out.
SLOW_FIXTURES = {"mlflow_server", "trained_states", "server", "slow_server"}


def pytest_collection_modifyitems(items):
    """Mark `slow` every test that reads the real mirror or needs a server or trained states."""
    for item in items:
        if "real_data" in item.keywords or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def model_cache(tmp_path_factory, monkeypatch) -> Iterator[Path]:
    """Each test pulls registered models into a cache of its own, never the user's `~/.cache`, and leaves the
    registry variables as it found them: MLflow's `set_tracking_uri` and `set_registry_uri` write theirs into
    `os.environ`, where the next test would find another test's server."""
    import os

    from braintumor.registry.pull import CACHE_ENV

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])  # recorded: restored after the test
        else:
            monkeypatch.setenv(name, "")  # recorded as absent: removed again after the test
            monkeypatch.delenv(name)
    folder = tmp_path_factory.mktemp("model-cache")
    monkeypatch.setenv(CACHE_ENV, str(folder))
    yield folder
    # ... and in MLflow's own globals, which win over the variables: a test that registered in-process (`configure`
    # calls `set_tracking_uri`) left the next test of its worker talking to its server
    tracking = sys.modules.get("mlflow.tracking._tracking_service.utils")
    registry = sys.modules.get("mlflow.tracking._model_registry.utils")
    if tracking is not None:
        tracking._tracking_uri = None
    if registry is not None:
        registry._registry_uri = None


def brain_image(seed: int, size: int = 96) -> np.ndarray:
    """A dark frame with a bright textured ellipse: distinct seeds give images that no hash confuses."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = 0.5 + rng.uniform(-0.05, 0.05, 2)
    head = ((yy - cy) / 0.38) ** 2 + ((xx - cx) / 0.32) ** 2 < 1
    texture = ndimage.gaussian_filter(rng.random((size, size)), sigma=size / 16)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    return np.where(head, 60 + 190 * texture, 0).astype(np.uint8)


def local_only_params() -> dict:
    """The shipped params with only the local `data/` source on, and one worker: a fetch the tests can feed."""
    from braintumor.params import load_params

    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["fetch"]["workers"] = 1
    for name, source in params["fetch"]["sources"].items():
        source["enabled"] = name == "local"
    return params


def save(path: Path, pixels: np.ndarray, mode: str = "L", fmt: str | None = None) -> Path:
    """Write `pixels` (grayscale uint8) as an image of `mode`, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(pixels)
    if mode == "I;16":
        img = Image.fromarray(pixels.astype(np.uint16) * 257)
    elif mode != "L":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def png_bytes(pixels: np.ndarray, mode: str = "L") -> bytes:
    """`pixels` as a PNG file's bytes, in `mode`: what a client uploads."""
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format="PNG")
    return out.getvalue()


def kaggle_cache(root: Path, handle: str, files: dict[str, Path]) -> Path:
    """A kagglehub cache (the layout kagglehub writes) holding `files` (relative name -> source file)."""
    owner, name, _, version = handle.split("/")
    base = root / "datasets" / owner / name
    for rel, src in files.items():
        target = base / "versions" / version / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    (base / f"{version}.complete").touch()
    return root


def real_subset(per_folder: int) -> dict[str, dict[str, Path]]:
    """The first `per_folder` files of every class folder of both real Kaggle datasets."""
    if not SHARED_KAGGLE.is_dir():
        pytest.skip(f"real Kaggle mirror not found at {SHARED_KAGGLE}")
    subset = {}
    for handle in (KAGGLE2018, KAGGLE2020):
        root = SHARED_KAGGLE / "datasets" / handle
        files = {}
        for folder in sorted({p.parent for p in root.rglob("*") if p.is_file()}):
            for path in sorted(folder.iterdir())[:per_folder]:
                files[str(path.relative_to(root))] = path
        subset[handle] = files
    return subset


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# An EPS file: Pillow would hand it to Ghostscript to decode; the project must refuse it first.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def bomb_png(side: int) -> bytes:
    """A valid 16-bit grayscale PNG of side x side zero pixels: a few hundred KB that decode to gigabytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([16, 0, 0, 0, 0])  # 16-bit grayscale
    rows = zlib.compress(b"\0" * ((2 * side + 1) * side), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
