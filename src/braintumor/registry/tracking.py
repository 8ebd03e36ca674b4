"""MLflow tracking: record one pipeline state (params, per-epoch and test metrics, the model) as an MLflow run.

The embedded default needs no server: a SQLite tracking and registry database and an artifact folder under
`mlflow/` at the repository root (`DVC_ROOT` inside `dvc exp run`, so experiments run in temporary copies
land in the same database). `MLFLOW_TRACKING_URI` points the same code at a shared tracking server.

A run is identified by the digest of the model it logged: recording the same pipeline state again reuses
the existing run instead of adding a copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from braintumor import paths
from braintumor.data.datasets import representatives, split_images
from braintumor.errors import RegistryError
from braintumor.registry.pull import project_root

log = logging.getLogger(__name__)

# Run tags this project sets and searches on.
MODEL_DIGEST_TAG = "braintumor.model_sha256"
DATA_TAG = "braintumor.data_fingerprint"
MODEL_URI_TAG = "braintumor.model_uri"
# What the model carries beside the network, joined by "+": calibration, gate (model/assessment.py), onnx
# (model/onnx_scorer.py); register breaks ties between equally good runs by it.
TRUST_TAG = "braintumor.trust"
CARRIED = ("calibration", "gate", "onnx")
CARD_FILE = "model_card.md"


def local_store(root: Path | None = None) -> tuple[str, str]:
    """The embedded default: (SQLite tracking/registry URI, artifact folder URI), both under `<root>/mlflow`."""
    folder = (root or project_root()) / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def configure(experiment: str) -> str:
    """Point MLflow at `MLFLOW_TRACKING_URI` or the embedded store; select (or create) `experiment`.
    Returns the tracking URI."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    artifact_location = None
    if not uri:
        uri, artifact_location = local_store()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
            pass
    mlflow.set_experiment(experiment)
    return uri


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"model": "x"}} -> {"train.model": "x"}; lists stay whole values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def numeric(tree: dict) -> dict[str, float]:
    """The finite numeric leaves of a metrics tree, flattened."""
    return {
        key: float(value)
        for key, value in flatten(tree).items()
        if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    }


def file_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def data_fingerprint(split_manifest: Path) -> str:
    """sha256 over the images that are scored (each cluster's representative: pixel digest), their labels and
    split assignment: two runs with equal fingerprints were tested and placed their thresholds on the same
    images, so their metrics compare, with or without the clusters' members (`dedup.keep`) in training."""
    table = pd.read_csv(split_manifest, keep_default_na=False)
    table = table[representatives(table)]
    # the three columns in the file's order (label, sha256, split), as fingerprints have always been made, so
    # that runs registered before stay comparable
    columns = [column for column in table.columns if column in ("sha256", "label", "split")]
    rows = sorted(",".join(map(str, row)) for row in table[columns].itertuples(index=False))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def git_commit(root: Path) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device() -> str:
    """What the model was trained on: the first accelerator the Keras backend sees, else the CPU."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return str(jax.devices()[0])
        if backend == "torch":
            import torch

            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            return gpus[0].name if gpus else "cpu"
    except Exception:  # noqa: BLE001 - a device probe must never stop the tracking of a finished run
        pass
    return f"cpu ({platform.processor() or platform.machine()})"


def epoch_metrics(live_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch series from dvclive's TSV files (metrics/train/plots/metrics/<split>/<name>.tsv)."""
    series = {}
    for tsv in sorted((live_dir / "plots" / "metrics").rglob("*.tsv")):
        table = pd.read_csv(tsv, sep="\t")
        name = tsv.relative_to(live_dir / "plots" / "metrics").with_suffix("").as_posix()
        series[name] = [(int(step), float(value)) for step, value in zip(table["step"], table.iloc[:, -1], strict=True)]
    return series


def keras_flavor(beside_archive: list[Path] = ()):
    """`mlflow.keras` as the flavor `Model.log` saves with, except that the model folder exists before the input
    example is written into it: mlflow.keras.log_model with an input example fails on a missing folder
    (mlflow/mlflow#16183, open in MLflow 3.17); `beside_archive` files (the gate, the ONNX export) are copied
    next to the Keras archive, where `braintumor predict` looks for them."""
    import mlflow.keras

    def save_model(path, **kwargs):
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)
        for extra in beside_archive:
            shutil.copy(extra, Path(path) / "data" / Path(extra).name)

    return SimpleNamespace(__name__=mlflow.keras.__name__, save_model=save_model)


def existing_run(experiment: str, model_digest: str, fingerprint: str):
    """The finished run that already logged this exact model, evaluated on the same data, if any. A run that
    failed or was killed part-way (before it recorded its model) is never reused: registering again logs anew."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=[experiment],
        output_format="list",
        filter_string=f"tags.`{MODEL_DIGEST_TAG}` = '{model_digest}' and "
        f"tags.`{DATA_TAG}` = '{fingerprint}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    return next((run for run in runs if MODEL_URI_TAG in run.data.tags), None)


def check_consistent(model_dir: Path, metrics_dir: Path) -> tuple[dict, dict]:
    """(model.json, evaluate.json) when both describe the model in `model_dir` (evaluate writes its digest, its
    threshold and its test metrics into both); else a `RegistryError`, so that an evaluate stage interrupted
    between its two outputs cannot register one model with another's metrics."""
    info = json.loads((model_dir / "model.json").read_text())
    evaluation = json.loads((metrics_dir / "evaluate.json").read_text())
    actual = file_digest(model_dir / "model.keras")
    problems = [
        f"{name} says model {digest}"
        for name, digest in (
            ("model.json", info.get("model_sha256")),
            ("evaluate.json", evaluation.get("model_sha256")),
        )
        if digest != actual
    ]
    if round(float(info.get("threshold", -1)), 6) != evaluation.get("threshold"):
        problems.append(f"thresholds differ ({info.get('threshold')} and {evaluation.get('threshold')})")
    tested = info.get("test_metrics", {})
    problems += [
        f"test {key} differs ({tested.get(key)} and {evaluation.get(key)})"
        for key in ("recall", "accuracy", "specificity", "roc_auc")
        if tested.get(key) != evaluation.get(key)
    ]
    if problems:
        raise RegistryError(
            f"{model_dir / 'model.json'} and {metrics_dir / 'evaluate.json'} do not describe "
            f"{model_dir / 'model.keras'} (sha256 {actual[:12]}): {'; '.join(problems)}. Re-run "
            "`dvc repro evaluate` so that both come from the same model."
        )
    return info, evaluation


def log_run(
    params: dict,
    experiment: str,
    fingerprint: str,
    card: str,
    model_dir: Path = Path(paths.MODEL_DIR),
    split_dir: Path = Path(paths.SPLIT_DIR),
    metrics_dir: Path = Path(paths.METRICS_DIR),
    plots_dir: Path = Path(paths.PLOTS_DIR),
) -> dict:
    """Record the current pipeline state, trained and tested on the data `fingerprint` names, as an MLflow
    run (or find the run that already did).

    Returns {"run_id", "model_uri", "data_fingerprint", "metrics", "new"}.

    Args:
        params: the whole params.yaml, logged flat.
        experiment: the MLflow experiment's name.
        fingerprint: digest of the split's data: runs on other data do not compare.
        card: the model card's markdown.
        model_dir: the deployable model.
        split_dir: the split stage's output.
        metrics_dir: the stages' metrics.
        plots_dir: the stages' plots.
    """
    import keras
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    from braintumor.model.gate import GATE_FILE
    from braintumor.model.inference import load_model
    from braintumor.model.onnx_scorer import ONNX_FILE

    info, evaluation = check_consistent(model_dir, metrics_dir)
    model_digest = file_digest(model_dir / "model.keras", model_dir / "model.json")
    found = existing_run(experiment, model_digest, fingerprint)
    if found is not None:
        log.info("register: this model is already MLflow run %s", found.info.run_id)
        return {
            "run_id": found.info.run_id,
            "model_uri": found.data.tags[MODEL_URI_TAG],
            "data_fingerprint": fingerprint,
            "metrics": found.data.metrics,
            "new": False,
        }

    training = json.loads((metrics_dir / "train.json").read_text())
    model = load_model(model_dir / "model.keras")
    size = info["image_size"]
    example = np.repeat(split_images(split_dir, "test")[:1, ..., None], 3, axis=-1).astype("float32")
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, size, size, 3), "image")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, model.output_shape[-1]), "prediction")]),
    )
    tags = {
        MODEL_DIGEST_TAG: model_digest,
        DATA_TAG: fingerprint,
        "git_commit": git_commit(project_root()),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        "keras_backend": keras.backend.backend(),
        "device": device(),
        "model": info["model"],
        "task": info["task"],
        **({TRUST_TAG: "+".join(k for k in CARRIED if info.get(k))} if any(info.get(k) for k in CARRIED) else {}),
    }
    metrics = {
        **numeric({k: v for k, v in evaluation.items() if k not in ("per_source",)}),
        **{f"train.{k}": v for k, v in numeric(training).items()},
    }
    with mlflow.start_run(run_name=os.environ.get("DVC_EXP_NAME") or info["model"], tags=tags) as run:
        flat = flatten(params)
        mlflow.log_params({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in flat.items()})
        for name, points in epoch_metrics(metrics_dir / "train").items():
            for step, value in points:
                mlflow.log_metric(f"epoch.{name}", value, step=step)
        mlflow.log_metrics(metrics)
        logged = Model.log(
            artifact_path=None,
            name="model",
            flavor=keras_flavor(
                [model_dir / name for key, name in (("gate", GATE_FILE), ("onnx", ONNX_FILE)) if key in info]
            ),
            model=model,
            signature=signature,
            input_example=example,
            metadata=info,
        )
        mlflow.log_text(card, CARD_FILE)
        for path in [
            metrics_dir / "evaluate.json",
            metrics_dir / "train.json",
            *sorted((plots_dir / "evaluate").glob("*")),
            *sorted((plots_dir / "explain").glob("*.png")),
        ]:
            if path.is_file():
                mlflow.log_artifact(str(path), artifact_path=path.parent.name)
        mlflow.set_tag(MODEL_URI_TAG, logged.model_uri)
    log.info("register: logged MLflow run %s (model %s)", run.info.run_id, logged.model_uri)
    return {
        "run_id": run.info.run_id,
        "model_uri": logged.model_uri,
        "data_fingerprint": fingerprint,
        "metrics": metrics,
        "new": True,
    }
