"""`braintumor predict`: classify new scans with a shipped model, from the registry or a local file.

A model reference is a registry URI (`models:/brain-tumor-classifier@champion`), a run URI (`runs:/<id>/model`),
an MLflow model folder, or a local `.keras` file with its `model.json` beside it (as in `models/`). Images go
through `images.model_input`, the very code that prepared the training arrays.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from braintumor.images import model_input

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class ModelLoadError(RuntimeError):
    """A model reference that does not resolve to a usable model."""


@dataclass
class LoadedModel:
    model: object  # keras.Model
    info: dict     # model.json: image_size, class_names, threshold, ...

    @property
    def threshold(self) -> float:
        return float(self.info["threshold"])


def _from_mlflow_folder(folder: Path) -> LoadedModel:
    import mlflow.keras
    from mlflow.models import Model

    from braintumor.models import jit_ready

    info = Model.load(folder / "MLmodel").metadata or {}
    if "threshold" not in info:
        raise ModelLoadError(f"{folder}: the MLflow model has no threshold in its metadata; it was not logged by "
                             "`braintumor register`")
    return LoadedModel(jit_ready(mlflow.keras.load_model(str(folder))), info)


def load(reference: str) -> LoadedModel:
    """Resolve `reference` (see the module docstring) to the Keras model and what inference needs."""
    from braintumor.models import load_model

    path = Path(reference)
    if path.is_file() and path.suffix == ".keras":
        sidecar = path.with_name("model.json")
        if not sidecar.is_file():
            raise ModelLoadError(f"{path}: no model.json beside it (image size, classes, threshold); copy the "
                                 "whole models/ folder, or use a models:/ or runs:/ URI")
        return LoadedModel(load_model(path), json.loads(sidecar.read_text()))
    if path.is_dir():
        if (path / "MLmodel").is_file():
            return _from_mlflow_folder(path)
        if (path / "model.keras").is_file():
            return load(str(path / "model.keras"))
        raise ModelLoadError(f"{path}: neither an MLflow model folder nor a folder with model.keras")
    if ":/" not in reference:
        raise ModelLoadError(f"{reference}: no such model file or folder, and not a models:/ or runs:/ URI")
    import mlflow
    from mlflow.exceptions import MlflowException

    from braintumor.tracking import local_store, project_root

    if not os.environ.get("MLFLOW_TRACKING_URI") and (project_root() / "mlflow" / "mlflow.db").is_file():
        store = local_store()[0]  # the project's embedded store, when run inside the project
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference,
                                                          dst_path=tempfile.mkdtemp(prefix="braintumor-model-")))
    except MlflowException as err:
        raise ModelLoadError(f"{reference}: {err.message} (tracking URI {mlflow.get_tracking_uri()}; set "
                             "MLFLOW_TRACKING_URI to the server or database that holds the model)") from err
    return _from_mlflow_folder(folder)


def image_files(paths: list[str]) -> list[Path]:
    """The files to classify: each file as given, and every image file under each folder (sorted)."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                                and not any(part.startswith(".") for part in p.relative_to(path).parts)))
        else:
            files.append(path)
    return files


def predict(loaded: LoadedModel, files: list[Path], batch_size: int = 32) -> tuple[list[dict], np.ndarray]:
    """One result per file, in order: {"path", "probability", "label"}, or {"path", "error"} for a file that
    cannot be read as an image (the others are still predicted); and the prepared images of the predicted
    files, in the same order, for Grad-CAM."""
    from braintumor.training import tumor_probability

    size = int(loaded.info["image_size"])
    results, arrays, rows = [], [], []
    for path in files:
        try:
            arrays.append(model_input(path, size))
            rows.append(len(results))
            results.append({"path": str(path)})
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported, never fatal for the rest
            results.append({"path": str(path), "error": f"{type(err).__name__}: {err}"})
    if not arrays:
        return results, np.zeros((0, size, size, 3), dtype=np.uint8)
    images = np.stack(arrays)
    probabilities = tumor_probability(loaded.model, images, loaded.info["class_names"], batch_size=batch_size)
    for row, p in zip(rows, probabilities):
        results[row].update(probability=round(float(p), 6), label=int(p >= loaded.threshold))
    return results, images


def write_grad_cams(loaded: LoadedModel, results: list[dict], images: np.ndarray, folder: Path) -> list[Path]:
    """A Grad-CAM overlay PNG per predicted image (`predict`'s two outputs), named after its position and file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from braintumor.explanation import grad_cam

    if not len(images):
        return []
    done = [r for r in results if "error" not in r]
    cams = grad_cam(loaded.model, images, loaded.info["class_names"])
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k, (result, image, cam) in enumerate(zip(done, images, cams)):
        fig, ax = plt.subplots(figsize=(3, 3.2))
        ax.imshow(image)
        ax.imshow(cam, cmap="jet", alpha=0.4)
        ax.set_title(f"{Path(result['path']).name[:28]}\nP(tumor)={result['probability']:.3f} "
                     f"({'tumor' if result['label'] else 'no tumor'})", fontsize=7)
        ax.axis("off")
        fig.tight_layout()
        out = folder / f"{k:04d}-{Path(result['path']).stem}.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written
