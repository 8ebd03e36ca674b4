"""`braintumor serve`: a triage web page and a versioned REST API over one model (by default the champion).

One process loads the model reference given at start-up (anything `braintumor predict --model` takes, through
the same resolver and its safety checks), warms it up, and serves:

- `POST /v1/predict`: P(tumor) and the label at the model's threshold for each uploaded scan, in upload order,
  or an error naming what is wrong with a file; `POST /v1/explain`: the scan beside its evidence map (PNG);
- `GET /v1/model`: which model answers (name, version, alias, threshold), its test metrics and model card;
- `GET /healthz`, `GET /readyz`; `POST /v1/reload`, and a poll of the registry alias (`--poll-seconds`): when
  the alias moves to another version, the new model is loaded and warmed up beside the old one, then swapped
  in; a request keeps the model it started with, and every answer names the version that produced it;
- `/`: the page (static files of this package: no build step, no CDN).

Uploads are read into memory and decoded there (never written under the repository), through the pixel
limit and format allowlist of `images.open_image`; bodies, files and file counts have limits too. No request
chooses what is loaded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool

from braintumor.data.images import DEFAULT_MAX_PIXELS, open_image, prepare, to_grayscale
from braintumor.errors import ImageReadError, ModelLoadError
from braintumor.serve.predict import LoadedModel, connect_tracking, load

log = logging.getLogger(__name__)

WEB = Path(__file__).with_name("web")
REGISTRY_REFERENCE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
TEST_METRICS = ("recall", "specificity", "accuracy", "roc_auc")
BATCH = 32  # images per model call


@dataclass(frozen=True)
class Limits:
    """What one request may send; anything past a limit is refused with a message, never decoded."""

    max_body_bytes: int = 100 << 20
    max_file_bytes: int = 20 << 20
    max_files: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class ServedModel:
    """A loaded model and what the answers say about it."""

    loaded: LoadedModel
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    metrics: dict = field(default_factory=dict)
    card: str = ""

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "threshold": self.loaded.threshold,
            "image_size": int(self.loaded.info["image_size"]),
        }


def resolve(reference: str) -> ServedModel:
    """Load `reference`. A registry reference is pinned to the version it names now (an alias is looked up
    first), so that the version reported is the one loaded."""
    match = REGISTRY_REFERENCE.match(reference)
    if not match:
        loaded = load(reference)
        return ServedModel(loaded, metrics=dict(loaded.info.get("test_metrics", {})))
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from braintumor.registry.tracking import redact

    connect_tracking()
    client = MlflowClient()
    name, alias = match["name"], match["alias"]
    try:
        version = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, match["version"])
        )
        run = client.get_run(version.run_id)
    except MlflowException as err:
        raise ModelLoadError(f"{reference}: {redact(err.message)}") from err
    loaded = load(f"models:/{name}/{version.version}")
    return ServedModel(
        loaded,
        name,
        str(version.version),
        alias,
        {key: run.data.metrics.get(key) for key in TEST_METRICS},
        version.description or "",
    )


def alias_version(reference: str) -> str | None:
    """The version a `models:/NAME@ALIAS` reference points at now (None for any other reference)."""
    match = REGISTRY_REFERENCE.match(reference)
    if not match or not match["alias"]:
        return None
    from mlflow import MlflowClient

    return str(MlflowClient().get_model_version_by_alias(match["name"], match["alias"]).version)


class ModelRunner:
    """Runs the model: P(tumor) for prepared images, and evidence maps. Model calls are serialised (two cores
    gain nothing from two at once, and a backend's model need not be re-entrant)."""

    def __init__(self, served: ServedModel):
        self.served = served
        self.lock = threading.Lock()
        self.names = served.loaded.info["class_names"]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        from braintumor.model.inference import tumor_probability_of

        model = self.served.loaded.model
        out = []
        with self.lock:
            for start in range(0, len(images), BATCH):
                out.append(
                    np.asarray(
                        model.predict_on_batch(images[start : start + BATCH].astype("float32")), dtype=np.float64
                    )
                )
        return tumor_probability_of(np.concatenate(out), self.names)

    def evidence_map(self, image: np.ndarray) -> np.ndarray:
        from braintumor.model.saliency import evidence_map

        with self.lock:
            return evidence_map(self.served.loaded.model, image[None], self.names)[0]

    def warm_up(self) -> None:
        size = int(self.served.loaded.info["image_size"])
        for count in (1, 2):
            self.probabilities(np.zeros((count, size, size, 3), dtype=np.uint8))


class FollowedAlias:
    """The model a reference names, swapped whole when its alias moves; readers take `current` once per request."""

    def __init__(self, reference: str, poll_seconds: float):
        self.reference = reference
        self.poll_seconds = poll_seconds
        self.current = self._ready(resolve(reference))
        self.swap_lock = threading.Lock()
        self.stop = threading.Event()
        self.last_error: str | None = None

    @staticmethod
    def _ready(served: ServedModel) -> ModelRunner:
        runner = ModelRunner(served)
        runner.warm_up()
        return runner

    def reload(self) -> bool:
        """Load the version the alias names now, if it is not the one served; True when swapped."""
        with self.swap_lock:
            wanted = alias_version(self.reference)
            if wanted is None or wanted == self.current.served.version:
                return False
            fresh = self._ready(resolve(self.reference))
            previous, self.current = self.current.served.version, fresh
        log.info("serve: %s moved from version %s to %s", self.reference, previous, fresh.served.version)
        return True

    def poll(self) -> None:
        while not self.stop.wait(self.poll_seconds):
            try:
                self.reload()
                self.last_error = None
            except Exception as err:  # noqa: BLE001 - a failed poll keeps the current model and says why
                self.last_error = f"{type(err).__name__}: {err}"
                log.warning(
                    "serve: could not check %s (%s); still serving version %s",
                    self.reference,
                    self.last_error,
                    self.current.served.version,
                )

    def start_polling(self) -> None:
        if self.poll_seconds > 0 and alias_version(self.reference) is not None:
            threading.Thread(target=self.poll, name="alias-poll", daemon=True).start()


def read_scan(name: str, data: bytes, size: int, limits: Limits) -> np.ndarray:
    """The model input of an uploaded file, decoded in memory exactly as `braintumor predict` decodes files."""
    if len(data) > limits.max_file_bytes:
        raise ImageReadError(name, "too_large", f"{len(data)} bytes, over the limit of {limits.max_file_bytes}")
    return prepare(to_grayscale(open_image(name, data=data, max_pixels=limits.max_pixels)), size)


def classify(runner: ModelRunner, uploads: list[tuple[str, bytes]], limits: Limits) -> list[dict]:
    """One result per upload, in order: {"filename", "probability", "label"} or {"filename", "error"}."""
    size = int(runner.served.loaded.info["image_size"])
    results, images, rows = [], [], []
    for name, data in uploads:
        try:
            images.append(read_scan(name, data, size, limits))
            rows.append(len(results))
            results.append({"filename": name})
        except ImageReadError as err:
            results.append({"filename": name, "error": f"{err.reason}: {err.detail}"})
        except Exception as err:  # noqa: BLE001 - one bad file never fails the others
            results.append({"filename": name, "error": f"{type(err).__name__}: {err}"})
    if images:
        for row, p in zip(rows, runner.probabilities(np.stack(images)), strict=True):
            results[row].update(probability=round(float(p), 6), label=int(p >= runner.served.loaded.threshold))
    return results


def side_by_side(image: np.ndarray, evidence: np.ndarray, side: int = 256) -> bytes:
    """PNG of the scan and the scan under its evidence map (jet, 40 %), as the explain stage draws it."""
    from matplotlib import colormaps

    gray = Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR)
    heat = Image.fromarray((colormaps["jet"](evidence)[..., :3] * 255).astype(np.uint8)).resize((side, side))
    overlay = Image.blend(gray.convert("RGB"), heat, 0.4)
    canvas = Image.new("RGB", (2 * side + 8, side), "white")
    canvas.paste(gray.convert("RGB"), (0, 0))
    canvas.paste(overlay, (side + 8, 0))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before anything parses it. The body is taken
    in (as the upload would be anyway, in memory) up to the limit, then handed on; past it, reading stops."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(scope, send)
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await self.refuse(scope, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope, send):
        await JSONResponse({"detail": f"request body over the limit of {self.limit} bytes"}, 413)(scope, None, send)


def create_app(reference: str, limits: Limits = Limits(), poll_seconds: float = 30.0) -> FastAPI:
    """The app for one model reference, loaded and warmed up before this returns."""
    followed = FollowedAlias(reference, poll_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        followed.start_polling()
        yield
        followed.stop.set()

    app = FastAPI(
        title="Brain-tumor MRI triage",
        version="1",
        lifespan=lifespan,
        description="P(tumor) for MRI scans from a registered Keras model. A research tool, not a diagnostic device.",
    )
    app.state.followed = followed

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        runner = followed.current
        return {"status": "ready", "model": runner.served.describe(), "last_poll_error": followed.last_error}

    @app.get("/v1/model")
    def model_info():
        served = followed.current.served
        return {
            "model": served.describe(),
            "class_names": served.loaded.info["class_names"],
            "test_metrics": served.metrics,
            "model_card": served.card,
            "limits": {
                "max_body_bytes": limits.max_body_bytes,
                "max_file_bytes": limits.max_file_bytes,
                "max_files": limits.max_files,
                "max_pixels": limits.max_pixels,
            },
        }

    @app.post("/v1/reload")
    def reload():
        try:
            swapped = followed.reload()
        except Exception as err:  # noqa: BLE001 - the current model stays; say why
            raise HTTPException(502, f"could not load the model the alias names now: {err}") from err
        return {"reloaded": swapped, "model": followed.current.served.describe()}

    @app.post("/v1/predict")
    async def predict(files: list[UploadFile] | None = File(None, description="one or more scans")):
        if not files:
            raise HTTPException(400, "no files: send one or more scans in the multipart field `files`")
        if len(files) > limits.max_files:
            raise HTTPException(413, f"{len(files)} files, over the limit of {limits.max_files} a request")
        runner = followed.current
        uploads = [(upload.filename or "upload", await upload.read(limits.max_file_bytes + 1)) for upload in files]
        results = await run_in_threadpool(classify, runner, uploads, limits)  # the event loop stays free
        return {"model": runner.served.describe(), "results": results}

    @app.post(
        "/v1/explain",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "the scan and its evidence map"}},
    )
    async def explain(file: UploadFile = File(..., description="one scan")):
        runner = followed.current
        size = int(runner.served.loaded.info["image_size"])
        data = await file.read(limits.max_file_bytes + 1)
        try:
            image = await run_in_threadpool(read_scan, file.filename or "upload", data, size, limits)
        except ImageReadError as err:
            raise HTTPException(422, f"{file.filename}: {err.reason}: {err.detail}") from err
        png = await run_in_threadpool(lambda: side_by_side(image, runner.evidence_map(image)))
        return Response(png, media_type="image/png", headers={"X-Model-Version": str(runner.served.version)})

    app.mount("/", StaticFiles(directory=WEB, html=True), name="page")
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    return app


def serve(reference: str, host: str, port: int, limits: Limits, poll_seconds: float) -> None:
    """Load and warm the model, then answer HTTP until stopped (`braintumor serve`).

    Args:
        reference: the model: a .keras path or a models:/ URI.
        host: address to listen on.
        port: port to listen on.
        limits: upload and batch limits.
        poll_seconds: how often a registry alias is checked for a new version.
    """
    import uvicorn

    started = time.perf_counter()
    app = create_app(reference, limits, poll_seconds)
    served = app.state.followed.current.served
    log.info(
        "serve: %s (version %s) loaded and warmed up in %.1f s; http://%s:%d/",
        reference,
        served.version,
        time.perf_counter() - started,
        host,
        port,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
