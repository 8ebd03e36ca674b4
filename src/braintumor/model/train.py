"""The `train` stage: fit the chosen model variant, k-fold over train+val, and ship the average of the folds.

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
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from braintumor import paths
from braintumor.atomic import atomic_path, write_csv, write_json
from braintumor.data.datasets import SplitArrays, load_splits
from braintumor.data.placement import folds_of_groups, in_fixed_group
from braintumor.data.styles import style_clusters
from braintumor.labels import BINARY_CLASSES, MULTICLASS_CLASSES, SUBTYPE_CLASS, class_names, site_of
from braintumor.model.architectures import BACKBONES, build_model
from braintumor.model.distribution import batches_per_epoch, data_parallel, full_batches, process_share
from braintumor.model.inference import average_of, save_model, tumor_probability
from braintumor.params import validate_train
from braintumor.quality.label_issues import label_issues

log = logging.getLogger(__name__)

# Targets of `train.subtypes`: the four classes, plus "a tumor of unknown type" (the Kaggle 2018 tumors).
ANY_TUMOR = len(MULTICLASS_CLASSES)
ALLOWED_CLASSES = np.vstack([np.eye(ANY_TUMOR), [name != "no_tumor" for name in MULTICLASS_CLASSES]]).astype("float32")


def output_names(config: dict) -> list[str]:
    """The classes of the model's outputs: four for the multiclass task and for the binary task with
    `train.subtypes`, whose P(tumor) is 1 - P(no_tumor)."""
    return MULTICLASS_CLASSES if config["task"] == "multiclass" or config["subtypes"] else BINARY_CLASSES


def subtype_targets(data: dict) -> np.ndarray:
    """Targets for `train.subtypes`: the class index of a healthy scan or a tumor of known type, ANY_TUMOR for a
    tumor whose type its source does not give."""
    tumor_types = {
        subtype: MULTICLASS_CLASSES.index(name) for subtype, name in SUBTYPE_CLASS.items() if name != "no_tumor"
    }
    tumor = [tumor_types.get(subtype, ANY_TUMOR) for subtype in data["subtype"]]
    return np.where(data["label"] == 1, tumor, MULTICLASS_CLASSES.index("no_tumor")).astype(np.int64)


@keras.saving.register_keras_serializable(package="braintumor")
def subtype_crossentropy(y_true, y_pred):
    """-log P(the target's classes): cross-entropy for a known class, -log(1 - P(no_tumor)) for ANY_TUMOR.
    So the tumors of unknown type still teach tumor against no tumor, and the others teach their type too."""
    allowed = keras.ops.take(
        keras.ops.convert_to_tensor(ALLOWED_CLASSES), keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), axis=0
    )
    likelihood = keras.ops.sum(keras.ops.cast(y_pred, "float32") * allowed, axis=-1)
    return -keras.ops.log(keras.ops.clip(likelihood, 1e-7, 1.0))


def sample_weights(
    data: dict, names: list[str], mode: str, member_weight: str = "image", full_weight_images: int = 0
) -> tuple[np.ndarray | None, dict[str, float]]:
    """Per-image loss weights and the weight of each stratum, for `train.class_weight` and `train.member_weight`.

    `balanced`: every class carries the same total weight (sklearn's rule). `balanced_by_source`: every
    (source, class) stratum does, so that the scans of a small source (Kaggle 2018: 8 % of the images, and
    the tumors the models miss most) are not drowned by those of a large one. `balanced_by_collection`: every
    (source, sub-collection, class) stratum does, the sub-collections being a source's folders above its class
    folders (Kaggle 2020's Training and Testing). `balanced_by_style`: every (source, style, class) stratum
    does, the styles being clusters of the images' look (`data/styles.py`: view, sequence, framing), so that no
    style on its own predicts the class. `none`: no class weights.

    `member_weight: cluster` (for `dedup.keep: clusters`): the images of one dedup cluster share the weight of
    one image, so that 18 slices of one patient do not outweigh a single scan 18 to 1; `image`: each its own.

    `full_weight_images` (`train.full_weight_images`; 0 = off): a stratum of fewer images (clusters, with
    `member_weight: cluster`) weighs in proportion to its size. Ten verdicts from a new site (`data/site-*/`)
    then weigh as ten scans, not as a whole source's class: at that weight they cost the other sites 0.045
    test AUC (benchmarks/RESULTS.md, "How many of a site's own scans")."""
    base = np.ones(len(data["y"]))
    if member_weight == "cluster":
        _, members, counts = np.unique(data["cluster"], return_inverse=True, return_counts=True)
        base = 1.0 / counts[members]
    if mode == "none":
        return (None if member_weight == "image" else base), {}
    classes = np.array(names, dtype=object)[data["y"]]
    strata = classes
    if mode == "balanced_by_source":
        strata = data["source"].astype(object) + "/" + classes
    elif mode == "balanced_by_style":
        styles = style_clusters(data["x"], seed=0).astype(str).astype(object)
        strata = data["source"].astype(object) + "/style" + styles + "/" + classes
    elif mode == "balanced_by_collection":  # a source without sub-collections keeps its (source, class) strata
        strata = np.array(
            ["/".join(filter(None, key)) for key in zip(data["source"], data["collection"], classes, strict=True)],
            dtype=object,
        )
    keys, index = np.unique(strata, return_inverse=True)
    sizes = np.bincount(index, weights=base)
    weight = base.sum() / (len(keys) * sizes)
    if full_weight_images:
        weight = weight * np.minimum(1.0, sizes / full_weight_images)
    return base * weight[index], {str(k): round(float(w), 4) for k, w in zip(keys, weight, strict=True)}


class Batches(keras.utils.PyDataset):
    """(float32 images, targets, loss weights) a batch at a time, for `train.loader: stream`: only the batch is
    converted, and `images` may be `datasets.SplitImages`, read from the memory-mapped split as it goes.
    Given a `seed`, the order is shuffled before every epoch (seeded, so a rerun sees the same batches).
    Given `batches` (data-parallel training), the rows are first padded to exactly that many full batches with
    zero-weight repeats (`distribution.full_batches`, as the arrays loader pads): every batch then divides over
    the devices and every process takes as many steps as the others.

    Args:
        images: the images, an array or `datasets.SplitImages`.
        targets: what the loss compares the output with, row for row.
        weights: per-sample loss weights; None = all 1.
        batch_size: images per batch (per process in data-parallel training).
        seed: shuffles the order before every epoch; None keeps it.
        batches: pad to exactly this many full batches (data-parallel training); None: no padding.
    """

    def __init__(
        self,
        images,
        targets: np.ndarray,
        weights: np.ndarray | None,
        batch_size: int,
        seed: int | None = None,
        batches: int | None = None,
    ):
        super().__init__()
        self.rows = np.arange(len(targets))  # the image behind each position (padding repeats some)
        if batches is not None:
            self.rows, targets, weights = full_batches(self.rows, targets, weights, batch_size, batches)
        self.images, self.targets, self.weights, self.batch_size = images, targets, weights, batch_size
        self.rng = None if seed is None else np.random.default_rng(seed)
        self.order = np.arange(len(targets))
        self.on_epoch_end()

    def __len__(self) -> int:
        return -(-len(self.targets) // self.batch_size)

    def __getitem__(self, index: int) -> tuple:
        picked = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])  # sorted: file order
        batch = (np.asarray(self.images[self.rows[picked]], dtype="float32"), self.targets[picked])
        return batch if self.weights is None else (*batch, self.weights[picked].astype("float32"))

    def on_epoch_end(self) -> None:
        if self.rng is not None:
            self.rng.shuffle(self.order)


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


def compile_model(model: keras.Model, optimizer: str, learning_rate: float, config: dict) -> None:
    """Compile for the task, with `train.weight_decay` (Keras applies it decoupled, as AdamW does, to any optimizer)."""
    if output_names(config) == BINARY_CLASSES:
        loss, metrics = "binary_crossentropy", ["accuracy", keras.metrics.Recall(name="recall")]
    elif config["task"] == "multiclass":
        loss, metrics = "sparse_categorical_crossentropy", ["accuracy"]
    else:  # binary, learnt through the four-way head of `train.subtypes`
        loss, metrics = subtype_crossentropy, []
    model.compile(
        optimizer=keras.optimizers.get(
            {
                "class_name": optimizer,
                "config": {"learning_rate": learning_rate, "weight_decay": config["weight_decay"] or None},
            }
        ),
        loss=loss,
        metrics=metrics,
    )


def fit(
    params: dict,
    train: dict,
    val: dict,
    callbacks: list | None = None,
    verbose: int = 2,
    name: str | None = None,
    update_on: dict | None = None,
) -> tuple[keras.Model, dict]:
    """Build and fit the model of `params["train"]` (called `name`) on one device, or on all of them with
    `train.distribution: data_parallel`; early stopping on `val` restores the best epoch. Returns the model (which
    predicts on one device, whatever it was trained on) and a summary.

    Args:
        params: the whole params.yaml (`train`, `split.image_size`, `seed`).
        train: the fitting set (x, y, label, source, ... as `load_splits` gives).
        val: the early-stopping set.
        callbacks: extra Keras callbacks (the stage's dvclive logger).
        verbose: Keras' fit verbosity.
        name: the model's name.
        update_on: after the fit, `update_after_fit` on this set (`train` with a small site's scans), or None.
    """
    config = validate_train(params)
    distribution = data_parallel(config["distribution"], config["batch_size"])
    if distribution is None:
        model, summary = fit_on_devices(params, config, train, val, callbacks, verbose, name, config["batch_size"])
        if update_on is not None:
            summary |= update_after_fit(model, params, config, update_on, val, callbacks, verbose, config["batch_size"])
        return model, summary
    per_process = config["batch_size"] // jax_process_count()
    steps = tuple(batches_per_epoch(len(data["y"]), per_process) for data in (train, val))
    with distribution.scope():
        model, summary = fit_on_devices(
            params, config, process_share(train), process_share(val), callbacks, verbose, name, per_process, steps
        )
        if update_on is not None:
            steps = (batches_per_epoch(len(update_on["y"]), per_process), steps[1])
            summary |= update_after_fit(
                model,
                params,
                config,
                process_share(update_on),
                process_share(val),
                callbacks,
                verbose,
                per_process,
                steps,
            )
    return model, summary


def jax_process_count() -> int:
    import jax

    return jax.process_count()


def weighted_targets(config: dict, train: dict, val: dict) -> tuple[dict, dict, tuple, dict[str, float]]:
    """(train, val with the head's targets, (their loss weights), each stratum's weight): for the fit and the update.

    The weights balance the task's classes, whatever the head. Early stopping's get the same balance but no floor:
    a held-out fold's strata are a fifth of the pool's, and a floor there would reweigh Kaggle 2018's healthy scans
    (about 12 a fold) and change the shipped model."""
    task_names = class_names(config["task"])
    weights, strata = sample_weights(
        train, task_names, config["class_weight"], config["member_weight"], config["full_weight_images"]
    )
    held_out_weights, _ = sample_weights(val, task_names, config["class_weight"])
    if output_names(config) != task_names:
        train, val = ({**data, "y": subtype_targets(data)} for data in (train, val))
    return train, val, (weights, held_out_weights), strata


def fit_on_devices(
    params: dict,
    config: dict,
    train: dict,
    val: dict,
    callbacks: list | None,
    verbose: int,
    name: str | None,
    batch_size: int,
    steps: tuple[int, int] | None = None,
) -> tuple[keras.Model, dict]:
    """`fit` under the distribution in force: none, or data parallel.

    Args:
        params: the whole params.yaml (its seed); config: its validated `train` section.
        train, val: the fit and held-out (early stopping) images of this process.
        callbacks: more Keras callbacks (dvclive's); verbose: Keras' verbosity.
        name: the model's name (one per fold).
        batch_size: rows a step in this process.
        steps: (train, validation) batches an epoch that every process of a data-parallel job takes, or None.
    """
    keras.utils.set_random_seed(params["seed"])
    deterministic_kernels()
    keras.mixed_precision.set_global_policy("mixed_float16" if config["mixed_precision"] else "float32")
    names = output_names(config)
    image_size = train["x"].shape[1]
    outputs = 1 if len(names) == 2 else len(names)  # one sigmoid unit for the binary task
    model, optimizer = build_model(config["model"], image_size, outputs, config, params["seed"], name)
    pretrained = config["model"] in BACKBONES and config["transfer"]["weights"] is not None
    if pretrained:  # phase 1: only the new head learns
        for layer in model.layers[:-3]:
            layer.trainable = False
    compile_model(model, optimizer, config["learning_rate"], config)
    train, val, weights, strata = weighted_targets(config, train, val)
    schedule = [
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=config["reduce_lr_patience"], min_lr=1e-6
        ),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config["early_stopping_patience"], restore_best_weights=True
        ),
    ]
    fit_data, held_out = fit_inputs(config["loader"], train, val, weights, batch_size, params["seed"], steps)
    started = time.perf_counter()
    history = model.fit(
        **fit_data,
        epochs=config["epochs"],
        validation_data=held_out,
        callbacks=schedule + (callbacks or []),
        verbose=verbose,
    )
    losses = history.history["val_loss"]
    epochs_run = len(losses)
    if pretrained and config["transfer"]["fine_tune_epochs"]:  # phase 2: unfreeze the last N backbone layers
        losses = losses + fine_tune(
            model, optimizer, config, fit_data, held_out, schedule + (callbacks or []), epochs_run, verbose
        )
        epochs_run = len(losses)
    seconds = time.perf_counter() - started
    summary = {
        "epochs_run": epochs_run,
        "best_epoch": int(np.argmin(losses)) + 1,
        "train_seconds": round(seconds, 1),
        "train_images_per_second": round(len(train["x"]) * epochs_run / seconds, 1),
        "class_weight": strata,
    }
    return model, summary


def update_after_fit(
    model: keras.Model,
    params: dict,
    config: dict,
    data: dict,
    val: dict,
    callbacks: list | None,
    verbose: int,
    batch_size: int,
    steps: tuple[int, int] | None = None,
) -> dict:
    """The update way of `train.sites`: the fitted `model`, `update_epochs` more epochs on `data` (its fitting
    images with a small site's scans among them: the pool is replayed, so the other sites are not forgotten) at
    `update_learning_rate_factor` of the learning rate, no early stopping. Under about 25 of a site's scans this
    lifts the site where a retrain does not (benchmarks/RESULTS.md, "Kaggle 2018 as the new site").

    Args:
        model: the fitted model (early stopping has restored its best epoch).
        params: the whole params.yaml (its seed); config: its validated `train` section.
        data: the images of the update; val: the held-out fold, for the logged validation figures only.
        callbacks: the stage's dvclive logger, or None; verbose: Keras' verbosity.
        batch_size: rows a step in this process.
        steps: as for `fit_inputs` (data-parallel training), or None.
    """
    sites, images = config["sites"], len(data["y"])
    data, val, weights, _ = weighted_targets(config, data, val)
    keras.utils.set_random_seed(params["seed"])
    optimizer = model.optimizer.__class__.__name__
    compile_model(model, optimizer, config["learning_rate"] * sites["update_learning_rate_factor"], config)
    fit_data, held_out = fit_inputs(config["loader"], data, val, weights, batch_size, params["seed"], steps)
    started = time.perf_counter()
    model.fit(
        **fit_data, epochs=sites["update_epochs"], validation_data=held_out, callbacks=callbacks or [], verbose=verbose
    )
    return {
        "update_epochs": sites["update_epochs"],
        "update_images": images,
        "update_seconds": round(time.perf_counter() - started, 1),
    }


def joining_by_update(pool: dict, retrain_from: int) -> tuple[np.ndarray, dict[str, dict]]:
    """Per row of the pool: a scan of a site (`data/site-<name>/`) with fewer than `retrain_from` scans (cluster
    representatives) in the pool, which `train.sites` adds by an update; and each site's scans and way."""
    site = np.array([site_of(s, c) for s, c in zip(pool["source"], pool["collection"], strict=True)], dtype=object)
    names, index = np.unique(site, return_inverse=True)
    scans = np.bincount(index, weights=pool["representative"], minlength=len(names)).astype(int)
    by_update = (names != "") & (scans < retrain_from)
    if by_update[index].all():  # nothing else to fit first: the sites are the pool
        by_update[:] = False
    ways = {
        str(name): {"scans": int(n), "way": "update" if small else "retrain"}
        for name, n, small in zip(names, scans, by_update, strict=True)
        if name
    }
    return by_update[index], ways


def without_training_state(model: keras.Model) -> keras.Model:
    """The fitted `model` rebuilt from its config with its weights, uncompiled: the archive that ships then names
    no optimizer or loss, and loads where the training code (the subtype head's loss) is not imported."""
    rebuilt = model.__class__.from_config(model.get_config())
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def deterministic_kernels() -> None:
    """TensorFlow's deterministic op variants, so that a rerun on one machine gives the same weights: at no
    measured cost, 17 default fits gave one divergent model and 11 deterministic fits none, each the default's
    usual weights (benchmarks/training_determinism.py). For this process; other backends are left as they are."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def fit_inputs(
    loader: str,
    train: dict,
    val: dict,
    weights: tuple[np.ndarray | None, np.ndarray | None],
    batch_size: int,
    seed: int,
    steps: tuple[int, int] | None,
) -> tuple[dict, object]:
    """`model.fit`'s data arguments and its validation data, for `train.loader`.

    Args:
        loader: `arrays` (each split as one float32 array) or `stream` (a batch at a time from the split's files).
        train, val: the fit and held-out images (`x`, `y`).
        weights: per-image loss weights of train and of val, or None.
        batch_size: rows a step in this process.
        seed: the stream loader's shuffling seed (the arrays loader shuffles through Keras).
        steps: (train, val) batches an epoch that every process of a data-parallel job takes, or None.
    """
    train_weights, val_weights = weights
    if loader == "stream":  # a batch of float32 at a time, read from the split's files
        train_steps, val_steps = steps or (None, None)
        fit_data = {"x": Batches(train["x"], train["y"], train_weights, batch_size, seed, train_steps)}
        return fit_data, Batches(val["x"], val["y"], val_weights, batch_size, batches=val_steps)
    fit_data = {
        "x": np.asarray(train["x"], dtype="float32"),
        "y": train["y"],
        "sample_weight": train_weights,
        "batch_size": batch_size,
        "shuffle": True,
    }
    held_out = (np.asarray(val["x"], dtype="float32"), val["y"]) + ((val_weights,) if val_weights is not None else ())
    if steps:  # every sharded batch, the last ones too, must divide evenly over the devices
        x, y, w = full_batches(fit_data["x"], fit_data["y"], train_weights, batch_size, steps[0])
        fit_data.update(x=x, y=y, sample_weight=w)
        held_out = full_batches(*held_out[:2], val_weights, batch_size, steps[1])
    return fit_data, held_out


def fine_tune(
    model: keras.Model,
    optimizer: str,
    config: dict,
    fit_data: dict,
    held_out,
    callbacks: list,
    epochs_run: int,
    verbose: int,
) -> list[float]:
    """Phase 2 of a pretrained backbone: the last `transfer.fine_tune_layers` layers (batch norm stays frozen)
    learn at `transfer.fine_tune_learning_rate` for `transfer.fine_tune_epochs` more epochs. Returns their
    validation losses.

    Args:
        model: the fitted model, backbone frozen.
        optimizer: its optimizer's name.
        config: the `train` section.
        fit_data: what `fit_inputs` made of the fitting set.
        held_out: the validation data (arrays or a PyDataset).
        callbacks: the phase-1 callbacks (early stopping, learning rate, logging).
        epochs_run: epochs of phase 1: phase 2 counts on from there.
        verbose: Keras' fit verbosity.
    """
    for layer in model.layers[-3 - config["transfer"]["fine_tune_layers"] : -3]:
        if not isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = True
    compile_model(model, optimizer, config["transfer"]["fine_tune_learning_rate"], config)
    more = model.fit(
        **{key: value for key, value in fit_data.items() if key != "shuffle"},
        epochs=epochs_run + config["transfer"]["fine_tune_epochs"],
        initial_epoch=epochs_run,
        validation_data=held_out,
        callbacks=callbacks,
        verbose=verbose,
    )
    return more.history["val_loss"]


def cross_validation_pool(split_dir: str | Path, task: str, lazy: bool = False) -> SplitArrays:
    """train+val as one pool; each image keeps its dedup group, so near duplicates never straddle two folds,
    and its `representative` flag: only representatives are held out and scored (a cluster counts once).
    `lazy`: the images stay in the split's memory-mapped files (`train.loader: stream`)."""
    return load_splits(split_dir, ("train", "val"), task, lazy)


def folds_of(pool: SplitArrays, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, held-out rows) per fold: stratified by label, grouped by dedup cluster, seeded.

    The folds are drawn over the representatives alone, so they are the same with and without the clusters'
    members; a member fits with its group and is never held out. The public sources' groups are drawn together,
    the user's `data/` a group at a time (`data/placement.py`): a site's new scans never move an image to another
    fold, so each fold model of the model in use still never saw its held-out fold."""
    fixed = in_fixed_group(pool["source"], pool["group"])
    drawn = np.flatnonzero(pool["representative"] & fixed)  # the public groups, drawn together
    fold_of_group = folds_of_groups(pool["path"][~fixed], pool["group"][~fixed], folds, seed)
    if len(drawn):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        for fold, (_, held) in enumerate(splitter.split(drawn, pool["label"][drawn], pool["group"][drawn])):
            fold_of_group.update(dict.fromkeys(pool["group"][drawn[held]], fold))
    reps = np.flatnonzero(pool["representative"])
    fold_of = np.array([fold_of_group[g] for g in pool["group"]])
    return [(np.flatnonzero(fold_of != k), reps[fold_of[reps] == k]) for k in range(folds)]


def fit_folds(
    params: dict, pool: dict, callbacks_for=None, verbose: int = 2
) -> tuple[list[keras.Model], list[dict], np.ndarray, np.ndarray]:
    """Fit one model per fold of `pool` (train+val), each early-stopped on its held-out fold, and predict that
    fold as the shipped model will (with the mirrored view when `train.mirror_average`).

    Returns (fold models, a summary per fold, the out-of-fold P(tumor) and the fold of each representative).
    `callbacks_for(fold)` gives extra callbacks for a fold's `fit` (the train stage's dvclive logger)."""
    config = validate_train(params)
    names = output_names(config)
    folds = folds_of(pool, config["folds"], params["seed"])
    by_update, _ = joining_by_update(pool, config["sites"]["retrain_from"])
    members, summaries = [], []
    oof, fold_of = np.full(len(pool["x"]), np.nan), np.full(len(pool["x"]), -1, dtype=np.int8)
    for fold, (fit_rows, held_rows) in enumerate(folds):
        # a small site's scans are out of the first fit and out of its early stopping, so that the update starts
        # from the very fold model the pool gives without them; every held-out scan is scored
        first_fit, stop_rows = (rows[~by_update[rows]] for rows in (fit_rows, held_rows))
        fit_set, held_set = ({k: v[r] for k, v in pool.items()} for r in (first_fit, held_rows))
        stop_set = held_set if len(stop_rows) == len(held_rows) else {k: v[stop_rows] for k, v in pool.items()}
        updated = len(first_fit) < len(fit_rows)
        model, summary = fit(
            params,
            fit_set,
            stop_set,
            callbacks=callbacks_for(fold) if callbacks_for else None,
            verbose=verbose,
            name=f"{config['model']}_fold{fold}",
            update_on={k: v[fit_rows] for k, v in pool.items()} if updated else None,
        )
        seen_as_shipped = average_of([model], mirrored=True) if config["mirror_average"] else model
        oof[held_rows], fold_of[held_rows] = tumor_probability(seen_as_shipped, held_set["x"], names), fold
        members.append(model)
        summaries.append({"fold": fold, "images": len(first_fit), "held_out": len(held_rows), **summary})
        log.info(
            "train: fold %d/%d: %d epochs (best %d), %.0f images/s",
            fold + 1,
            len(folds),
            summary["epochs_run"],
            summary["best_epoch"],
            summary["train_images_per_second"],
        )
    reps = pool["representative"]
    return members, summaries, oof[reps], fold_of[reps]


def without_label_issues(pool: dict, oof: np.ndarray) -> tuple[dict, pd.DataFrame]:
    """`train.clean_learning`: the pool without the clusters whose representative cleanlab flags on its
    out-of-fold score, and a row per left-out image (members of a flagged cluster share its label, so they go
    too). The test split is never touched: its metrics use every test image as labelled."""
    reps = np.flatnonzero(pool["representative"])
    flagged, quality = label_issues(pool["label"][reps], oof)
    out = np.isin(pool["cluster"], pool["cluster"][reps[flagged]])
    first_pass = pd.Series(oof, index=pool["path"][reps])
    rows = np.flatnonzero(out)
    excluded = pd.DataFrame(
        {
            "path": pool["path"][rows],
            "label": pool["label"][rows],
            "p_tumor": np.round(first_pass.reindex(pool["path"][rows]).to_numpy(), 6),
            "label_quality": np.round(pd.Series(quality, index=pool["path"][reps]).reindex(pool["path"][rows]), 6),
            "reason": np.where(
                pool["representative"][rows],
                "clean_learning: cleanlab flag",
                "clean_learning: member of a flagged cluster",
            ),
        }
    )
    return {key: value[~out] for key, value in pool.items()}, excluded


def with_left_out_scored(
    pool: dict, kept: dict, oof: np.ndarray, fold_of: np.ndarray, ensemble: keras.Model, names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold P(tumor) and fold for every representative of `pool`, as without clean learning, so that two
    experiments compare on the same images. Those clean learning left out were seen by no model of the second
    fit, so the shipped ensemble scores them; their fold is -1, and evaluate places the threshold without them.

    Args:
        pool: train+val as `cross_validation_pool` gives it.
        kept: the pool without clean learning's left-out clusters.
        oof: out-of-fold P(tumor) of `kept`'s representatives.
        fold_of: their folds.
        ensemble: the shipped model.
        names: its class names.
    """
    reps, kept_reps = pool["path"][pool["representative"]], kept["path"][kept["representative"]]
    scores = pd.Series(oof, index=kept_reps).reindex(reps)
    folds = pd.Series(fold_of, index=kept_reps).reindex(reps).fillna(-1).astype(np.int8)
    left_out = np.flatnonzero(scores.isna().to_numpy())
    rows = np.flatnonzero(pool["representative"])[left_out]
    scores.iloc[left_out] = tumor_probability(ensemble, pool["x"][rows], names)
    return scores.to_numpy(), folds.to_numpy()


def train(
    params: dict,
    split_dir: str | Path = paths.SPLIT_DIR,
    model_dir: str | Path = paths.TRAIN_DIR,
    metrics_path: str | Path = paths.STAGE_METRICS["train"],
    live_dir: str | Path = paths.TRAIN_LIVE_DIR,
) -> dict:
    """Run the train stage: k fold models over train+val, each early-stopped on its held-out fold, shipped as
    one model that averages them. The held-out predictions (out of fold) go to `oof.npz`, where `evaluate`
    places the threshold: they come from the very models that ship, so the threshold fits the shipped model.

    Writes `model.keras`, `model.json` (what inference needs but the threshold, which `evaluate` adds when it
    writes the deployable copy to `models/`) and `oof.npz`.

    Args:
        params: the whole params.yaml.
        split_dir: the split stage's output.
        model_dir: where model.keras, model.json and oof.npz go.
        metrics_path: the stage's metrics JSON.
        live_dir: dvclive's folder (per-epoch metrics and plots).
    """
    from dvclive import Live

    config = validate_train(params)
    task, names = config["task"], output_names(config)
    pool = cross_validation_pool(split_dir, task, lazy=config["loader"] == "stream")
    log.info(
        "train: %s (%s), %d fold models over %d train+val images, backend %s",
        config["model"],
        task,
        config["folds"],
        len(pool["x"]),
        keras.backend.backend(),
    )

    def live_metrics(fold: int, prefix: str = "") -> list:
        live.step = 0
        return [LiveMetrics(live, f"{prefix}fold{fold}/")]

    _, sites = joining_by_update(pool, config["sites"]["retrain_from"])
    for site, how in sites.items():
        log.info(
            "train: %s: %d scans, joins by %s (train.sites.retrain_from %d)",
            site,
            how["scans"],
            how["way"],
            config["sites"]["retrain_from"],
        )
    excluded = None
    with Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        members, summaries, oof, fold_of = fit_folds(params, pool, live_metrics)
        if config["clean_learning"]:
            kept, excluded = without_label_issues(pool, oof)
            log.info("train: clean learning: %d images flagged by cleanlab; fitting again without them", len(excluded))
            members, summaries, oof, fold_of = fit_folds(
                params, kept, lambda fold: live_metrics(fold, "clean_learning/")
            )
    ensemble = average_of([without_training_state(member) for member in members], mirrored=config["mirror_average"])
    if config["clean_learning"]:
        oof, fold_of = with_left_out_scored(pool, kept, oof, fold_of, ensemble, names)
    info = {
        "model": config["model"],
        "task": task,
        "class_names": names,
        "subtypes": names != class_names(task),
        "folds": len(members),
        "image_size": int(pool["x"].shape[1]),
        "input": "uint8 RGB image scaled to image_size, 0..255 float",
        "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__,
    }
    with atomic_path(model_dir) as staging:
        staging.mkdir()
        save_model(ensemble, staging / "model.keras")
        (staging / "model.json").write_text(json.dumps(info, indent=2) + "\n")
        reps = pool["representative"]
        np.savez(staging / "oof.npz", path=pool["path"][reps], label=pool["label"][reps], probability=oof, fold=fold_of)
        if config["clean_learning"]:
            write_csv(staging / "excluded.csv", excluded)
    seconds = sum(s["train_seconds"] for s in summaries)
    metrics = {
        "folds": len(members),
        "params": ensemble.count_params(),
        "train_seconds": round(seconds, 1),
        "train_images_per_second": round(sum(s["images"] * s["epochs_run"] for s in summaries) / seconds, 1),
        "epochs_run": sum(s["epochs_run"] for s in summaries),
        "class_weight": summaries[0]["class_weight"],
        "out_of_fold_auc": round(float(roc_auc_score(pool["label"][pool["representative"]], oof)), 4),
        **({"clean_learning_excluded": len(excluded)} if config["clean_learning"] else {}),
        **({"sites": sites} if sites else {}),
        "members": [{k: v for k, v in s.items() if k != "class_weight"} for s in summaries],
    }
    write_json(metrics_path, metrics)
    log.info(
        "train: %s ensemble of %d, %d epochs in all, %.0f images/s, out-of-fold ROC AUC %.4f",
        config["model"],
        len(members),
        metrics["epochs_run"],
        metrics["train_images_per_second"],
        metrics["out_of_fold_auc"],
    )
    return metrics
