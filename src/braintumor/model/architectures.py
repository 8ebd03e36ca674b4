"""Model variants, chosen by `train.model`: each a small builder over the Keras 3 API (any backend).

Every model takes the prepared uint8 images as float input in 0..255 and does its own scaling, so the
saved `.keras` file needs no outside preprocessing. Augmentation layers come first: they are active only
during `fit`, run on the accelerator with the rest of the model, and are no-ops at inference.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

from braintumor.model.inference import jit_ready
from braintumor.model.intensity import (
    HeadStandardization,
    RandomBiasField,
    RandomContrastMap,
    RandomGamma,
    RandomRicianNoise,
)

# keras.applications backbones by model name.
BACKBONES = {"efficientnetb0": "EfficientNetB0", "resnet50": "ResNet50", "vgg16": "VGG16"}
# ResNet50 and VGG16 expect "caffe" inputs: BGR minus the ImageNet mean. Our three channels are equal, so the
# channel swap is a no-op and a Normalization layer (serialisable, unlike a Lambda) does the rest.
# EfficientNet scales its inputs itself.
CAFFE_MEAN_BGR = [103.939, 116.779, 123.68]


def augmentation(config: dict, seed: int) -> list[layers.Layer]:
    """Preprocessing layers from `train.augment`, geometry first, then intensity; an amount of 0 (or false)
    leaves a layer out."""
    steps = []
    if config["horizontal_flip"]:
        steps.append(layers.RandomFlip("horizontal", seed=seed))
    if config["rotation"]:
        steps.append(layers.RandomRotation(config["rotation"], fill_mode="constant", seed=seed))
    if config["zoom"]:
        steps.append(layers.RandomZoom(config["zoom"], fill_mode="constant", seed=seed))
    if config["translation"]:
        steps.append(
            layers.RandomTranslation(config["translation"], config["translation"], fill_mode="constant", seed=seed)
        )
    if config["brightness"]:
        steps.append(layers.RandomBrightness(config["brightness"], value_range=(0, 255), seed=seed))
    if config["contrast"]:
        steps.append(layers.RandomContrast(config["contrast"], value_range=(0, 255), seed=seed))
    if config["contrast_map"]:
        steps.append(RandomContrastMap(config["contrast_map"], seed=seed))
    if config["bias_field"]:
        steps.append(RandomBiasField(config["bias_field"], seed=seed))
    if config["gamma"]:
        steps.append(RandomGamma(config["gamma"], seed=seed))
    if config["blur"]:
        steps.append(layers.RandomGaussianBlur(config["blur"], kernel_size=5, value_range=(0, 255), seed=seed))
    if config["noise"]:
        steps.append(RandomRicianNoise(config["noise"], seed=seed))
    return steps


def head(outputs: int) -> layers.Layer:  # outputs: 1 (binary) or the number of classes
    """Sigmoid for the binary task, softmax otherwise; float32 so mixed precision stays stable."""
    return layers.Dense(outputs, activation="softmax" if outputs > 1 else "sigmoid", dtype="float32", name="prediction")


def seed_fsm(inputs, outputs: int, config: dict):
    """The reference notebook's first simple model."""
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    return head(outputs)(x), "adam"


def seed_cnn(inputs, outputs: int, config: dict):
    """The reference notebook's final model."""
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 2, activation="relu")(x)
    x = layers.Dropout(0.15)(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.Dropout(0.2)(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, activation="selu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    return head(outputs)(x), "rmsprop"


def small_xception(inputs, outputs: int, config: dict):
    """The default: a small Xception-style network (separable convolutions, residual blocks, global pooling)
    in the spirit of keras.io's "image classification from scratch".

    Group normalisation instead of batch norm: measured here, batch-norm moving statistics gathered on
    augmented batches did not fit clean images (mean P(tumor) on validation 0.28 at inference against 0.67
    in training mode after 2 epochs, and early stopping then kept epoch 1). Group norm has no moving
    statistics, so training and inference normalise alike."""
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.GroupNormalization(groups=8)(x)
    x = layers.Activation("relu")(x)
    previous = x
    for width in config["widths"]:
        x = layers.Activation("relu")(x)
        x = layers.SeparableConv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.GroupNormalization(groups=8)(x)
        x = layers.Activation("relu")(x)
        x = layers.SeparableConv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.GroupNormalization(groups=8)(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        residual = layers.Conv2D(width, 1, strides=2, padding="same")(previous)
        x = layers.add([x, residual])
        previous = x
    x = layers.SeparableConv2D(config["widths"][-1] * 2, 3, padding="same", use_bias=False)(x)
    x = layers.GroupNormalization(groups=8)(x)
    x = layers.Activation("relu", name="last_features")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(config["dropout"])(x)
    return head(outputs)(x), "adam"


def transfer(name: str) -> Callable:
    """A keras.applications backbone (ImageNet weights or none) with a new pooled head.

    The backbone is built on the model's own tensors, so its layers are layers of the saved model and
    `fine_tune_layers` can unfreeze the last N of them.
    """
    constructor = BACKBONES[name]

    def build(inputs, outputs: int, config: dict):
        x = inputs
        if name != "efficientnetb0":
            x = layers.Normalization(mean=CAFFE_MEAN_BGR, variance=[1.0] * 3, name=f"{name}_preprocess")(inputs)
        backbone = getattr(keras.applications, constructor)(
            include_top=False, weights=config["weights"], input_tensor=x
        )
        x = layers.GlobalAveragePooling2D()(backbone.output)
        x = layers.Dropout(config["dropout"])(x)
        return head(outputs)(x), "adam"

    return build


BUILDERS: dict[str, Callable] = {
    "seed_fsm": seed_fsm,
    "seed_cnn": seed_cnn,
    "small_xception": small_xception,
    **{name: transfer(name) for name in BACKBONES},
}


def build_model(
    name: str, image_size: int, classes: int, config: dict, seed: int, model_name: str | None = None
) -> tuple[keras.Model, str]:
    """The Keras model `name` (called `model_name`, default `name`) with augmentation in front; returns it
    with its optimizer's name.

    Args:
        name: a key of BUILDERS (`train.model`).
        image_size: side of the square input.
        classes: outputs of the head: 1 (binary) or the number of classes.
        config: the `train` section of params.
        seed: seeds the augmentation layers.
        model_name: the Keras model's name (fold models are told apart by it).
    """
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    for layer in augmentation(config["augment"], seed):
        x = layer(x)
    if config["standardize"]:
        x = HeadStandardization(name="head_standardization")(x)
    builder_config = {**config.get(name, {}), **config.get("transfer", {}), "dropout": config["dropout"]}
    outputs, optimizer = BUILDERS[name](x, classes, builder_config)
    return jit_ready(keras.Model(inputs, outputs, name=model_name or name)), optimizer
