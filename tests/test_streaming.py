"""`train.loader: stream`: images read from the split's memory-mapped files a batch at a time."""

import numpy as np
import pytest

from braintumor.data.datasets import SplitImages, load_split, split_images
from braintumor.model.inference import tumor_probability
from braintumor.model.train import Batches, cross_validation_pool, fit, train

from fixtures.split import make_split, tiny_params


def test_split_images_read_what_the_eager_arrays_hold(tmp_path):
    split = make_split(tmp_path / "split", size=32)
    eager = cross_validation_pool(split, "binary")
    lazy = cross_validation_pool(split, "binary", lazy=True)
    assert isinstance(lazy["x"], SplitImages) and lazy["x"].shape == eager["x"].shape
    assert isinstance(split_images(split, "train"), np.memmap)
    rows = np.random.default_rng(0).permutation(len(eager["x"]))[:50]  # across both files, unsorted
    assert np.array_equal(np.asarray(lazy["x"][rows]), eager["x"][rows])
    mask = eager["label"] == 1
    assert np.array_equal(np.asarray(lazy["x"][mask][3:9], dtype="float32"), eager["x"][mask][3:9].astype("float32"))
    for key in ("y", "path", "group", "representative"):
        assert np.array_equal(lazy[key], eager[key])


def test_batches_cover_every_image_once_an_epoch_in_a_seeded_order():
    images = np.arange(10 * 4 * 4 * 3, dtype=np.uint8).reshape(10, 4, 4, 3)
    targets, weights = np.arange(10), np.linspace(0.5, 1.5, 10)
    batches = Batches(images, targets, weights, batch_size=4, seed=1)
    assert len(batches) == 3
    epochs = []
    for _ in range(2):
        seen = [batches[i] for i in range(len(batches))]
        for x, y, w in seen:
            assert x.dtype == np.float32 and np.array_equal(x, images[y].astype("float32"))
            assert w == pytest.approx(weights[y])
        epochs.append(np.concatenate([y for _, y, _ in seen]))
        batches.on_epoch_end()
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10)) and not np.array_equal(epochs[0], epochs[1])
    again = Batches(images, targets, weights, batch_size=4, seed=1)
    assert np.array_equal(np.concatenate([again[i][1] for i in range(3)]), epochs[0])
    held_out = Batches(images, targets, None, batch_size=4)  # no seed: the same order every epoch, no weights
    assert len(held_out[0]) == 2 and np.array_equal(held_out[2][1], [8, 9])


@pytest.mark.slow  # two trainings
def test_a_model_fed_from_the_files_learns_as_one_fed_from_arrays(tmp_path):
    split = make_split(tmp_path / "split")
    test = load_split(split, "test", "binary")
    accuracy = {}
    for loader in ("arrays", "stream"):
        params = tiny_params("seed_cnn", epochs=12, early_stopping_patience=12, loader=loader)
        data = [load_split(split, name, "binary", lazy=loader == "stream") for name in ("train", "val")]
        model, _ = fit(params, *data, verbose=0)
        p = tumor_probability(model, test["x"], ["no_tumor", "tumor"])
        accuracy[loader] = ((p >= 0.5) == test["y"]).mean()
    assert accuracy["stream"] >= 0.85 and accuracy["arrays"] >= 0.85


def test_prediction_in_chunks_equals_one_call(tmp_path, monkeypatch):
    split = make_split(tmp_path / "split", size=32)
    params = tiny_params("seed_fsm", epochs=1)
    params["split"]["image_size"] = 32
    model, _ = fit(params, load_split(split, "train", "binary"), load_split(split, "val", "binary"), verbose=0)
    x = load_split(split, "train", "binary")["x"]
    whole = tumor_probability(model, x, ["no_tumor", "tumor"], batch_size=16)
    monkeypatch.setattr("braintumor.model.outputs.PREDICT_CHUNK", 32)  # 96 images: 3 chunks of 2 batches
    assert np.array_equal(tumor_probability(model, x, ["no_tumor", "tumor"], batch_size=16), whole)
    lazy = load_split(split, "train", "binary", lazy=True)["x"]
    assert np.array_equal(tumor_probability(model, lazy, ["no_tumor", "tumor"], batch_size=16), whole)


@pytest.mark.slow  # a two-fold training
def test_the_train_stage_streams_folds_with_members_and_the_subtype_head(in_tmp):
    make_split(in_tmp / "artifacts/split", size=32, members=6)
    params = tiny_params("seed_fsm", epochs=1, loader="stream", subtypes=True, member_weight="cluster")
    params["split"]["image_size"] = 32
    metrics = train(params)
    pool = cross_validation_pool(in_tmp / "artifacts/split", "binary")
    with np.load(in_tmp / "artifacts/train/oof.npz") as oof:
        assert sorted(oof["path"]) == sorted(pool["path"][pool["representative"]])
        assert np.isfinite(oof["probability"]).all()
    assert metrics["folds"] == 2
