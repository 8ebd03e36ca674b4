"""The fetch stage: sources merged into one manifest, every unreadable or skipped file listed with its reason."""

import copy
import json

import pandas as pd
import pytest

from braintumor.data.fetch import fetch
from braintumor.errors import SourceError
from braintumor.params import load_params

from conftest import KAGGLE2018, KAGGLE2020, REPO, brain_image, kaggle_cache, save


@pytest.fixture
def params():
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["fetch"]["workers"] = 1
    return params


def only(params, *names):
    for name, source in params["fetch"]["sources"].items():
        source["enabled"] = name in names
    return params


def test_local_source_reads_every_mode_and_reports_bad_files(in_tmp, params):
    save(in_tmp / "data/tumor/a.png", brain_image(1), "RGBA")
    save(in_tmp / "data/glioma/patient1/b.png", brain_image(2), "I;16")
    save(in_tmp / "data/no_tumor/c.jpg", brain_image(3), "L")
    save(in_tmp / "data/no_tumor/d.png", brain_image(4), "P")
    (in_tmp / "data/meningioma").mkdir()  # an empty class folder is fine
    (in_tmp / "data/no_tumor/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (in_tmp / "data/no_tumor/notes.txt").write_text("not an image")
    (in_tmp / "data/tumor/empty.png").write_bytes(b"")
    (in_tmp / "data/.DS_Store").write_bytes(b"x")
    (in_tmp / "data/README.md").write_text("my scans")

    metrics = fetch(only(params, "local"))

    manifest = pd.read_csv("artifacts/fetch/manifest.csv", keep_default_na=False)
    by_name = manifest.set_index(manifest.path.str.rsplit("/", n=1).str[-1])
    assert sorted(by_name.index) == ["a.png", "b.png", "c.jpg", "d.png"]
    assert by_name.loc["b.png", ["label", "subtype", "mode"]].tolist() == [1, "glioma", "I;16"]
    assert by_name.loc["a.png", ["label", "subtype", "mode"]].tolist() == [1, "unknown", "RGBA"]
    assert by_name.loc["c.jpg", ["label", "subtype"]].tolist() == [0, "none"]
    assert by_name.loc["d.png", "mode"] == "P"  # the file's own mode, not what decoding converts it to
    for path in manifest.path:  # copies live in the stage output, paths relative to the repository root
        assert path.startswith("artifacts/fetch/images/local/") and (in_tmp / path).is_file()
    skipped = pd.read_csv("artifacts/fetch/skipped.csv")
    reasons = dict(zip(skipped.original.str.rsplit("/", n=1).str[-1], skipped.reason, strict=True))
    assert reasons == {
        "corrupt.jpg": "truncated_or_corrupt",
        "notes.txt": "not_an_image",
        "empty.png": "empty_file",
        ".DS_Store": "hidden_file",
        "README.md": "not_in_class_folder",
    }
    on_disk = json.loads((in_tmp / "metrics/fetch.json").read_text())
    assert on_disk == metrics
    assert metrics["per_source"]["local"] == {
        "images": 4,
        "tumor": 2,
        "no_tumor": 2,
        "skipped": {
            "hidden_file": 1,
            "not_in_class_folder": 1,
            "truncated_or_corrupt": 1,
            "not_an_image": 1,
            "empty_file": 1,
        },
    }


def test_misnamed_class_folder_is_an_error_that_names_it(in_tmp, params):
    save(in_tmp / "data/tumour/a.png", brain_image(1))
    with pytest.raises(SourceError, match="data/tumour: unknown class folder"):
        fetch(only(params, "local"))
    assert not (in_tmp / "artifacts/fetch").exists()


def test_kaggle_sources_through_kagglehub_cache(in_tmp, params, monkeypatch):
    scans = {i: save(in_tmp / f"src/{i}.jpg", brain_image(i), "RGB") for i in range(4)}
    cache = in_tmp / "cache"
    kaggle_cache(
        cache,
        KAGGLE2018,
        {
            "yes/Y1.jpg": scans[0],
            "no/N1.jpg": scans[1],
            "brain_tumor_dataset/yes/Y1.jpg": scans[0],
            "brain_tumor_dataset/no/N1.jpg": scans[1],
        },
    )
    kaggle_cache(cache, KAGGLE2020, {"Training/pituitary_tumor/p.jpg": scans[2], "Testing/no_tumor/n.jpg": scans[3]})
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))

    fetch(only(params, "kaggle2018", "kaggle2020"))

    manifest = pd.read_csv("artifacts/fetch/manifest.csv", keep_default_na=False)
    assert len(manifest) == 6  # both copies of the 2018 set are kept; dedup removes them
    assert manifest.groupby("source").size().to_dict() == {"kaggle2018": 4, "kaggle2020": 2}
    pituitary = manifest[manifest.original == "Training/pituitary_tumor/p.jpg"].iloc[0]
    assert (pituitary.label, pituitary.subtype) == (1, "pituitary")
    assert manifest.sha256.nunique() == 4


def test_unreachable_kaggle_dataset_names_the_param_and_leaves_nothing(in_tmp, params, monkeypatch):
    """The download fails as it does offline or behind a firewall, whatever this machine can reach."""
    import kagglehub

    def unreachable(handle, *args, **kwargs):
        raise ConnectionError(f"Failed to resolve 'www.kaggle.com' while fetching {handle}")

    monkeypatch.setattr(kagglehub, "dataset_download", unreachable)
    with pytest.raises(SourceError, match=r"fetch\.sources\.kaggle2020\.enabled: false") as err:
        fetch(only(params, "kaggle2020"))
    assert "ConnectionError" in str(err.value) and "KAGGLEHUB_CACHE" in str(err.value)
    assert not (in_tmp / "artifacts/fetch").exists()


def test_missing_local_folder(in_tmp, params):
    with pytest.raises(SourceError, match="fetch.sources.local: folder data does not exist"):
        fetch(only(params, "local"))
