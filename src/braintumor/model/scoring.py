"""The scoring model: one Keras graph that gives everything an answer needs, and its ONNX export.

Its outputs: the shipped model's output, each fold model's output on each view, and the out-of-distribution
gate's pooled features of each fold model. Evaluate builds it to fit the gate, `braintumor predict` and the web
service run it (as Keras, or as the ONNX export evaluate writes beside the model).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from braintumor.errors import ModelLoadError
from braintumor.model.inference import members_of, mirror


def feature_tensors(member: keras.Model) -> list:
    """The (batch, h, w, c) tensors the gate pools: every residual addition, and the last convolutional
    features (whatever a global pooling or Flatten turns into the head's vector)."""
    found = [layer.output for layer in member.layers if isinstance(layer, layers.Add)]
    to_vector = [layer for layer in member.layers if isinstance(layer, (layers.GlobalAveragePooling2D, layers.Flatten))]
    if to_vector:
        found.append(to_vector[-1].input)
    found = [tensor for tensor in found if len(tensor.shape) == 4]
    if not found:
        raise ModelLoadError(f"{member.name}: no convolutional features for the out-of-distribution gate")
    return found


def scoring_model(model: keras.Model, with_features: bool) -> keras.Model:
    """One network call for everything an answer needs: [the shipped model's output, each member's output on
    each view, and (`with_features`) the gate's pooled features of each member on the image as given]. The mean
    is computed as `average_of` computes it (same members, views and order), so it equals the model's output."""
    members, mirrored = members_of(model)
    members = members or [model]
    inputs = keras.Input(model.inputs[0].shape[1:], name="image")
    views = [inputs, mirror(inputs.shape[1])(inputs)] if mirrored else [inputs]
    outputs, features = [], []
    for member in members:
        tensors = feature_tensors(member) if with_features else []
        if tensors:
            plain, *maps = keras.Model(member.inputs, [member.outputs[0], *tensors], name=f"{member.name}_probe")(
                inputs
            )
        else:
            plain, maps = member(inputs), []
        outputs.append(plain)
        outputs.extend(member(view) for view in views[1:])
        for feature_map in maps:
            features.append(keras.ops.mean(feature_map, axis=(1, 2)))
            features.append(keras.ops.std(feature_map, axis=(1, 2)))
    mean = layers.Average(name="mean_prediction", dtype="float32")(outputs) if len(outputs) > 1 else outputs[0]
    return keras.Model(inputs, [mean, keras.ops.stack(outputs, axis=1), *features], name="scoring")


def feature_widths(scorer: keras.Model) -> list[int]:
    """The width of each feature output of a scoring model (what the gate file must match)."""
    return [int(shape[-1]) for shape in scorer.output_shape[2:]]


class GroupNormByChannelMoments(layers.Layer):
    """A trained `GroupNormalization` (channels last) computed from per-channel moments, for the ONNX export.

    tf2onnx lowers Keras' layer to five-dimensional reshapes and broadcasts that took three quarters of ONNX
    Runtime's time on this model (benchmarks/RESULTS.md). The same function from each channel's mean over the
    image, pooled over its group by a fixed matrix, then the same for the centred squares (two passes, as Keras
    computes it: no cancellation), then one scale a channel, ran 2.5 times faster. Lives only in the export:
    the saved Keras model keeps the real layer."""

    def __init__(self, trained: layers.GroupNormalization, **kwargs):
        super().__init__(name=f"{trained.name}_by_channel_moments", **kwargs)
        if trained.axis not in (-1, len(trained.input.shape) - 1):
            raise ValueError(f"{trained.name}: only channels-last group normalisation can be exported")
        channels, groups = int(trained.input.shape[-1]), trained.groups
        width = channels // groups
        self.group_mean = np.kron(np.eye(groups), np.full((width, width), 1 / width)).astype("float32")
        self.epsilon = trained.epsilon
        self.gamma = trained.gamma.numpy() if trained.scale else np.ones(channels, "float32")
        self.beta = trained.beta.numpy() if trained.center else np.zeros(channels, "float32")

    def call(self, x):
        spatial = tuple(range(1, len(x.shape) - 1))
        per_pixel = (slice(None),) + (None,) * len(spatial) + (slice(None),)
        centred = x - ops.matmul(ops.mean(x, axis=spatial), self.group_mean)[per_pixel]
        variance = ops.matmul(ops.mean(ops.square(centred), axis=spatial), self.group_mean)
        return centred * (self.gamma * ops.rsqrt(variance + self.epsilon))[per_pixel] + self.beta


def export_graph(scorer: keras.Model) -> keras.Model:
    """The scoring model with every group normalisation as `GroupNormByChannelMoments` (the other layers
    shared, so their weights are the trained ones): what `export_onnx` writes."""

    def swap(layer):
        return GroupNormByChannelMoments(layer) if isinstance(layer, layers.GroupNormalization) else layer

    return keras.models.clone_model(scorer, clone_function=swap, recursive=True)


def export_onnx(scorer: keras.Model, path: Path) -> None:
    """Write the scoring model as ONNX (through tf2onnx, the TensorFlow backend's exporter), group
    normalisation as `export_graph` computes it."""
    scorer = export_graph(scorer)
    scorer(keras.ops.zeros((1, *scorer.inputs[0].shape[1:])))  # the exporter wants a model that has been called
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its progress lines and numpy deprecation warnings are not the user's business
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scorer.export(str(path), format="onnx", verbose=False)
    finally:
        logger.setLevel(level)
