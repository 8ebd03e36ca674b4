"""The `train` stage: fit the chosen model variant on the prepared arrays and save it for inference.

Keras 3 API only (no backend imports), so the same code trains on TensorFlow (the default, on the GPU when
there is one), JAX or PyTorch, whichever `KERAS_BACKEND` names. Per-epoch metrics go to dvclive through a
small backend-agnostic callback (dvclive's own Keras callback needs TensorFlow).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import keras
import numpy as np

from braintumor.atomic import atomic_path, write_json
from braintumor.models import BACKBONES, build_model
from braintumor.params import validate_train

log = logging.getLogger(__name__)

BINARY_CLASSES = ["no_tumor", "tumor"]
MULTICLASS_CLASSES = ["glioma", "meningioma", "no_tumor", "pituitary"]
SUBTYPE_CLASS = {"glioma": "glioma", "meningioma": "meningioma", "none": "no_tumor", "pituitary": "pituitary"}


def class_names(task: str) -> list[str]:
    return BINARY_CLASSES if task == "binary" else MULTICLASS_CLASSES


def load_split(split_dir: str | Path, name: str, task: str) -> dict[str, np.ndarray]:
    """Arrays of one split for `task`: x (uint8 images), y (class index), plus path/subtype/label.

    The multiclass task keeps only images whose tumor type is known."""
    with np.load(Path(split_dir) / f"{name}.npz") as data:
        arrays = {key: data[key] for key in data.files}
    arrays["label"] = arrays.pop("y").astype(np.int64)
    if task == "binary":
        arrays["y"] = arrays["label"]
        return arrays
    known = np.isin(arrays["subtype"], list(SUBTYPE_CLASS))
    arrays = {key: value[known] for key, value in arrays.items()}
    arrays["y"] = np.array([MULTICLASS_CLASSES.index(SUBTYPE_CLASS[s]) for s in arrays["subtype"]], dtype=np.int64)
    return arrays


def class_weights(y: np.ndarray, classes: int, mode: str) -> dict[int, float] | None:
    """`balanced`: weights inversely proportional to class frequency (sklearn's rule); `none`: no weights."""
    if mode == "none":
        return None
    counts = np.bincount(y, minlength=classes).astype(float)
    return {c: float(len(y) / (classes * counts[c])) for c in range(classes) if counts[c]}


class LiveMetrics(keras.callbacks.Callback):
    """Log every epoch's metrics and learning rate to dvclive (works on every Keras backend)."""

    def __init__(self, live, prefix: str = ""):
        super().__init__()
        self.live = live
        self.prefix = prefix

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            split = "val" if key.startswith("val_") else "train"
            self.live.log_metric(f"{self.prefix}{split}/{key.removeprefix('val_')}", float(value))
        self.live.next_step()


def compile_model(model: keras.Model, optimizer: str, learning_rate: float, classes: int) -> None:
    binary = classes == 2
    model.compile(
        optimizer=keras.optimizers.get({"class_name": optimizer, "config": {"learning_rate": learning_rate}}),
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        metrics=["accuracy", keras.metrics.Recall(name="recall")] if binary else ["accuracy"],
    )


def fit(params: dict, train: dict, val: dict | None, epochs: int | None = None, callbacks: list | None = None,
        verbose: int = 2) -> tuple[keras.Model, dict]:
    """Build and fit the model of `params["train"]`. With `val`, early stopping restores the best epoch;
    without it (cross-validation folds), it runs `epochs` epochs. Returns the model and a summary."""
    config = validate_train(params)
    keras.utils.set_random_seed(params["seed"])
    keras.mixed_precision.set_global_policy("mixed_float16" if config["mixed_precision"] else "float32")
    classes = len(class_names(config["task"]))
    image_size = train["x"].shape[1]
    outputs = 1 if classes == 2 else classes  # one sigmoid unit for the binary task
    model, optimizer = build_model(config["model"], image_size, outputs, config, params["seed"])
    pretrained = config["model"] in BACKBONES and config["transfer"]["weights"] is not None
    if pretrained:  # phase 1: only the new head learns
        for layer in model.layers[:-3]:
            layer.trainable = False
    compile_model(model, optimizer, config["learning_rate"], classes)
    weights = class_weights(train["y"], classes, config["class_weight"])
    monitor = "val_loss" if val is not None else "loss"
    schedule = [keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.5, patience=config["reduce_lr_patience"],
                                                  min_lr=1e-6)]
    if val is not None:
        schedule.append(keras.callbacks.EarlyStopping(monitor=monitor, patience=config["early_stopping_patience"],
                                                      restore_best_weights=True))
    x_val = (val["x"].astype("float32"), val["y"]) if val is not None else None
    started = time.perf_counter()
    history = model.fit(
        train["x"].astype("float32"), train["y"], batch_size=config["batch_size"], epochs=epochs or config["epochs"],
        validation_data=x_val, class_weight=weights, callbacks=schedule + (callbacks or []), verbose=verbose,
        shuffle=True,
    )
    losses = history.history[monitor]
    epochs_run = len(losses)
    if pretrained and config["transfer"]["fine_tune_epochs"]:  # phase 2: unfreeze the last N backbone layers
        for layer in model.layers[-3 - config["transfer"]["fine_tune_layers"] : -3]:
            if not isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = True
        compile_model(model, optimizer, config["transfer"]["fine_tune_learning_rate"], classes)
        more = model.fit(
            train["x"].astype("float32"), train["y"], batch_size=config["batch_size"],
            epochs=epochs_run + config["transfer"]["fine_tune_epochs"], initial_epoch=epochs_run,
            validation_data=x_val, class_weight=weights, callbacks=schedule + (callbacks or []), verbose=verbose,
        )
        losses = losses + more.history[monitor]
        epochs_run = len(losses)
    seconds = time.perf_counter() - started
    summary = {
        "epochs_run": epochs_run,
        "best_epoch": int(np.argmin(losses)) + 1 if val is not None else epochs_run,
        "train_seconds": round(seconds, 1),
        "train_images_per_second": round(len(train["x"]) * epochs_run / seconds, 1),
        "class_weight": {class_names(config["task"])[c]: round(w, 4) for c, w in (weights or {}).items()},
    }
    return model, summary


def train(params: dict, split_dir: str | Path = "artifacts/split", model_dir: str | Path = "artifacts/train",
          metrics_path: str | Path = "metrics/train.json", live_dir: str | Path = "metrics/train") -> dict:
    """Run the train stage: `model.keras` plus `model.json` (what inference needs but the threshold, which
    `evaluate` chooses and adds when it writes the deployable copy to `models/`)."""
    from dvclive import Live

    config = validate_train(params)
    task = config["task"]
    train_set, val_set = load_split(split_dir, "train", task), load_split(split_dir, "val", task)
    log.info("train: %s (%s) on %d images, validating on %d, backend %s", config["model"], task,
             len(train_set["x"]), len(val_set["x"]), keras.backend.backend())
    with Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        model, summary = fit(params, train_set, val_set, callbacks=[LiveMetrics(live)])
    val_scores = model.evaluate(val_set["x"].astype("float32"), val_set["y"], verbose=0, return_dict=True)
    info = {
        "model": config["model"], "task": task, "class_names": class_names(task),
        "image_size": int(train_set["x"].shape[1]), "input": "uint8 RGB image scaled to image_size, 0..255 float",
        "best_epoch": summary["best_epoch"], "keras_backend": keras.backend.backend(), "keras_version": keras.__version__,
    }
    with atomic_path(model_dir) as staging:
        staging.mkdir()
        model.save(staging / "model.keras")
        (staging / "model.json").write_text(json.dumps(info, indent=2) + "\n")
    metrics = {**summary, "params": model.count_params(),
               "val": {key: round(float(value), 4) for key, value in val_scores.items()}}
    write_json(metrics_path, metrics)
    log.info("train: %s, %d epochs (best %d), %.0f images/s, val %s", config["model"], summary["epochs_run"],
             summary["best_epoch"], summary["train_images_per_second"], metrics["val"])
    return metrics
