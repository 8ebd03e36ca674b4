"""The shipped model: how the fold models are averaged into it, how it is loaded safely, how it scores images.

Training builds the average; evaluation, explanation, `braintumor predict` and the web service load and run
it. They share this module, so none of them imports training code. Loading never runs code from the file:
Keras' safe mode is on, explicitly, and the model's own description (image size, classes, threshold) is
checked against the network before anything uses it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
from keras import layers

from braintumor.errors import ModelLoadError
from braintumor.labels import BINARY_CLASSES
from braintumor.model import (
    intensity,  # registers the intensity layers a saved model may hold
    outputs,
)


def jit_ready(model: keras.Model) -> keras.Model:
    """`model`, compiled with XLA by `fit` and `predict` on the JAX backend; `build_model` and `load_model` apply
    it (and so must any other loader). Keras marks its rotation, zoom and translation layers unfit for XLA
    because TensorFlow's transform op is (loading a model marks them again, and compiles it with jit off); their
    JAX version is plain jax.numpy and compiles. Unmarked, one such layer turns jit off for the whole model, and
    JAX then runs every step op by op: 75x slower on an H100."""
    if keras.backend.backend() == "jax":
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                jit_ready(layer)
            elif isinstance(layer, (layers.RandomRotation, layers.RandomZoom, layers.RandomTranslation)):
                layer.supports_jit = True
        model.jit_compile = True  # Keras still turns it off, with a warning, if another layer cannot compile
    return model


def load_model(path: str | Path) -> keras.Model:
    """A saved `.keras` model, ready to run on any backend (see `jit_ready`): every stage loads models this way.

    Safe mode is explicit (a Lambda layer or any other serialised Python code is refused, whatever the
    environment says), and the model is not compiled: inference needs no loss, so a file naming one cannot
    make the loader import it."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: not a Keras 3 .keras archive (the only format this project loads)")
    try:
        return jit_ready(keras.saving.load_model(path, compile=False, safe_mode=True))
    except ValueError as err:  # Keras raises ValueError for lambdas, unknown classes and modules in safe mode
        raise ModelLoadError(f"{path}: refused by Keras safe mode or unreadable ({err})") from err


def numbered_shared_objects(config):
    """`config` (a Keras archive's config.json) with each `shared_object_id` (the Python `id()` of an object the
    config names twice, so a new number in every process) replaced by its order of first appearance."""
    numbers: dict = {}

    def renumbered(node):
        if isinstance(node, dict):
            return {
                key: numbers.setdefault(value, len(numbers) + 1) if key == "shared_object_id" else renumbered(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [renumbered(value) for value in node]
        return node

    return renumbered(config)


def save_model(model: keras.Model, path: str | Path) -> None:
    """Save a `.keras` archive whose bytes depend on the model alone: Keras writes the save time into it (its
    metadata and the weights' zip entry) and the memory address of shared objects (its config), so the same
    model saved twice would get two digests, and every rerun of evaluate would look like a new model to DVC and
    the registry."""
    path = Path(path)
    scratch = path.with_name(f"{path.stem}.unstable.keras")
    model.save(scratch)
    with zipfile.ZipFile(scratch) as archive, zipfile.ZipFile(path, "w") as stable:
        for entry in archive.infolist():
            data = archive.read(entry)
            if entry.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            elif entry.filename == "config.json":
                data = json.dumps(numbered_shared_objects(json.loads(data))).encode()
            fixed = zipfile.ZipInfo(entry.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type = entry.compress_type
            stable.writestr(fixed, data)
    scratch.unlink()


def check_model_info(info: dict, model: keras.Model, where: str) -> dict:
    """`info` (model.json, or the MLflow model's metadata) when it describes `model` and holds what inference
    needs (`outputs.check_description`); else a `ModelLoadError` naming the field. A wrong image size or class
    list would give numbers that look right and mean nothing."""
    info = outputs.check_description(info, where)
    size, names = info["image_size"], info["class_names"]
    expected_in = (None, size, size, 3)
    if tuple(model.input_shape) != expected_in:
        raise ModelLoadError(
            f"{where}: the network takes inputs of shape {tuple(model.input_shape)}, but "
            f"`image_size` {size} means {expected_in}"
        )
    width = model.output_shape[-1]
    if width != (1 if names == BINARY_CLASSES else len(names)):
        raise ModelLoadError(f"{where}: the network has {width} outputs, which does not fit `class_names` {names}")
    return info


def tumor_probability(model, x: np.ndarray, class_names: list[str], batch_size: int = 64) -> np.ndarray:
    """P(tumor) per image: the sigmoid output, or 1 - P(no_tumor) for the multiclass model.

    `x`: uint8 images, an array or anything `np.asarray` reads in slices (datasets.SplitImages)."""
    chunk = max(batch_size, outputs.PREDICT_CHUNK // batch_size * batch_size)
    probs = np.concatenate(
        [
            np.asarray(
                model.predict(np.asarray(x[start : start + chunk], dtype="float32"), batch_size=batch_size, verbose=0),
                dtype=np.float64,
            )
            for start in range(0, len(x), chunk)
        ]
        or [np.zeros((0, model.output_shape[-1]))]
    )
    return outputs.tumor_probability_of(probs, class_names)


def mirror(image_size: int) -> keras.Sequential:
    """Left-right mirror of (batch, height, width, channels) images, from built-in layers only so that the
    saved model needs no custom code: the width axis times a fixed anti-identity matrix. Exact for the
    0..255 integer pixels the models take, in float32, float16 and TF32 alike."""
    flip = layers.Dense(image_size, use_bias=False, trainable=False, name="anti_identity")
    model = keras.Sequential([layers.Permute((1, 3, 2)), flip, layers.Permute((1, 3, 2))], name="mirror")
    model.build((None, image_size, image_size, 3))
    flip.set_weights([np.eye(image_size, dtype="float32")[::-1]])
    return model


def average_of(members: list[keras.Model], mirrored: bool) -> keras.Model:
    """One model whose output is the mean of the members' outputs (the cross-validated ensemble that ships)
    and, when `mirrored`, of their outputs on the left-right mirrored image as well (test-time augmentation:
    the members learnt with random flips, and the two views' errors partly cancel). Needs two outputs to
    average: two members, or one mirrored."""
    inputs = keras.Input(members[0].inputs[0].shape[1:], name="image")
    views = [inputs, mirror(inputs.shape[1])(inputs)] if mirrored else [inputs]
    mean = layers.Average(name="mean_prediction", dtype="float32")(
        [member(view) for member in members for view in views]
    )
    return keras.Model(inputs, mean, name="ensemble")


# Layers that only act in training (augmentation): the shipped model leaves them out, so that its graph holds only
# what inference computes, and exports (ONNX) without their random ops.
TRAINING_ONLY = (
    layers.RandomFlip,
    layers.RandomRotation,
    layers.RandomZoom,
    layers.RandomTranslation,
    layers.RandomBrightness,
    layers.RandomContrast,
    layers.RandomGaussianBlur,
    intensity.RandomContrastMap,
    intensity.RandomBiasField,
    intensity.RandomGamma,
    intensity.RandomRicianNoise,
)


def without_training_layers(model: keras.Model) -> keras.Model:
    """A copy of a functional model without its `TRAINING_ONLY` layers, the same weights in every other layer:
    at inference those layers pass their input through, so the outputs are the same."""
    clone = keras.models.clone_model(
        model,
        call_function=lambda layer, *args, **kwargs: (
            args[0] if isinstance(layer, TRAINING_ONLY) else layer(*args, **kwargs)
        ),
    )
    for layer in clone.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return clone


def inference_graph(model: keras.Model) -> keras.Model:
    """The shipped model as inference runs it: its fold models (or the single model) without training-only
    layers, averaged as before (`average_of`, with the mirrored view when it had one)."""
    members, mirrored = members_of(model)
    if not members:
        return jit_ready(without_training_layers(model))
    return jit_ready(average_of([without_training_layers(member) for member in members], mirrored))


def members_of(model: keras.Model) -> tuple[list[keras.Model], bool]:
    """(the fold models inside a model built by `average_of`, whether it also averages the mirrored view);
    ([], False) for a single model."""
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return [m for m in inner if m.name != "mirror"], any(m.name == "mirror" for m in inner)
