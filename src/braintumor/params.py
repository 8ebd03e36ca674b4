"""Load params.yaml and validate it before any work starts, naming the offending param in every error.

A key this project does not know is an error too, with the nearest known name: a misspelt key (`train.epoch`,
or `dvc exp run -S train.epoch=5`, which adds it beside `train.epochs`) would otherwise be ignored silently.
Counts have upper bounds: a value past them is a typo or a run that cannot end on a 2-core, 24 GiB machine.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import yaml

from braintumor.errors import ParamError
from braintumor.labels import MODALITIES

SOURCE_NAMES = ("kaggle2018", "kaggle2020", "ixi", "local")
IXI_PLANES = ("axial", "coronal", "sagittal")
SPLIT_NAMES = ("train", "val", "test")


# Every key params.yaml may hold: a dict for a section, None for a value. `fetch.sources` names each source.
_SOURCE = {"enabled": None}
KNOWN: dict = {
    "seed": None,
    "fetch": {
        "workers": None,
        "max_image_pixels": None,
        "overrides": None,
        "modalities": None,
        "modality_review": None,
        "sources": {
            "kaggle2018": {**_SOURCE, "handle": None},
            "kaggle2020": {**_SOURCE, "handle": None},
            "ixi": {
                **_SOURCE,
                "urls": None,
                "max_subjects": None,
                "slices_per_volume": None,
                "planes": None,
                "timeout_s": None,
                "deadline_s": None,
            },
            "local": {**_SOURCE, "path": None},
        },
    },
    "dedup": dict.fromkeys(
        ["hash_size", "phash_max_distance", "dhash_max_distance", "keep", "review_pairs", "workers"]
    ),
    "split": {"fractions": dict.fromkeys(["train", "val", "test"]), "image_size": None, "workers": None},
    "train": {
        **dict.fromkeys(
            [
                "model",
                "task",
                "subtypes",
                "folds",
                "epochs",
                "batch_size",
                "learning_rate",
                "weight_decay",
                "dropout",
                "class_weight",
                "member_weight",
                "full_weight_images",
                "clean_learning",
                "loader",
                "early_stopping_patience",
                "reduce_lr_patience",
                "mixed_precision",
                "mirror_average",
                "distribution",
                "standardize",
            ]
        ),
        "augment": dict.fromkeys(
            [
                "horizontal_flip",
                "rotation",
                "zoom",
                "translation",
                "brightness",
                "contrast",
                "bias_field",
                "gamma",
                "blur",
                "noise",
                "contrast_map",
            ]
        ),
        "small_xception": {"widths": None},
        "transfer": dict.fromkeys(["weights", "fine_tune_layers", "fine_tune_epochs", "fine_tune_learning_rate"]),
        "sites": dict.fromkeys(["retrain_from", "update_epochs", "update_learning_rate_factor"]),
    },
    "evaluate": dict.fromkeys(["target_recall", "uncertain_errors", "bootstrap", "gallery"]),
    "review": {"gallery": None},
    "explain": dict.fromkeys(["images", "lime_samples", "lime_superpixels"]),
    "generalize": dict.fromkeys(["hold_outs", "folds", "gallery"]),
    "register": dict.fromkeys(
        ["experiment", "model_name", "min_recall", "min_accuracy", "min_specificity", "champion_on_new_data"]
    ),
}


def check_known(params: dict, section: str | None = None) -> None:
    """Refuse any key of `params` (or of one top-level `section`) that KNOWN does not list, naming the nearest
    known key."""

    def walk(node: dict, known: dict, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if key not in known:
                near = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
                hint = f"; did you mean `{prefix}{near[0]}`?" if near else f"; known keys here: {', '.join(known)}"
                raise ParamError(f"params.yaml: unknown key `{dotted}`{hint}")
            if isinstance(known[key], dict) and isinstance(value, dict):
                walk(value, known[key], f"{dotted}.")

    if section is None:
        walk(params, KNOWN, "")
    elif isinstance(params.get(section), dict):
        walk(params[section], KNOWN[section], f"{section}.")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: params file not found; run from the repository root or pass --params")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping at the top level")
    try:
        check_known(params)
    except ParamError as err:
        raise ParamError(str(err).replace("params.yaml:", f"{path}:", 1)) from None
    return params


def _get(params: dict, dotted: str) -> Any:
    node: Any = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise ParamError(f"params.yaml: missing `{dotted}`")
        node = node[key]
    return node


def _int(params: dict, dotted: str, minimum: int, maximum: int | None = None) -> int:
    value = _get(params, dotted)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ParamError(f"params.yaml: `{dotted}` must be an integer {bound} (got {value!r})")
    return value


# More worker processes than this is a typo on any one host (each holds a decoder and its images).
MAX_WORKERS = 256
# The largest image fetch and predict decode; see images.DEFAULT_MAX_PIXELS.
MAX_IMAGE_PIXELS_CEILING = 89_000_000  # Pillow warns of a decompression bomb past 89.5 M


def _workers(params: dict, dotted: str) -> int | None:
    value = _get(params, dotted)
    if value is None:
        return None
    return _int(params, dotted, 1, MAX_WORKERS)


def _bool(params: dict, dotted: str) -> bool:
    value = _get(params, dotted)
    if not isinstance(value, bool):
        raise ParamError(f"params.yaml: `{dotted}` must be true or false (got {value!r})")
    return value


def validate_fetch(params: dict) -> dict:
    check_known(params, "fetch")
    sources = _get(params, "fetch.sources")
    if not isinstance(sources, dict):
        raise ParamError("params.yaml: `fetch.sources` must be a mapping of source name to settings")
    for name in sources:
        if name not in SOURCE_NAMES:
            raise ParamError(
                f"params.yaml: unknown source `fetch.sources.{name}`; known sources: {', '.join(SOURCE_NAMES)}"
            )
    enabled = [name for name in sources if _bool(params, f"fetch.sources.{name}.enabled")]
    if not enabled:
        raise ParamError("params.yaml: every source in `fetch.sources` is disabled; enable at least one")
    for name in ("kaggle2018", "kaggle2020"):
        if name in enabled:
            handle = _get(params, f"fetch.sources.{name}.handle")
            if not isinstance(handle, str) or "/versions/" not in handle:
                raise ParamError(
                    f"params.yaml: `fetch.sources.{name}.handle` must pin a version, "
                    f"like owner/dataset/versions/N (got {handle!r})"
                )
    if "ixi" in enabled:
        urls = _get(params, "fetch.sources.ixi.urls")
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise ParamError("params.yaml: `fetch.sources.ixi.urls` must be a non-empty list of tar URLs")
        _int(params, "fetch.sources.ixi.max_subjects", 1, 1000)  # IXI has about 600 subjects
        _int(params, "fetch.sources.ixi.slices_per_volume", 1, 100)
        _int(params, "fetch.sources.ixi.timeout_s", 1, 3600)
        _int(params, "fetch.sources.ixi.deadline_s", 1, 24 * 3600)
        planes = _get(params, "fetch.sources.ixi.planes")
        if not isinstance(planes, list) or not planes or any(p not in IXI_PLANES for p in planes):
            raise ParamError(
                f"params.yaml: `fetch.sources.ixi.planes` must be a non-empty list of {', '.join(IXI_PLANES)} "
                f"(got {planes!r})"
            )
    if "local" in enabled and not isinstance(_get(params, "fetch.sources.local.path"), str):
        raise ParamError("params.yaml: `fetch.sources.local.path` must be a folder path")
    _workers(params, "fetch.workers")
    _int(params, "fetch.max_image_pixels", 1024, MAX_IMAGE_PIXELS_CEILING)
    if not isinstance(_get(params, "fetch.overrides"), str):
        raise ParamError("params.yaml: `fetch.overrides` must be the path of the label decisions file (a CSV)")
    modalities = _get(params, "fetch.modalities")
    if not isinstance(modalities, list) or not modalities or not set(modalities) <= set(MODALITIES):
        raise ParamError(
            f"params.yaml: `fetch.modalities` must be a non-empty list of {', '.join(MODALITIES)} "
            f"(the modalities kept; got {modalities!r})"
        )
    if not isinstance(_get(params, "fetch.modality_review"), str):
        raise ParamError("params.yaml: `fetch.modality_review` must be the path of the reviewed modalities (a CSV)")
    return params["fetch"]


def validate_dedup(params: dict) -> dict:
    check_known(params, "dedup")
    hash_size = _int(params, "dedup.hash_size", 8, 64)
    if hash_size % 8:
        raise ParamError(f"params.yaml: `dedup.hash_size` must be a multiple of 8 (got {hash_size})")
    bits = hash_size * hash_size
    _int(params, "dedup.phash_max_distance", 0, bits)
    _int(params, "dedup.dhash_max_distance", 0, bits)
    _choice(params, "dedup.keep", ("representatives", "clusters"))
    _int(params, "dedup.review_pairs", 0, 64)
    _workers(params, "dedup.workers")
    return params["dedup"]


# The largest model input side: 512 px keeps a split of 100k images within a disk (78 GB of uint8 at 3
# channels) and a fold's batch within 24 GiB; pretrained backbones want 224.
MAX_IMAGE_SIZE = 512


def validate_split(params: dict) -> dict:
    check_known(params, "split")
    fractions = _get(params, "split.fractions")
    if not isinstance(fractions, dict) or set(fractions) != set(SPLIT_NAMES):
        raise ParamError(f"params.yaml: `split.fractions` must have exactly the keys {', '.join(SPLIT_NAMES)}")
    for name in SPLIT_NAMES:
        value = fractions[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ParamError(f"params.yaml: `split.fractions.{name}` must be a number between 0 and 1 (got {value!r})")
    total = sum(fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ParamError(f"params.yaml: `split.fractions` must sum to 1 (they sum to {total:g})")
    _int(params, "split.image_size", 32, MAX_IMAGE_SIZE)
    _workers(params, "split.workers")
    _int(params, "seed", 0, 2**32 - 1)
    return params["split"]


MODEL_NAMES = ("seed_fsm", "seed_cnn", "small_xception", "efficientnetb0", "resnet50", "vgg16")
# Smallest image side of models that need more than the split's minimum of 32 (which keras.applications
# backbones also need): seed_cnn's valid convolutions and three poolings leave nothing below 40.
MIN_IMAGE_SIZE = {"seed_cnn": 40}


def _number(params: dict, dotted: str, low: float, high: float) -> float:
    value = _get(params, dotted)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ParamError(f"params.yaml: `{dotted}` must be a number between {low:g} and {high:g} (got {value!r})")
    return value


def _choice(params: dict, dotted: str, choices: tuple) -> str:
    value = _get(params, dotted)
    if value not in choices:
        raise ParamError(f"params.yaml: `{dotted}` must be one of {', '.join(map(str, choices))} (got {value!r})")
    return value


def validate_train(params: dict) -> dict:
    check_known(params, "train")
    model = _choice(params, "train.model", MODEL_NAMES)
    task = _choice(params, "train.task", ("binary", "multiclass"))
    if _bool(params, "train.subtypes") and task == "multiclass":
        raise ParamError(
            "params.yaml: `train.subtypes: true` applies to `train.task: binary` (the multiclass task "
            "learns the tumor types anyway); set one of them differently"
        )
    _int(params, "train.folds", 2, 10)
    _int(params, "train.epochs", 1, 1000)
    _int(params, "train.batch_size", 1, 1024)
    _number(params, "train.learning_rate", 1e-7, 1.0)
    _number(params, "train.weight_decay", 0.0, 1.0)
    _number(params, "train.dropout", 0.0, 0.9)
    _choice(
        params,
        "train.class_weight",
        ("balanced", "balanced_by_source", "balanced_by_collection", "balanced_by_style", "none"),
    )
    _choice(params, "train.member_weight", ("cluster", "image"))
    _int(params, "train.full_weight_images", 0, 100_000)
    _bool(params, "train.clean_learning")
    _int(params, "train.early_stopping_patience", 1, 1000)
    _int(params, "train.reduce_lr_patience", 1, 1000)
    _bool(params, "train.mixed_precision")
    _choice(params, "train.distribution", ("none", "data_parallel"))
    _choice(params, "train.loader", ("arrays", "stream"))
    _bool(params, "train.augment.horizontal_flip")
    if _bool(params, "train.mirror_average") and not params["train"]["augment"]["horizontal_flip"]:
        raise ParamError(
            "params.yaml: `train.mirror_average` needs `train.augment.horizontal_flip: true` (the "
            "models must have learnt mirrored images); set one of them to false"
        )
    for name in ("rotation", "zoom", "translation", "brightness", "contrast", "noise"):
        _number(params, f"train.augment.{name}", 0.0, 0.5)
    for name in ("bias_field", "gamma", "blur", "contrast_map"):
        _number(params, f"train.augment.{name}", 0.0, 1.0)
    _bool(params, "train.standardize")
    widths = _get(params, "train.small_xception.widths")
    if (
        not isinstance(widths, list)
        or not 0 < len(widths) <= 8
        or not all(isinstance(w, int) and not isinstance(w, bool) and 0 < w <= 1024 for w in widths)
    ):
        raise ParamError(
            f"params.yaml: `train.small_xception.widths` must be a list of positive integers (got {widths!r})"
        )
    _choice(params, "train.transfer.weights", ("imagenet", None))
    _int(params, "train.transfer.fine_tune_layers", 0, 1000)
    _int(params, "train.transfer.fine_tune_epochs", 0, 1000)
    _number(params, "train.transfer.fine_tune_learning_rate", 1e-8, 1.0)
    _int(params, "train.sites.retrain_from", 0, 10_000_000)
    _int(params, "train.sites.update_epochs", 1, 1000)
    _number(params, "train.sites.update_learning_rate_factor", 1e-4, 1.0)
    size = _int(params, "split.image_size", 32, MAX_IMAGE_SIZE)
    if size < MIN_IMAGE_SIZE.get(model, 1):
        raise ParamError(
            f"params.yaml: `split.image_size` {size} is too small for train.model {model}; "
            f"it needs at least {MIN_IMAGE_SIZE[model]}"
        )
    if model == "small_xception" and size < 2 ** (len(widths) + 1):
        raise ParamError(
            f"params.yaml: `split.image_size` {size} is too small for {len(widths)} blocks of "
            f"`train.small_xception.widths`"
        )
    _int(params, "seed", 0, 2**32 - 1)
    return params["train"]


def validate_evaluate(params: dict) -> dict:
    check_known(params, "evaluate")
    _number(params, "evaluate.target_recall", 0.5, 1.0)
    _number(params, "evaluate.uncertain_errors", 0.0, 0.95)
    _int(params, "evaluate.bootstrap", 100, 100_000)  # 100k resamples of the test split take seconds
    _int(params, "evaluate.gallery", 0, 64)
    return params["evaluate"]


def validate_review(params: dict) -> dict:
    check_known(params, "review")
    _int(params, "review.gallery", 0, 64)
    return params["review"]


def validate_explain(params: dict) -> dict:
    check_known(params, "explain")
    _int(params, "explain.images", 1, 50)
    _int(params, "explain.lime_samples", 10, 10_000)  # each sample is one model call; 300 take ~10 s an image
    _int(params, "explain.lime_superpixels", 2, 100)
    return params["explain"]


def _name(params: dict, dotted: str) -> str:
    value = _get(params, dotted)
    if not isinstance(value, str) or not value.strip() or "'" in value:
        raise ParamError(f"params.yaml: `{dotted}` must be a non-empty name without quotes (got {value!r})")
    return value


def validate_register(params: dict) -> dict:
    check_known(params, "register")
    _name(params, "register.experiment")
    _name(params, "register.model_name")
    _number(params, "evaluate.target_recall", 0.5, 1.0)  # the runs compared share it
    _number(params, "register.min_recall", 0.0, 1.0)
    _number(params, "register.min_accuracy", 0.0, 1.0)
    _number(params, "register.min_specificity", 0.0, 1.0)
    _choice(params, "register.champion_on_new_data", ("keep", "replace"))
    return params["register"]
