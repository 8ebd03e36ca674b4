"""Loading a model never runs code from it, and never uses a model whose description does not fit it."""

from __future__ import annotations

import json

import keras
import mlflow
import pytest
import yaml

from braintumor.errors import ModelLoadError
from braintumor.serve.predict import load

INFO = {"image_size": 32, "class_names": ["no_tumor", "tumor"], "threshold": 0.4, "task": "binary"}


def tiny_model(*extra) -> keras.Model:
    inputs = keras.Input((32, 32, 3), name="image")
    x = inputs
    for layer in extra:
        x = layer(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


def keras_folder(folder, model, info=INFO):
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    (folder / "model.json").write_text(json.dumps(info))
    return folder / "model.keras"


def mlflow_folder(folder, model, **flavor_changes):
    """An MLflow model folder as `braintumor register` logs it, then with `flavor_changes` made to its MLmodel."""
    mlflow.keras.save_model(model, str(folder), metadata=INFO, pip_requirements=["keras"])  # no 8-s inference
    description = yaml.safe_load((folder / "MLmodel").read_text())
    description["flavors"]["keras"].update(flavor_changes)
    (folder / "MLmodel").write_text(yaml.safe_dump(description))
    return folder


def test_a_lambda_layer_is_refused(tmp_path):
    """Python code inside a .keras file (a Lambda layer's bytecode) would run when loaded without safe mode."""
    marker = tmp_path / "ran"
    payload = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")  # noqa: S307
    model = tiny_model(keras.layers.Lambda(payload))
    path = keras_folder(tmp_path / "m", model)
    folder = mlflow_folder(tmp_path / "mlflow-model", model)
    marker.unlink()  # building the model ran it once
    with pytest.raises(ModelLoadError, match="safe mode"):
        load(str(path))
    with pytest.raises(ModelLoadError, match="safe mode"):
        load(str(folder))
    assert not marker.exists()


def test_an_exported_savedmodel_is_refused(tmp_path, monkeypatch):
    folder = mlflow_folder(tmp_path / "m", tiny_model(), save_exported_model=True)
    with pytest.raises(ModelLoadError, match="exported SavedModel"):
        load(str(folder))


def test_a_data_path_outside_the_model_folder_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    keras_folder(elsewhere, tiny_model())
    folder = mlflow_folder(tmp_path / "deep/m", tiny_model(), data="../../elsewhere")
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        load(str(folder))


def test_a_registered_style_folder_loads(tmp_path):
    loaded = load(str(mlflow_folder(tmp_path / "m", tiny_model())))
    assert loaded.threshold == 0.4 and loaded.info["image_size"] == 32


@pytest.mark.parametrize(
    "reference", ["s3://bucket/model", "http://127.0.0.1:1/model", "file:///etc/model", "hdfs://x/y", "gs://b/m"]
)
def test_only_models_runs_and_local_paths_are_resolved(reference, monkeypatch):
    def never(**kwargs):
        raise AssertionError("download_artifacts must not be reached")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", never)
    with pytest.raises(ModelLoadError, match="scheme is not loaded"):
        load(reference)
    with pytest.raises(ModelLoadError) as err:  # a refused reference keeps its password to itself too
        load(reference.replace("://", "://bob:hunter2@", 1))
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": "0.3"}, "threshold"),
        ({"image_size": 64}, "image_size"),
        ({"image_size": None}, "image_size"),
        ({"class_names": ["tumor", "no_tumor"]}, "class_names"),
        ({"class_names": ["glioma", "meningioma", "no_tumor", "pituitary"]}, "outputs"),
    ],
)
def test_a_description_that_does_not_fit_the_network_is_refused(tmp_path, change, field):
    path = keras_folder(tmp_path / "m", tiny_model(), {**INFO, **change})
    with pytest.raises(ModelLoadError, match=field):
        load(str(path))


def test_credentials_in_the_tracking_uri_are_never_printed(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret-token@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with pytest.raises(ModelLoadError) as err:
        load("models:/brain-tumor-classifier@champion")
    assert "s3cret-token" not in str(err.value) and "alice" not in str(err.value)
    assert "127.0.0.1:9" in str(err.value)
