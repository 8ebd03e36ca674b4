"""`braintumor predict` (and the web service): classify new scans with a shipped model, local or registered.

A model reference is a registry URI (`models:/brain-tumor-classifier@champion`), a run URI (`runs:/<id>/model`),
an MLflow model folder, or a local `.keras` file with its `model.json` beside it (as in `models/`). Nothing in a
model runs as code: only `models:/` and `runs:/` URIs and local paths are resolved, an MLflow model must be a
Keras 3 archive inside its own folder (no exported SavedModel, whose graph TensorFlow would run), Keras loads it
in safe mode, and its description is checked against the network. Images go through `images.prepare`, the very
code that prepared the training arrays, with a pixel limit and a format allowlist; DICOM files, NIfTI volumes and
zipped studies are read into series by `data/scans.py` and answered a series at a time.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from braintumor.data.images import DEFAULT_MAX_PIXELS, open_image, prepare, to_grayscale
from braintumor.data.listing import walk_files
from braintumor.data.modality import Refusal, reading_refusal
from braintumor.data.scans import Series, kind_suffix, read_scans
from braintumor.errors import ImageReadError, ModelLoadError

SCHEMES = ("models", "runs")  # the URI schemes resolved through MLflow; anything else is refused


RUNTIMES = ("auto", "onnx", "keras")


@dataclass
class LoadedModel:
    info: dict  # model.json: image_size, class_names, threshold, calibration, gate, onnx, ...
    scorer: object  # model/scoring.py's scoring model: Keras, or its ONNX export (model/onnx_scorer.py)
    assessor: object  # model/assessment.py's Assessor
    runtime: str  # "keras" or "onnx": what computes the answers
    keras_archive: bytes  # the Keras model, loaded only when an evidence map is asked for on the ONNX runtime
    _model: object = None

    @property
    def threshold(self) -> float:
        """In the units of the probabilities answers show (calibrated when the model has a calibration)."""
        return self.assessor.probability_threshold

    @property
    def model(self):
        """The Keras model (evidence maps need its gradients); loaded on first use when answers come from ONNX."""
        if self._model is None:
            from braintumor.model.inference import load_model

            with tempfile.TemporaryDirectory(prefix="braintumor-model-") as scratch:
                archive = Path(scratch) / "model.keras"
                archive.write_bytes(self.keras_archive)
                self._model = load_model(archive)
        return self._model


def _from_keras_file(
    path: Path, info: dict, where: str, runtime: str = "auto", onnx_threads: int | None = None
) -> LoadedModel:
    """The model at `path` (a Keras archive), its description `info`, the gate file beside the archive when the
    description names one, and its ONNX export when the description names one and `runtime` allows it (SHA-256s
    checked). `runtime` "auto" takes ONNX Runtime when the export and onnxruntime are there, "onnx" insists;
    `onnx_threads`: its threads a call (None: one a core)."""
    from braintumor.model.assessment import Assessor
    from braintumor.model.gate import GATE_FILE, FeatureGate
    from braintumor.model.outputs import check_description

    info = check_description(info, where)
    onnx = onnx_runtime(info, path, where, runtime, onnx_threads)
    if onnx is not None:
        scorer, model = onnx, None
        widths = scorer.feature_widths()
    else:
        from braintumor.model.inference import check_model_info, load_model
        from braintumor.model.scoring import feature_widths, scoring_model

        model = load_model(path)
        info = check_model_info(info, model, where)
        scorer = scoring_model(model, with_features="gate" in info)
        widths = feature_widths(scorer)
    gate = FeatureGate.load(path.with_name(GATE_FILE), widths, info["gate"]["sha256"]) if "gate" in info else None
    return LoadedModel(info, scorer, Assessor(info, gate, where), "onnx" if onnx else "keras", path.read_bytes(), model)


def onnx_runtime(info: dict, path: Path, where: str, runtime: str, threads: int | None = None):
    """The ONNX export beside the archive as an `OnnxScorer`, or None where `runtime` is "keras" or ("auto") the
    description names no export, or onnxruntime is not installed."""
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    described = info.get("onnx")
    if runtime == "keras" or (runtime == "auto" and not described):
        return None
    if not described:
        raise ModelLoadError(
            f"{where}: no ONNX export is described; re-run `dvc repro evaluate`, or use --runtime keras"
        )
    try:
        from braintumor.model.onnx_scorer import ONNX_FILE, OnnxScorer
    except ImportError as err:
        if runtime == "auto":
            return None
        raise ModelLoadError(f"ONNX Runtime is not installed ({err}); pip install onnxruntime onnx") from err
    scorer = OnnxScorer(path.with_name(ONNX_FILE), str(described.get("sha256")), int(info["image_size"]), threads)
    classes = 1 if len(info["class_names"]) == 2 else len(info["class_names"])
    if scorer.output_shape[0][-1] != classes:
        raise ModelLoadError(f"{where}: the ONNX graph has {scorer.output_shape[0][-1]} outputs, not {classes}")
    return scorer


def from_mlflow_folder(folder: Path, runtime: str = "auto", onnx_threads: int | None = None) -> LoadedModel:
    """The Keras archive of an MLflow model folder, read the way `mlflow.keras` lays it out, without its loader
    (which takes safe mode from the environment and loads exported SavedModels with TensorFlow) and without
    importing MLflow: MLmodel is YAML, read safely."""
    import yaml

    where = f"{folder / 'MLmodel'}"
    try:
        description = yaml.safe_load((folder / "MLmodel").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{where}: not a readable MLflow model description ({err})") from err
    if not isinstance(description, dict) or not isinstance(description.get("flavors"), dict):
        raise ModelLoadError(f"{where}: not an MLflow model description (no flavors)")
    flavor = description["flavors"].get("keras")
    if not isinstance(flavor, dict):
        raise ModelLoadError(f"{where}: no `keras` flavor (this project logs Keras 3 models only)")
    if flavor.get("save_exported_model"):
        raise ModelLoadError(
            f"{where}: an exported SavedModel (save_exported_model: true) is a TensorFlow graph "
            "that would run as code; only Keras 3 .keras archives are loaded"
        )
    root = folder.resolve()
    data = (folder / str(flavor.get("data", "model"))).resolve()
    if not data.is_relative_to(root):
        raise ModelLoadError(f"{where}: its `data` path {flavor.get('data')!r} leads outside the model folder")
    archive = (data / "model.keras") if data.is_dir() else data.with_name(data.name + ".keras")
    if not archive.resolve().is_relative_to(root) or not archive.is_file():
        raise ModelLoadError(f"{where}: no Keras archive at {archive}")
    info = description.get("metadata") or {}
    if not isinstance(info, dict) or "threshold" not in info:
        raise ModelLoadError(
            f"{where}: the MLflow model has no threshold in its metadata; it was not logged by `braintumor register`"
        )
    return _from_keras_file(archive, info, where, runtime, onnx_threads)


def load(reference: str, runtime: str = "auto", onnx_threads: int | None = None) -> LoadedModel:
    """Resolve `reference` (see the module docstring) to the model and what inference needs, answered by ONNX
    Runtime (`onnx_threads` a call) or Keras as `runtime` says (see `_from_keras_file`)."""
    scheme = urlparse(reference).scheme
    if scheme and scheme not in SCHEMES:
        from braintumor.registry.pull import redact

        raise ModelLoadError(
            f"{redact(reference)}: the {scheme}: scheme is not loaded; give a models:/ or runs:/ URI of "
            "the tracking server, or a local path"
        )
    if not scheme:
        path = Path(reference)
        if path.is_file() and path.suffix == ".keras":
            sidecar = path.with_name("model.json")
            if not sidecar.is_file():
                raise ModelLoadError(
                    f"{path}: no model.json beside it (image size, classes, threshold); copy the "
                    "whole models/ folder, or use a models:/ or runs:/ URI"
                )
            try:
                info = json.loads(sidecar.read_text())
            except (ValueError, UnicodeDecodeError) as err:
                raise ModelLoadError(f"{sidecar}: not valid JSON ({err})") from err
            return _from_keras_file(path, info if isinstance(info, dict) else {}, str(sidecar), runtime, onnx_threads)
        if path.is_dir():
            if (path / "MLmodel").is_file():
                return from_mlflow_folder(path, runtime, onnx_threads)
            if (path / "model.keras").is_file():
                return load(str(path / "model.keras"), runtime, onnx_threads)
            raise ModelLoadError(f"{path}: neither an MLflow model folder nor a folder with model.keras")
        raise ModelLoadError(f"{reference}: no such model file or folder, and not a models:/ or runs:/ URI")
    from braintumor.registry.pull import REFERENCE, pull, redact

    if REFERENCE.match(reference):  # the light path: no MLflow import, a local verified copy
        return from_mlflow_folder(pull(reference).folder, runtime, onnx_threads)
    import mlflow
    from mlflow.exceptions import MlflowException

    connect_tracking()
    with tempfile.TemporaryDirectory(prefix="braintumor-model-") as scratch:  # the model ends up in memory
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=scratch))
        except MlflowException as err:
            raise ModelLoadError(
                f"{redact(reference)}: {redact(err.message)} (tracking URI "
                f"{redact(mlflow.get_tracking_uri())}; set MLFLOW_TRACKING_URI to the server or "
                "database that holds the model)"
            ) from err
        return from_mlflow_folder(folder, runtime, onnx_threads)


def connect_tracking() -> None:
    """Point MLflow at `MLFLOW_TRACKING_URI`, else at the project's embedded store when run inside the project."""
    import mlflow

    from braintumor.registry.pull import project_root

    store = project_root() / "mlflow" / "mlflow.db"
    if not os.environ.get("MLFLOW_TRACKING_URI") and store.is_file():
        mlflow.set_tracking_uri(f"sqlite:///{store}")
        mlflow.set_registry_uri(f"sqlite:///{store}")


def listed_files(paths: list[str]) -> list[tuple[str, Path]]:
    """(argument, file) for each file to classify: each path as given, and every entry under each folder
    (sorted). Nothing is passed over: an entry that is no image gets an error result from `predict`."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found, problems = walk_files(path)
            files.extend((name, file) for file in sorted(found + [Path(entry) for entry, _, _ in problems]))
        else:
            files.append((name, path))
    return files


def image_files(paths: list[str]) -> list[Path]:
    """The files `listed_files` finds, without their arguments."""
    return [file for _, file in listed_files(paths)]


def clinical_entries(listed: list[tuple[str, Path]]) -> list[tuple[str, str, bytes]]:
    """`read_scans` entries of clinical files: a file found under a folder is named by the folder and its
    position there (plus the suffix that says what it is), never by its own path, which a hospital export may
    have filled with patient names."""
    entries = []
    for position, (source, path) in enumerate(listed, start=1):
        if str(path) == source:
            name = source
        else:
            name = f"{source}#{position}{kind_suffix(path.name)}"
        entries.append((source, name, path.read_bytes()))
    return entries


def read_error(path: Path, err: Exception) -> str:
    if isinstance(err, ImageReadError):
        return f"{err.reason}: {err.detail}"
    return f"{type(err).__name__}: {err}"


@dataclass
class Shown:
    """A scored model input that `write_evidence_maps` may draw: which result it belongs to, and its name."""

    row: int  # index of its result
    name: str  # file name, or series and slice
    image: np.ndarray  # the prepared model input


def predict(
    loaded: LoadedModel, files: list[Path | str], batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[dict], list[Shown]]:
    """One result per file, in order: {"path", "status", "probability", "label", ...} (`Assessor.answers`), or
    {"path", "error"} for a file that cannot be read as an image (the others are still predicted); and the
    scored inputs, for their evidence maps. A colour image or a head CT slice is answered `out_of_distribution`
    from its pixels, unscored."""
    from braintumor.model.assessment import score

    size = int(loaded.info["image_size"])
    results, arrays, rows = [], [], []
    for path in map(Path, files):
        try:
            if not path.is_file():
                raise ImageReadError(
                    path, "not_a_file", "missing, a broken link, a folder that cannot be listed, or not a regular file"
                )
            img = open_image(path, max_pixels=max_pixels)
            gray = to_grayscale(img)
            refusal = reading_refusal(img, gray)
            if refusal is not None:
                results.append({"path": str(path), **refused(refusal)})
                continue
            arrays.append(prepare(gray, size))
            rows.append(len(results))
            results.append({"path": str(path)})
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported, never fatal for the rest
            results.append({"path": str(path), "error": read_error(path, err)})
    if not arrays:
        return results, []
    images = np.stack(arrays)
    answers = loaded.assessor.answers(score(loaded.scorer, images, loaded.info["class_names"], batch_size=batch_size))
    for row, answer in zip(rows, answers, strict=True):
        results[row].update(answer)
    shown = [Shown(row, Path(results[row]["path"]).name, image) for row, image in zip(rows, images, strict=True)]
    return results, shown


def refused(refusal: Refusal) -> dict:
    """The answer for an input refused before scoring (colour, modality): not read, why, and its code."""
    from braintumor.model.assessment import OUT_OF_DISTRIBUTION

    return {"status": OUT_OF_DISTRIBUTION, "label": None, "reason": refusal.text, "refusal": refusal.code}


def series_results(
    series: list[Series], answer: Callable[[np.ndarray], list[dict]], size: int, name_key: str = "path"
) -> tuple[list[dict], list[np.ndarray]]:
    """One result per series, and the prepared slices of each (for evidence maps).

    An image is answered as `predict` answers a file ({name_key: its name, status, ...}); a DICOM series or
    NIfTI volume gets {"series", "kind", "source", "study", "files", "slices", its verdict
    (`model/series_verdict.py`), "slice_results": each slice's answer in series order}. `answer` maps prepared
    images to `Assessor` answers; all slices go through it in one call.
    """
    from braintumor.model.series_verdict import series_answer

    prepared = [[prepare(pixels, size) for pixels in s.slices] if s.refusal is None else [] for s in series]
    flat = [image for images in prepared for image in images]
    answers = iter(answer(np.stack(flat)) if flat else [])
    results = []
    for s, images in zip(series, prepared, strict=True):
        slices = [next(answers) for _ in images]
        if s.kind == "image":
            results.append({name_key: s.name, **(slices[0] if slices else refused(s.refusal))})
            continue
        record = {"series": s.name, "kind": s.kind, "source": s.source, "files": s.files, "slices": len(s.slices)}
        if s.study:
            record["study"] = s.study
        if s.refusal is not None:
            record.update(refused(s.refusal), driving_slices=[], slice_results=[])
        else:
            record.update(series_answer(slices), slice_results=[{"slice": k, **a} for k, a in enumerate(slices)])
        results.append(record)
    return results, [np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8) for images in prepared]


def predict_series(
    loaded: LoadedModel,
    entries: list[tuple[str, str, bytes]],
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[dict], list[Shown]]:
    """`series_results` for `read_scans` entries (`clinical_entries`, `dicomweb.study_entries`), then
    {"path", "error"} for each one unreadable; the inputs shown are each image, and the slices that drove each
    series' verdict."""
    from braintumor.model.assessment import score

    series, errors = read_scans(entries, max_pixels)
    size = int(loaded.info["image_size"])

    def answer(images: np.ndarray) -> list[dict]:
        return loaded.assessor.answers(score(loaded.scorer, images, loaded.info["class_names"], batch_size))

    results, images = series_results(series, answer, size)
    shown = []
    for row, (result, prepared) in enumerate(zip(results, images, strict=True)):
        if "series" in result:
            shown += [Shown(row, f"{result['series']}-slice{k}", prepared[k]) for k in result["driving_slices"]]
        elif len(prepared):
            shown.append(Shown(row, Path(result["path"]).name, prepared[0]))
    return results + [{"path": name, "error": error} for _, name, error in errors], shown


# Files decoded, predicted and explained at a time by `braintumor predict`: its memory stays that of one chunk
# whatever the number of files (rounded up to whole batches, so results equal those of one call).
FILES_AT_A_TIME = 512


def predict_in_chunks(
    loaded: LoadedModel, files: list[Path | str], batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[tuple[list[dict], np.ndarray]]:
    """`predict` over consecutive chunks of `files`, one (results, images) pair a chunk."""
    chunk = -(-FILES_AT_A_TIME // batch_size) * batch_size
    for start in range(0, len(files), chunk):
        yield predict(loaded, files[start : start + chunk], batch_size, max_pixels)


def verdict_text(result: dict) -> str:
    """A short reading of one answer: P(tumor) and the verdict, or why there is none."""
    if result["status"] == "out_of_distribution":
        return "not read: not a brain MR slice"
    verdict = {1: "tumor", 0: "no tumor", None: "uncertain, read first"}[result["label"]]
    return f"P(tumor)={result['probability']:.3f} ({verdict})"


def write_evidence_maps(loaded: LoadedModel, results: list[dict], shown: list[Shown], folder: Path, first: int = 0):
    """An evidence-map overlay PNG (`model/saliency.py`) per shown input (`predict`'s or `predict_series`' second
    output), titled with its answer (a series' answer for its slices) and named after its position (counted from
    `first`, so names stay unique across chunks) and its name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from braintumor.model.saliency import evidence_map

    if not shown:
        return []
    maps = evidence_map(loaded.model, np.stack([item.image for item in shown]), loaded.info["class_names"])
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k, (item, evidence) in enumerate(zip(shown, maps, strict=True)):
        fig, ax = plt.subplots(figsize=(3, 3.2))
        ax.imshow(item.image)
        ax.imshow(evidence, cmap="jet", alpha=0.4)
        ax.set_title(f"{item.name[:28]}\n{verdict_text(results[item.row])}", fontsize=7)
        ax.axis("off")
        fig.tight_layout()
        out = folder / f"{first + k:04d}-{item.name.rsplit('.', 1)[0]}.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written
