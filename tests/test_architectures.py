"""Every `train.model` variant builds, predicts probabilities and keeps training-only layers out of inference."""

import subprocess
import sys

import keras
import numpy as np
import pytest

from braintumor.errors import ParamError
from braintumor.model.architectures import augmentation, build_model
from braintumor.model.inference import (
    TRAINING_ONLY,
    average_of,
    inference_graph,
    load_model,
    members_of,
    save_model,
)
from braintumor.params import MODEL_NAMES, validate_train

from fixtures.split import tiny_params

# The binary head (one sigmoid) on every variant; the four-way softmax head on one (the head is shared code).
VARIANTS = [(name, 1) for name in MODEL_NAMES] + [("small_xception", 4)]
# keras.applications backbones take ~20 s each to build twice, save and reload: the slow tier runs them
SLOW_TO_BUILD = {
    name: pytest.param(name, 1, marks=pytest.mark.slow) for name in ("resnet50", "vgg16", "efficientnetb0")
}


@pytest.fixture(scope="module")
def built() -> dict:
    """Each variant built once for the module: keras.applications backbones take seconds each."""
    return {
        (name, outputs): build_model(name, 48, outputs, tiny_params(name)["train"], seed=0)
        for name, outputs in VARIANTS
    }


@pytest.mark.parametrize("name, outputs", VARIANTS)  # every name params.yaml accepts must build
def test_every_variant_builds_and_predicts_probabilities(built, name, outputs):
    model, optimizer = built[(name, outputs)]
    x = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3)).astype("float32")
    p = keras.ops.convert_to_numpy(model(x, training=False))
    assert p.shape == (2, outputs) and isinstance(keras.optimizers.get(optimizer), keras.optimizers.Optimizer)
    assert ((p >= 0) & (p <= 1)).all()
    if outputs > 1:
        np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)


def test_augmentation_amounts_of_zero_leave_layers_out_and_inference_is_untouched():
    amounts = every_augmentation({})["augment"]
    nothing = {key: 0 for key in amounts} | {"horizontal_flip": False}
    assert augmentation(nothing, 0) == []
    x = np.random.default_rng(2).integers(0, 256, (8, 48, 48, 3)).astype("float32")
    for key, amount in amounts.items():  # each amount alone brings one layer, and that layer changes images
        steps = augmentation(nothing | {key: amount}, 0)
        assert len(steps) == 1, key
        assert not np.allclose(keras.ops.convert_to_numpy(steps[0](x, training=True)), x), key
    params = tiny_params("small_xception")
    model, _ = build_model("small_xception", 48, 1, params["train"], 0)
    x = np.random.default_rng(1).integers(0, 256, (4, 48, 48, 3)).astype("float32")
    first = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_array_equal(first, keras.ops.convert_to_numpy(model(x, training=False)))
    assert not np.allclose(first, keras.ops.convert_to_numpy(model(x, training=True)))


def test_saved_model_reloads_with_the_same_predictions(built, tmp_path):
    model, _ = built[("small_xception", 4)]
    x = np.random.default_rng(2).integers(0, 256, (2, 48, 48, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(model.predict(x, verbose=0), again.predict(x, verbose=0), rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "resnet18"}, "train.model"),
        ({"class_weight": "auto"}, "train.class_weight"),
        ({"weight_decay": -0.01}, "train.weight_decay"),
    ],
)
def test_train_params_are_validated(change, message):
    params = tiny_params(**change) if "model" not in change else tiny_params(change["model"])
    with pytest.raises(ParamError, match=message):
        validate_train(params)


def test_image_too_small_for_a_model():
    params = tiny_params("seed_cnn")
    params["split"]["image_size"] = 36
    with pytest.raises(ParamError, match="too small for train.model seed_cnn"):
        validate_train(params)
    params = tiny_params("small_xception")
    params["split"]["image_size"] = 32
    params["train"]["small_xception"]["widths"] = [8] * 5  # five halvings and the stem: needs 64
    with pytest.raises(ParamError, match="too small for 5 blocks"):
        validate_train(params)


def every_augmentation(train: dict) -> dict:
    """`train` with every augmentation of `architectures.augmentation` switched on."""
    augment = {"horizontal_flip": True, "rotation": 0.1, "zoom": 0.1, "translation": 0.1, "brightness": 0.2}
    augment |= {"contrast": 0.2, "bias_field": 0.3, "gamma": 0.3, "blur": 0.5, "noise": 0.02, "contrast_map": 0.5}
    return {**train, "augment": augment}


@pytest.mark.parametrize("name, outputs", [SLOW_TO_BUILD.get(name, (name, o)) for name, o in VARIANTS])
def test_the_shipped_graph_drops_training_only_layers_and_keeps_the_outputs(name, outputs, tmp_path):
    """What evaluate ships (`inference_graph`): the fold ensemble, mirrored view included, without one
    augmentation layer, with the same outputs, reloading in safe mode."""
    train = every_augmentation(tiny_params(name)["train"])
    members = [build_model(name, 48, outputs, train, seed=k, model_name=f"{name}_fold{k}")[0] for k in range(2)]
    shipped = average_of(members, mirrored=True)
    x = np.random.default_rng(3).integers(0, 256, (3, 48, 48, 3)).astype("float32")
    graph = inference_graph(shipped)
    inner = [layer for member in members_of(graph)[0] for layer in member.layers]
    assert inner and not any(isinstance(layer, TRAINING_ONLY) for layer in inner)
    assert any(isinstance(layer, TRAINING_ONLY) for layer in members[0].layers)  # there were some to drop
    expected = shipped.predict(x, verbose=0)
    np.testing.assert_allclose(graph.predict(x, verbose=0), expected, atol=1e-6)
    save_model(graph, tmp_path / "m.keras")
    np.testing.assert_allclose(load_model(tmp_path / "m.keras").predict(x, verbose=0), expected, atol=1e-6)
    save_model(graph, tmp_path / "again.keras")  # the same bytes whenever it is saved: one digest per model
    assert (tmp_path / "m.keras").read_bytes() == (tmp_path / "again.keras").read_bytes()


SAVE_IN_A_FRESH_PROCESS = """
import sys
import keras
from braintumor.model.inference import average_of, save_model

def member(k):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name=f"conv{k}")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name=f"pool{k}")(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name=f"out{k}")(x), name=f"m{k}")

keras.utils.set_random_seed(0)
save_model(average_of([member(0), member(1)], mirrored=True), sys.argv[1])
"""


@pytest.mark.slow  # two Python processes
def test_the_same_model_saved_by_two_processes_has_one_digest(tmp_path):
    """Keras writes the memory address of shared objects into the archive's config; two evaluate runs of one
    model (two processes) must still write the same bytes, or DVC and the registry see a new model."""
    for name in ("first.keras", "second.keras"):
        subprocess.run([sys.executable, "-c", SAVE_IN_A_FRESH_PROCESS, str(tmp_path / name)], check=True)
    assert (tmp_path / "first.keras").read_bytes() == (tmp_path / "second.keras").read_bytes()
