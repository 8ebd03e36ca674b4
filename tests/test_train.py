"""The train stage: sample weights, cross-validated folds, the averaged ensemble and other Keras backends."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from braintumor.data.datasets import load_split
from braintumor.data.styles import style_clusters
from braintumor.labels import MULTICLASS_CLASSES, collection_of
from braintumor.model.inference import load_model, members_of, mirror, tumor_probability
from braintumor.model.train import (
    compile_model,
    cross_validation_pool,
    fit,
    folds_of,
    sample_weights,
    subtype_crossentropy,
    subtype_targets,
    train,
)
from braintumor.quality.evaluate import binary_metrics, evaluate, threshold_for_recall

from conftest import REPO
from fixtures.split import make_split, tiny_params


def test_sample_weights_balance_classes_or_each_source_s_classes():
    # source a: 10 healthy, 30 tumor; source b: 4 healthy, 6 tumor
    y = np.array([0] * 10 + [1] * 30 + [0] * 4 + [1] * 6)
    data = {"y": y, "source": np.array(["a"] * 40 + ["b"] * 10)}
    names = ["no_tumor", "tumor"]

    weights, strata = sample_weights(data, names, "balanced")
    assert weights[y == 0].sum() == pytest.approx(weights[y == 1].sum())
    assert weights.sum() == pytest.approx(len(y)) and set(strata) == {"no_tumor", "tumor"}

    weights, strata = sample_weights(data, names, "balanced_by_source")
    totals = [weights[(data["source"] == s) & (y == c)].sum() for s in "ab" for c in (0, 1)]
    assert totals == pytest.approx([len(y) / 4] * 4)
    assert strata == pytest.approx(
        {"a/no_tumor": 50 / 40, "a/tumor": 50 / 120, "b/no_tumor": 50 / 16, "b/tumor": 50 / 24}, abs=1e-4
    )  # reported to 4 decimals

    assert sample_weights(data, names, "none") == (None, {})


def test_sample_weights_by_collection_balance_each_folder_of_a_source():
    # source a: collection Training 10 healthy / 30 tumor, Testing 5 / 5; source b (no collections): 4 / 6
    y = np.array([0] * 10 + [1] * 30 + [0] * 5 + [1] * 5 + [0] * 4 + [1] * 6)
    data = {
        "y": y,
        "source": np.array(["a"] * 50 + ["b"] * 10),
        "collection": np.array(["Training"] * 40 + ["Testing"] * 10 + [""] * 10, dtype=object),
    }
    weights, strata = sample_weights(data, ["no_tumor", "tumor"], "balanced_by_collection")
    assert set(strata) == {
        "a/Training/no_tumor",
        "a/Training/tumor",
        "a/Testing/no_tumor",
        "a/Testing/tumor",
        "b/no_tumor",
        "b/tumor",
    }
    keys = np.array([f"{s}/{c}/{k}" for s, c, k in zip(data["source"], data["collection"], y, strict=True)])
    totals = [weights[keys == key].sum() for key in np.unique(keys)]
    assert totals == pytest.approx([len(y) / 6] * 6)
    assert strata["a/Testing/no_tumor"] == pytest.approx(60 / 30, abs=1e-4)


def test_a_site_s_few_scans_weigh_as_scans_not_as_a_whole_source():
    # the pool: source a, 30 healthy / 60 tumor; a new site's first verdicts: 2 healthy, 8 tumor
    y = np.array([0] * 30 + [1] * 60 + [0] * 2 + [1] * 8)
    data = {"y": y, "source": np.array(["a"] * 90 + ["local"] * 10)}
    names = ["no_tumor", "tumor"]
    whole, _ = sample_weights(data, names, "balanced_by_source")
    floored, strata = sample_weights(data, names, "balanced_by_source", full_weight_images=25)
    site = data["source"] == "local"
    assert whole[site & (y == 0)].sum() == pytest.approx(whole[~site & (y == 0)].sum())  # 2 scans = 30 scans
    assert floored[site & (y == 0)].sum() == pytest.approx(whole[~site & (y == 0)].sum() * 2 / 25)
    assert floored[site & (y == 1)].sum() == pytest.approx(whole[~site & (y == 1)].sum() * 8 / 25)
    assert np.array_equal(floored[~site], whole[~site])  # strata of 25 or more: the very same weights
    assert strata["local/no_tumor"] == pytest.approx(strata["a/no_tumor"] * 30 / 25, abs=1e-4)
    # a site that has grown to 25 of each class weighs as a source again
    y = np.array([0] * 30 + [1] * 60 + [0] * 25 + [1] * 25)
    data = {"y": y, "source": np.array(["a"] * 90 + ["local"] * 50)}
    grown = sample_weights(data, names, "balanced_by_source", full_weight_images=25)[0]
    assert np.array_equal(grown, sample_weights(data, names, "balanced_by_source")[0])


def views(count: int, tall: bool, seed: int) -> np.ndarray:
    """Heads of one look: a round one (an axial slice) or a tall narrow one (a sagittal slice's outline)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :48] / 48
    shape = ((yy - 0.5) / 0.45) ** 2 + ((xx - 0.5) / (0.2 if tall else 0.4)) ** 2 < 1
    images = shape[None] * rng.uniform(90, 200, (count, 48, 48))
    return np.repeat(images[..., None], 3, axis=3).astype(np.uint8)


def test_styles_separate_looks_and_balancing_by_style_evens_each_look_s_classes():
    # 40 round heads (30 healthy, 10 tumor) and 40 tall ones (5 healthy, 35 tumor): the look predicts the class
    x = np.concatenate([views(40, False, 0), views(40, True, 1)])
    y = np.array([0] * 30 + [1] * 10 + [0] * 5 + [1] * 35)
    look = np.array([0] * 40 + [1] * 40)
    two = style_clusters(x, seed=0, styles=2)
    assert all(len(set(two[look == k])) == 1 for k in (0, 1)) and two[0] != two[-1]
    styles = style_clusters(x, seed=0)  # the default count splits the looks further, never mixes them
    assert not set(styles[look == 0]) & set(styles[look == 1])
    data = {"x": x, "y": y, "source": np.array(["a"] * 80)}
    weights, strata = sample_weights(data, ["no_tumor", "tumor"], "balanced_by_style")
    totals = {(k, c): weights[(styles == k) & (y == c)].sum() for k in set(styles) for c in (0, 1)}
    present = [total for total in totals.values() if total > 0]
    assert present == pytest.approx([len(y) / len(strata)] * len(strata))  # every (style, class) alike
    assert len(strata) == len(present) and weights.sum() == pytest.approx(len(y))


@pytest.mark.parametrize(
    "source, original, collection",
    [
        ("kaggle2020", "Training/glioma_tumor/gg (1).jpg", "Training"),
        ("kaggle2020", "Testing/no_tumor/image(3).jpg", "Testing"),
        ("kaggle2018", "brain_tumor_dataset/no/N1.jpg", "brain_tumor_dataset"),
        ("kaggle2018", "yes/Y1.jpg", ""),
        ("local", "tumor/patient-7/slice.png", ""),
        ("ixi", "http://example.org/IXI-T1.tar#IXI002-Guys-0828-T1.nii.gz", ""),
    ],
)
def test_collection_is_the_folders_above_the_class_folder(source, original, collection):
    assert collection_of(source, original) == collection


@pytest.mark.parametrize("weight_decay, kernel_after", [(0.0, 1.0), (0.5, 0.95)])
def test_weight_decay_shrinks_weights_by_learning_rate_times_decay(weight_decay, kernel_after):
    # zero inputs: the loss has no gradient, so only the decay moves the kernel (lr 0.1 * decay 0.5 = 5 %)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    compile_model(model, "adam", 0.1, {"task": "binary", "subtypes": False, "weight_decay": weight_decay})
    model.train_on_batch(np.zeros((4, 1), "float32"), np.ones((4, 1), "float32"))
    assert float(model.get_weights()[0][0, 0]) == pytest.approx(kernel_after)


def test_multiclass_keeps_only_known_subtypes(tmp_path):
    split = make_split(tmp_path / "split")
    np.save(split / "extra.x.npy", np.zeros((3, 48, 48), np.uint8))
    np.savez(
        split / "extra.npz",
        y=np.array([1, 1, 0], np.int8),
        subtype=np.array(["unknown", "glioma", "none"]),
        path=np.array(["a", "b", "c"]),
    )
    extra = pd.DataFrame(
        [
            {"path": p, "label": y, "subtype": t, "source": s, "group": f"g-{p}", "cluster": c, "split": "extra"}
            for c, (p, y, t, s) in enumerate([("a", 1, "unknown", "x"), ("b", 1, "glioma", "y"), ("c", 0, "none", "x")])
        ]
    )
    pd.concat([pd.read_csv(split / "manifest.csv"), extra]).to_csv(split / "manifest.csv", index=False)
    data = load_split(split, "extra", "multiclass")
    assert data["path"].tolist() == ["b", "c"] and data["y"].tolist() == [0, 2]  # glioma, no_tumor
    assert data["source"].tolist() == ["y", "x"] and data["group"].tolist() == ["g-b", "g-c"]
    assert load_split(split, "extra", "binary")["y"].tolist() == [1, 1, 0]


def test_subtype_targets_and_loss_teach_the_type_where_known_and_tumor_where_not():
    data = {
        "label": np.array([0, 1, 1, 1, 1]),
        "subtype": np.array(["none", "glioma", "unknown", "pituitary", "meningioma"]),
    }
    targets = subtype_targets(data)  # classes: glioma, meningioma, no_tumor, pituitary; 4 = some tumor
    assert targets.tolist() == [2, 0, 4, 3, 1]
    p = np.array([[0.1, 0.2, 0.6, 0.1]] * 5, dtype="float32")
    loss = keras.ops.convert_to_numpy(subtype_crossentropy(targets, p))
    assert loss == pytest.approx(-np.log([0.6, 0.1, 0.4, 0.1, 0.2]), rel=1e-5)


def test_a_split_whose_manifest_misses_images_is_named(tmp_path):
    split = make_split(tmp_path / "split")
    np.save(split / "extra.x.npy", np.zeros((1, 48, 48), np.uint8))
    np.savez(
        split / "extra.npz",
        y=np.array([1], np.int8),
        subtype=np.array(["glioma"]),
        path=np.array(["unlisted.png"]),
    )
    with pytest.raises(ValueError, match=r"manifest.csv: 1 images of extra.npz .*unlisted.png.*dvc repro split"):
        load_split(split, "extra", "binary")


@pytest.mark.slow  # a 12-epoch training
def test_a_small_model_learns_the_synthetic_lesions(tmp_path):
    split = make_split(tmp_path / "split")
    params = tiny_params("seed_cnn", epochs=12, early_stopping_patience=12)
    model, summary = fit(params, load_split(split, "train", "binary"), load_split(split, "val", "binary"), verbose=0)
    test = load_split(split, "test", "binary")
    accuracy = ((model.predict(test["x"].astype("float32"), verbose=0)[:, 0] >= 0.5) == test["y"]).mean()
    assert accuracy >= 0.85
    assert 1 <= summary["best_epoch"] <= summary["epochs_run"] <= 12


@pytest.mark.slow  # a two-fold training
def test_train_stage_ships_the_fold_ensemble_with_out_of_fold_predictions(in_tmp):
    make_split(in_tmp / "artifacts/split")
    params = tiny_params("small_xception", epochs=2, class_weight="balanced_by_source")
    metrics = train(params)
    assert set(metrics["class_weight"]) == {"synthetic/no_tumor", "synthetic/tumor"}  # sources come from the manifest
    info = json.loads((in_tmp / "artifacts/train/model.json").read_text())
    assert info["class_names"] == ["no_tumor", "tumor"] and info["image_size"] == 48 and info["folds"] == 2
    assert json.loads((in_tmp / "metrics/train.json").read_text()) == metrics
    assert [m["fold"] for m in metrics["members"]] == [0, 1]
    assert sum(m["held_out"] for m in metrics["members"]) == 96 + 32  # every train+val image held out once

    pool = [load_split(in_tmp / "artifacts/split", split, "binary") for split in ("train", "val")]
    x_of = dict(zip(np.concatenate([s["path"] for s in pool]), np.concatenate([s["x"] for s in pool]), strict=True))
    ensemble = keras.saving.load_model(in_tmp / "artifacts/train/model.keras")
    members, mirrored = members_of(ensemble)
    assert len(members) == 2 and mirrored
    with np.load(in_tmp / "artifacts/train/oof.npz") as oof:
        assert sorted(np.bincount(oof["fold"])) == sorted(m["held_out"] for m in metrics["members"])
        assert set(oof["path"]) == set(x_of)
        for fold, member in enumerate(members):  # each image is scored by the one model that never saw it
            held = oof["fold"] == fold
            x = np.stack([x_of[p] for p in oof["path"][held]]).astype("float32")
            seen = np.mean([member.predict(view, verbose=0)[:, 0] for view in (x, x[:, :, ::-1])], axis=0)
            assert oof["probability"][held] == pytest.approx(seen, abs=1e-5)
    x = load_split(in_tmp / "artifacts/split", "test", "binary")["x"][:5].astype("float32")
    mean = np.mean([m.predict(view, verbose=0) for m in members for view in (x, x[:, :, ::-1])], axis=0)
    assert ensemble.predict(x, verbose=0) == pytest.approx(mean, abs=1e-6)
    # the image and its mirror get the same score, as the out-of-fold predictions did
    assert ensemble.predict(x[:, :, ::-1], verbose=0) == pytest.approx(ensemble.predict(x, verbose=0), abs=1e-6)

    # `dvc plots show` finds, where dvc.yaml points, each fold's validation loss over its epochs from step 0
    (plots,) = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["plots"]
    ((folder, options),) = plots.items()
    for fold, member in enumerate(metrics["members"]):
        (curve,) = [p for p in (in_tmp / folder).rglob("loss.tsv") if {f"fold{fold}", "val"} <= set(p.parts)]
        table = pd.read_csv(curve, sep="\t")
        assert list(table[options["x"]]) == list(range(member["epochs_run"]))


@pytest.mark.slow  # a two-fold training and a Python process
def test_binary_task_through_the_subtype_head_ships_p_tumor(in_tmp):
    split = make_split(in_tmp / "artifacts/split")
    with np.load(split / "train.npz") as data:  # a third of the training tumors lose their type, as in Kaggle 2018
        arrays = {key: data[key] for key in data.files}
    arrays["subtype"][(arrays["y"] == 1) & (np.arange(len(arrays["y"])) % 3 == 0)] = "unknown"
    np.savez(split / "train.npz", **arrays)
    params = tiny_params("small_xception", epochs=8, subtypes=True)
    metrics = train(params)
    info = json.loads((in_tmp / "artifacts/train/model.json").read_text())
    assert info["task"] == "binary" and info["subtypes"] and info["class_names"] == MULTICLASS_CLASSES
    assert set(metrics["class_weight"]) == {"synthetic/no_tumor", "synthetic/tumor"}  # weights stay binary

    ensemble = keras.saving.load_model(in_tmp / "artifacts/train/model.keras")
    test = load_split(split, "test", "binary")
    probs = ensemble.predict(test["x"].astype("float32"), verbose=0)
    assert probs.shape == (len(test["x"]), 4) and probs.sum(axis=1) == pytest.approx(1.0, abs=1e-5)
    p = tumor_probability(ensemble, test["x"], info["class_names"])
    assert p == pytest.approx(1 - probs[:, 2], abs=1e-6)
    assert ((p >= 0.5) == test["label"]).mean() >= 0.8  # the synthetic lesions are learnt through the head
    with np.load(in_tmp / "artifacts/train/oof.npz") as oof:  # and so are they by the models that never saw them
        assert roc_auc_score(oof["label"], oof["probability"]) >= 0.8
    # evaluate, review and explain load it without the training code that defines the subtype loss
    load = "import sys; from braintumor.model.inference import load_model; print(load_model(sys.argv[1]).name)"
    loaded = subprocess.run(
        [sys.executable, "-c", load, str(in_tmp / "artifacts/train/model.keras")], capture_output=True, text=True
    )
    assert loaded.returncode == 0 and loaded.stdout.split()[-1] == "ensemble", loaded.stderr[-2000:]


def test_mirror_flips_left_right_exactly_after_a_save_and_load(in_tmp):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 48, 48, 3)).astype("float32")
    inputs = keras.Input((48, 48, 3))
    keras.Model(inputs, mirror(48)(inputs)).save(in_tmp / "mirror.keras")
    mirrored = keras.saving.load_model(in_tmp / "mirror.keras").predict(images, verbose=0)
    assert np.array_equal(mirrored, images[:, :, ::-1])


SECOND_BACKEND = textwrap.dedent("""
    import json, sys
    import keras
    from braintumor.data.datasets import load_split
    from braintumor.model.saliency import evidence_map
    from braintumor.model.inference import load_model
    from braintumor.model.train import fit
    sys.path.insert(0, sys.argv[2])
    from fixtures.split import make_split, tiny_params
    from pathlib import Path
    split = make_split(Path(sys.argv[1]))
    model, summary = fit(tiny_params("small_xception", epochs=2), load_split(split, "train", "binary"),
                         load_split(split, "val", "binary"), verbose=0)
    test = load_split(split, "test", "binary")
    maps = evidence_map(model, test["x"][:2], ["no_tumor", "tumor"])
    model.save(Path(sys.argv[1]) / "m.keras")
    again = load_model(Path(sys.argv[1]) / "m.keras")
    print(json.dumps({"backend": keras.backend.backend(), "epochs": summary["epochs_run"],
                      "jit": [model.jit_compile, again.jit_compile],
                      "map_shape": list(maps.shape), "map_max": float(maps.max()),
                      "reloaded": float(abs(again.predict(test["x"][:4].astype("float32"), verbose=0)
                                            - model.predict(test["x"][:4].astype("float32"), verbose=0)).max())}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_training_and_evidence_maps_run_on_a_second_keras_backend(tmp_path, backend):
    pytest.importorskip(backend)
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run(
        [sys.executable, "-c", SECOND_BACKEND, str(tmp_path / "split"), str(REPO / "tests")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == backend and report["epochs"] == 2
    assert report["map_shape"] == [2, 48, 48] and 0.99 <= report["map_max"] <= 1.0 + 1e-6
    assert report["reloaded"] < 1e-5
    if backend == "jax":  # an affine augmentation layer once turned jit off: 75x slower training on an H100
        assert report["jit"] == [True, True]  # the trained model, and the same model loaded again


RETRAIN = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    from braintumor.data.datasets import load_split
    from braintumor.model.train import fit
    sys.path.insert(0, sys.argv[2])
    from fixtures.split import make_split, tiny_params
    from pathlib import Path
    split = make_split(Path(sys.argv[1]))
    model, _ = fit(tiny_params("small_xception", epochs=3), load_split(split, "train", "binary"),
                   load_split(split, "val", "binary"), verbose=0)
    print(hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest())
""")


@pytest.mark.slow
def test_a_retrain_in_a_fresh_process_gives_the_same_weights_byte_for_byte(tmp_path):
    # seeds from params reach every random draw: initialisation, shuffling, augmentation layers, dropout
    digests = []
    for run in ("first", "second"):
        result = subprocess.run(
            [sys.executable, "-c", RETRAIN, str(tmp_path / run), str(REPO / "tests")],
            env={**os.environ, "KERAS_BACKEND": "tensorflow"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        digests.append(result.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]


def test_cluster_members_share_one_image_weight_and_each_stratum_still_weighs_the_same():
    # source a: healthy clusters of 1 and 3 images, tumor clusters of 1, 1 and 2; source b: one of each class
    data = {
        "y": np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1]),
        "cluster": np.array([1, 2, 2, 2, 3, 4, 5, 5, 6, 7]),
        "source": np.array(["a"] * 8 + ["b"] * 2),
    }
    weights, _ = sample_weights(data, ["no_tumor", "tumor"], "balanced_by_source", "cluster")
    per_cluster = {c: weights[data["cluster"] == c].sum() for c in np.unique(data["cluster"])}
    assert per_cluster[1] == pytest.approx(per_cluster[2]) and weights[1] == pytest.approx(weights[1:4].mean())
    assert per_cluster[3] == pytest.approx(per_cluster[5]) == pytest.approx(per_cluster[4])
    strata = [weights[(data["source"] == s) & (data["y"] == c)].sum() for s in "ab" for c in (0, 1)]
    assert strata == pytest.approx([7 / 4] * 4)  # 7 clusters' worth of weight, shared by the 4 strata
    image, _ = sample_weights(data, ["no_tumor", "tumor"], "none", "image")
    assert image is None and sample_weights(data, ["no_tumor", "tumor"], "none", "cluster")[0][1] == pytest.approx(
        1 / 3
    )


@pytest.mark.slow  # a two-fold training
def test_members_are_fitted_with_their_group_but_never_held_out_or_scored(in_tmp):
    make_split(in_tmp / "plain", size=32)
    make_split(in_tmp / "artifacts/split", size=32, members=20)
    plain, pool = (
        cross_validation_pool(in_tmp / "plain", "binary"),
        cross_validation_pool(in_tmp / "artifacts/split", "binary"),
    )
    assert len(pool["x"]) == len(plain["x"]) + 40
    for (_, held_plain), (fit_rows, held) in zip(folds_of(plain, 3, 7), folds_of(pool, 3, 7), strict=True):
        assert pool["representative"][held].all()
        assert pool["path"][held].tolist() == plain["path"][held_plain].tolist()  # the folds without members
        assert not set(pool["group"][fit_rows]) & set(pool["group"][held])
        members = fit_rows[~pool["representative"][fit_rows]]
        assert len(members) > 0 and set(pool["group"][members]) <= set(pool["group"][fit_rows])

    params = tiny_params("seed_fsm", epochs=1, member_weight="cluster")
    params["split"]["image_size"] = 32
    metrics = train(params)
    with np.load(in_tmp / "artifacts/train/oof.npz") as oof:
        assert sorted(oof["path"]) == sorted(plain["path"])  # one score per cluster, none for a member
        assert np.isfinite(oof["probability"]).all()
    assert sum(m["held_out"] for m in metrics["members"]) == len(plain["x"])
    assert sum(m["images"] for m in metrics["members"]) == len(pool["x"]) * (params["train"]["folds"] - 1)


@pytest.mark.slow  # two k-fold fits of a learning model: 35 s
def test_clean_learning_fits_again_without_the_images_cleanlab_flags(in_tmp):
    split = make_split(in_tmp / "artifacts/split", size=32, members=10)
    with np.load(split / "train.npz") as data:
        arrays = {key: data[key] for key in data.files}
    flipped = np.flatnonzero(~np.char.endswith(arrays["path"], "-member.png"))[:12:2]  # six representatives
    arrays["y"][flipped] = 1 - arrays["y"][flipped]
    np.savez(split / "train.npz", **arrays)  # labels come from the arrays
    params = tiny_params("small_xception", epochs=8, clean_learning=True)
    params["split"]["image_size"] = 32
    metrics = train(params)

    excluded = pd.read_csv(in_tmp / "artifacts/train/excluded.csv")
    pool = cross_validation_pool(split, "binary")
    flagged = excluded.path[excluded.reason == "clean_learning: cleanlab flag"]
    assert len(set(flagged) & set(arrays["path"][flipped])) >= 3  # most of the wrong labels are caught
    members = excluded[excluded.reason == "clean_learning: member of a flagged cluster"]
    assert set(members.path.str.replace("-member", "")) <= set(flagged)  # a member leaves with its cluster
    reps = pool["path"][pool["representative"]]
    with np.load(in_tmp / "artifacts/train/oof.npz") as data:
        oof = {key: data[key] for key in data.files}
    assert oof["path"].tolist() == reps.tolist()  # every image scored, as without clean learning: comparable
    left_out = oof["fold"] == -1
    assert set(oof["path"][left_out]) == set(flagged)
    # the left-out images were seen by no model of the second fit: the shipped ensemble scores them
    rows = np.flatnonzero(np.isin(pool["path"], oof["path"][left_out]))
    shipped = load_model(in_tmp / "artifacts/train/model.keras")
    by_path = dict(zip(oof["path"], oof["probability"], strict=True))
    expected = tumor_probability(shipped, pool["x"][rows], ["no_tumor", "tumor"])
    assert [by_path[path] for path in pool["path"][rows]] == pytest.approx(expected, abs=1e-5)
    assert metrics["clean_learning_excluded"] == len(excluded)
    live = json.loads((in_tmp / "metrics/train/metrics.json").read_text())
    assert {"fold0", "clean_learning"} <= set(live)

    # evaluate places the threshold on the second fit's scores only, and scores out of fold on every image
    result = evaluate(params)["threshold_selection"]
    assert result["images"] == len(reps) - len(flagged) and result["left_out_by_clean_learning"] == len(flagged)
    target = params["evaluate"]["target_recall"]
    placed = threshold_for_recall(oof["label"][~left_out], oof["probability"][~left_out], target)
    assert json.loads((in_tmp / "models/model.json").read_text())["threshold"] == pytest.approx(placed)
    every = binary_metrics(oof["label"], oof["probability"], placed)
    assert result["out_of_fold"]["specificity"] == every["specificity"]


def pool_with_site(site_scans: int) -> dict:
    """A train+val pool of 60 public scans, then a site's first `site_scans` (data/site-a/, the local source)."""
    public = [("synthetic", f"artifacts/fetch/images/synthetic/{i:03d}.png") for i in range(60)]
    site = [("local", f"artifacts/fetch/images/local/site-a/{i:03d}.png") for i in range(site_scans)]
    rows = public + site
    return {
        "source": np.array([source for source, _ in rows], dtype=object),
        "path": np.array([path for _, path in rows]),
        "group": np.array([f"g-{path}" for _, path in rows], dtype=object),
        "label": np.arange(len(rows)) % 2,
        "representative": np.ones(len(rows), dtype=bool),
    }


def test_a_site_s_new_scans_move_no_image_to_another_fold():
    folds = {}
    for scans in (0, 20, 60):
        pool = pool_with_site(scans)
        fold_of = {}
        for k, (fit_rows, held) in enumerate(folds_of(pool, 5, 7)):
            fold_of.update(dict.fromkeys(pool["path"][held], k))
            assert not set(pool["group"][fit_rows]) & set(pool["group"][held])
        assert len(fold_of) == 60 + scans  # every image held out once
        folds[scans] = fold_of
    assert {p: folds[20][p] for p in folds[0]} == folds[0] == {p: folds[60][p] for p in folds[0]}
    assert {p: folds[60][p] for p in folds[20]} == folds[20]  # the site's first 20 stay where they were
    site_folds = [k for p, k in folds[60].items() if "site-a" in p]
    assert len(set(site_folds)) == 5  # the site's scans are spread over the folds


@pytest.mark.slow  # three two-fold fits of a small model
def test_a_small_site_joins_by_updating_the_fold_models_fitted_without_it(in_tmp, monkeypatch):
    import braintumor.model.train as training

    split = make_split(in_tmp / "artifacts/split", size=32, site_scans=8)
    params = tiny_params("seed_fsm", epochs=3, early_stopping_patience=3)
    params["split"]["image_size"] = 32
    params["train"]["sites"].update(retrain_from=50, update_epochs=2)
    pool = cross_validation_pool(split, "binary")
    site = pool["source"] == "local"
    assert site.sum() == 16

    before_update, update = [], training.update_after_fit

    def spied(model, params, config, data, *args, **kwargs):
        before_update.append(([w.copy() for w in model.get_weights()], set(data["path"])))
        return update(model, params, config, data, *args, **kwargs)

    monkeypatch.setattr(training, "update_after_fit", spied)
    metrics = train(params)
    assert metrics["sites"] == {"site-a": {"scans": 16, "way": "update"}}
    assert [m["update_epochs"] for m in metrics["members"]] == [2, 2]

    without_site = {key: value[~site] for key, value in pool.items()}
    members, _, _, _ = training.fit_folds(params, without_site, verbose=0)
    folds = folds_of(pool, 2, params["seed"])
    with np.load(in_tmp / "artifacts/train/oof.npz") as oof:
        fold_of = dict(zip(oof["path"], oof["fold"], strict=True))
    for fold, ((weights, updated_on), member, (fit_rows, held)) in enumerate(
        zip(before_update, members, folds, strict=True)
    ):
        # the update starts from the fold model fitted without the site, and learns on its fitting rows, the
        # site's among them; the site's held-out scans are scored by the fold model that never saw them
        assert all(np.array_equal(a, b) for a, b in zip(weights, member.get_weights(), strict=True))
        assert updated_on == set(pool["path"][fit_rows]) and updated_on & set(pool["path"][site])
        assert {fold_of[p] for p in pool["path"][held]} == {fold} and set(pool["path"][held]) & set(pool["path"][site])
    shipped = members_of(load_model(in_tmp / "artifacts/train/model.keras"))[0]
    assert not all(
        np.array_equal(a, b) for a, b in zip(shipped[0].get_weights(), members[0].get_weights(), strict=True)
    )

    params["train"]["sites"]["retrain_from"] = 10  # the site is large enough: in the pool from the first epoch
    metrics = train(params)
    assert metrics["sites"] == {"site-a": {"scans": 16, "way": "retrain"}}
    assert not any("update_epochs" in m for m in metrics["members"])


def test_each_site_joins_by_its_own_size_and_a_pool_of_small_sites_alone_is_fitted_whole():
    from braintumor.model.train import joining_by_update

    rows = [("kaggle2020", "Training")] * 30 + [("local", "site-a")] * 12 + [("local", "site-b")] * 60
    rows += [("local", "")] * 5  # the user's own class folders: not a site
    pool = {
        "source": np.array([source for source, _ in rows], dtype=object),
        "collection": np.array([collection for _, collection in rows], dtype=object),
        "representative": np.ones(len(rows), dtype=bool),
    }
    pool["representative"][30:34] = False  # four of site-a's images are cluster members: 8 scans
    by_update, ways = joining_by_update(pool, retrain_from=50)
    assert ways == {"site-a": {"scans": 8, "way": "update"}, "site-b": {"scans": 60, "way": "retrain"}}
    assert by_update.tolist() == [False] * 30 + [True] * 12 + [False] * 65
    assert not joining_by_update(pool, retrain_from=0)[0].any()  # 0: every site in the pool from the start
    alone = {key: value[30:42] for key, value in pool.items()}  # site-a is the whole pool: nothing to fit first
    by_update, ways = joining_by_update(alone, retrain_from=50)
    assert not by_update.any() and ways == {"site-a": {"scans": 8, "way": "retrain"}}
