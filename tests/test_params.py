"""params.yaml is validated before any work starts: every stage's section, each bad value named."""

import copy

import pytest
import yaml

from braintumor.errors import ParamError
from braintumor.params import (
    load_params,
    validate_dedup,
    validate_evaluate,
    validate_explain,
    validate_fetch,
    validate_register,
    validate_review,
    validate_split,
    validate_train,
)

from conftest import REPO


@pytest.fixture
def params():
    return load_params(REPO / "params.yaml")


VALIDATORS = {
    "fetch": validate_fetch,
    "dedup": validate_dedup,
    "split": validate_split,
    "train": validate_train,
    "evaluate": validate_evaluate,
    "review": validate_review,
    "explain": validate_explain,
    "register": validate_register,
}


def test_every_stage_has_a_validator():
    assert set(VALIDATORS) == set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


@pytest.mark.parametrize("stage", sorted(VALIDATORS))
def test_shipped_params_are_valid(params, stage):
    assert VALIDATORS[stage](copy.deepcopy(params)) == params[stage]  # accepted, and handed back unchanged


@pytest.mark.parametrize(
    "path, value, validator, names",
    [
        ("split.fractions.test", 0.3, validate_split, "split.fractions"),
        ("split.image_size", 8, validate_split, "split.image_size"),
        ("dedup.hash_size", 12, validate_dedup, "dedup.hash_size"),
        ("dedup.phash_max_distance", -1, validate_dedup, "dedup.phash_max_distance"),
        (
            "fetch.sources.kaggle2018.handle",
            "navoneel/brain-mri-images-for-brain-tumor-detection",
            validate_fetch,
            "fetch.sources.kaggle2018.handle",
        ),
        ("fetch.sources.ixi.planes", ["diagonal"], validate_fetch, None),
        ("fetch.workers", 0, validate_fetch, "fetch.workers"),
        ("register.min_recall", 1.5, validate_register, "register.min_recall"),
        ("train.epochs", 0, validate_train, "train.epochs"),
        ("train.model", "resnet18", validate_train, "train.model"),
        ("train.full_weight_images", -5, validate_train, "train.full_weight_images"),
        ("train.sites.retrain_from", "fifty", validate_train, "train.sites.retrain_from"),
        ("train.sites.update_learning_rate_factor", 2, validate_train, "train.sites.update_learning_rate_factor"),
        ("evaluate.target_recall", 0.2, validate_evaluate, "evaluate.target_recall"),
        ("review.gallery", -1, validate_review, "review.gallery"),
        ("explain.lime_samples", 5, validate_explain, "explain.lime_samples"),
    ],
)
def test_bad_values_name_the_param(params, path, value, validator, names):
    bad = copy.deepcopy(params)
    node = bad
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    bad["fetch"]["sources"]["ixi"]["enabled"] = True  # so that ixi settings are checked too
    with pytest.raises(ParamError) as err:
        validator(bad)
    assert (names or path) in str(err.value)


def test_mirror_average_needs_models_that_learnt_flips(params):
    params["train"]["augment"]["horizontal_flip"] = False
    with pytest.raises(ParamError, match="train.mirror_average"):
        validate_train(params)
    params["train"]["mirror_average"] = False
    validate_train(params)


def test_subtypes_belong_to_the_binary_task(params):
    params["train"].update(subtypes=True, task="multiclass")
    with pytest.raises(ParamError, match="train.subtypes"):
        validate_train(params)
    params["train"]["task"] = "binary"
    validate_train(params)


def test_unknown_source_and_all_disabled(params):
    bad = copy.deepcopy(params)
    bad["fetch"]["sources"]["kaggle2019"] = {"enabled": True}
    with pytest.raises(ParamError, match="fetch.sources.kaggle2019"):
        validate_fetch(bad)
    off = copy.deepcopy(params)
    for source in off["fetch"]["sources"].values():
        source["enabled"] = False
    with pytest.raises(ParamError, match="disabled"):
        validate_fetch(off)


def test_missing_params_file_says_where(tmp_path):
    with pytest.raises(ParamError, match="params file not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 1}))
    with pytest.raises(ParamError, match="missing `split"):
        validate_split(load_params(tmp_path / "params.yaml"))


@pytest.mark.parametrize(
    "path, typo, nearest",
    [
        ("train", "epoch", "train.epochs"),
        ("dedup", "phash_max_dist", "dedup.phash_max_distance"),
        ("fetch.sources.ixi", "max_subject", "fetch.sources.ixi.max_subjects"),
        ("train.augment", "rotaton", "train.augment.rotation"),
    ],
)
def test_a_misspelt_key_is_refused_with_the_nearest_name(params, tmp_path, path, typo, nearest):
    """`dvc exp run -S train.epoch=5` adds the typo beside `train.epochs`: the stage must refuse it, not train 60."""
    node = params
    for key in path.split("."):
        node = node[key]
    node[typo] = 5
    written = tmp_path / "params.yaml"
    written.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamError, match=f"unknown key `{path}.{typo}`; did you mean `{nearest}`"):
        load_params(written)
    from braintumor.params import validate_fetch, validate_train  # each stage checks its own section too

    section = path.split(".")[0]
    validator = {"train": validate_train, "dedup": validate_dedup, "fetch": validate_fetch}[section]
    with pytest.raises(ParamError, match=f"unknown key `{path}.{typo}`"):
        validator(params)


def test_an_unknown_section_is_refused(params, tmp_path):
    params["trian"] = {"epochs": 3}
    written = tmp_path / "params.yaml"
    written.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamError, match="unknown key `trian`; did you mean `train`"):
        load_params(written)


@pytest.mark.parametrize(
    "path, value",
    [
        ("train.epochs", 100_000),
        ("train.batch_size", 100_000),
        ("fetch.workers", 10_000),
        ("split.image_size", 2048),
        ("evaluate.bootstrap", 10**9),
        ("explain.lime_samples", 10**7),
        ("fetch.max_image_pixels", 10**12),
    ],
)
def test_counts_have_upper_bounds(params, path, value):
    from braintumor.params import validate_evaluate, validate_explain, validate_train

    node = params
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    validator = {
        "train": validate_train,
        "fetch": validate_fetch,
        "split": validate_split,
        "evaluate": validate_evaluate,
        "explain": validate_explain,
    }[parents[0]]
    with pytest.raises(ParamError, match=path):
        validator(params)
