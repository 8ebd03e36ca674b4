"""`braintumor serve`: a triage web page and a versioned REST API over one model (by default the champion).

One process loads the model reference given at start-up (anything `braintumor predict --model` takes, through
the same resolver and its safety checks), warms it up, and serves:

- `POST /v1/predict`: P(tumor) and the label at the model's threshold for each uploaded scan, in upload order,
  or an error naming what is wrong with a file; DICOM files, NIfTI volumes and zipped studies are answered per
  series; `POST /v1/studies/{uid}/predict`: the same for a study pulled from `--dicomweb`;
  `POST /v1/explain`: an image, or one slice of a series, beside its evidence map (PNG);
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
import datetime
import io
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Security, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool

from braintumor.data.images import DEFAULT_MAX_PIXELS, prepare
from braintumor.data.scans import read_scans
from braintumor.errors import ImageReadError
from braintumor.registry.pull import REFERENCE, current_version, pull
from braintumor.serve.access import KEY_HEADER, ApiKey, AuditLog, RateLimit, find_key, scan_digest, scan_record
from braintumor.serve.feedback import FeedbackStore, KeptScans, feedback_routes
from braintumor.serve.metrics import ServiceMetrics
from braintumor.serve.predict import LoadedModel, from_mlflow_folder, load, series_results
from braintumor.serve.watch import SiteHealth, shipped_reference

log = logging.getLogger(__name__)

WEB = Path(__file__).with_name("web")
TEST_METRICS = ("recall", "specificity", "accuracy", "roc_auc")
STUDY_UID = re.compile(r"[0-9.]{1,64}")
BATCH = 32  # images per model call
SHARED_BATCH = 8  # images per call of one of several model workers (`ModelRunner`)


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
    run_id: str | None = None

    def describe(self) -> dict:
        """The model's provenance, as every answer carries it."""
        info = self.loaded.info
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "model_sha256": info.get("model_sha256"),
            "threshold": self.loaded.threshold,
            "score_threshold": float(info["threshold"]),
            "calibration": info.get("calibration"),
            "uncertain_band": info.get("uncertain_band"),
            "gate": {k: info["gate"][k] for k in ("method", "refuse_above")} if "gate" in info else None,
            "image_size": int(info["image_size"]),
            "runtime": self.loaded.runtime,
        }


def resolve(reference: str, runtime: str = "auto") -> ServedModel:
    """Load `reference` (on `runtime`: see `predict.load`; ONNX Runtime one thread a call, as `ModelRunner`
    runs a call a core). A registry reference is pinned to the version it names now (an alias is looked up
    first), so that the version reported is the one loaded; its files come from the local verified cache."""
    match = REFERENCE.match(reference)
    if not match:
        loaded = load(reference, runtime, onnx_threads=1)
        return ServedModel(loaded, metrics=dict(loaded.info.get("test_metrics", {})))
    pulled = pull(reference)
    version = pulled.version
    return ServedModel(
        from_mlflow_folder(pulled.folder, runtime, onnx_threads=1),
        version.name,
        version.version,
        match["alias"],
        {key: version.metrics.get(key) for key in TEST_METRICS},
        version.description,
        version.run_id,
    )


class MicroBatcher:
    """Concurrent requests share a model call: the first waiting request opens a batch, which closes after
    `max_wait_s` or at `max_images` images, whichever comes first, and at once when no other request is on its
    way (in flight, `request`, but not yet handing images in), so a lone request waits for nobody. `workers`
    threads run the model, each its own batch (ONNX Runtime: single-threaded calls side by side, one a core, ran
    1.7x the images/s of one two-threaded call; Keras: one worker, calls serialised); each request gets its
    own rows back."""

    def __init__(self, run, max_images: int = BATCH, max_wait_s: float = 0.004, workers: int = 1):
        self.run, self.max_images, self.max_wait_s = run, max_images, max_wait_s
        self.waiting: queue.Queue = queue.Queue()
        self.in_flight, self.handed_in, self.counting = 0, 0, threading.Lock()
        for worker in range(workers):
            threading.Thread(target=self.loop, name=f"micro-batcher-{worker}", daemon=True).start()

    @contextlib.contextmanager
    def request(self):
        """Around a request's whole handling (decoding included): while it runs, a batch may wait for it."""
        with self.counting:
            self.in_flight += 1
        try:
            yield
        finally:
            with self.counting:
                self.in_flight -= 1

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        """The model's outputs for `images` (a request's), computed in batches with whatever else is waiting; a
        request of more than `max_images` goes in several slots, which the workers share."""
        slots = [
            {"images": images[start : start + self.max_images], "done": threading.Event()}
            for start in range(0, max(len(images), 1), self.max_images)
        ]
        with self.counting:
            self.handed_in += 1
        try:
            for slot in slots:
                self.waiting.put(slot)
            for slot in slots:
                slot["done"].wait()
        finally:
            with self.counting:
                self.handed_in -= 1
        for slot in slots:
            if "error" in slot:
                raise slot["error"]
        return [np.concatenate([slot["outputs"][k] for slot in slots]) for k in range(len(slots[0]["outputs"]))]

    def on_the_way(self) -> bool:
        with self.counting:
            return self.in_flight > self.handed_in

    def loop(self) -> None:
        while True:
            batch = [self.waiting.get()]
            count, closes = len(batch[0]["images"]), time.perf_counter() + self.max_wait_s
            while count < self.max_images and (left := closes - time.perf_counter()) > 0:
                try:  # what is queued joins at once; the window is kept open only for requests on their way
                    batch.append(self.waiting.get(timeout=left) if self.on_the_way() else self.waiting.get_nowait())
                except queue.Empty:
                    break
                count += len(batch[-1]["images"])
            try:
                outputs = self.run(np.concatenate([slot["images"] for slot in batch]))
                start = 0
                for slot in batch:
                    end = start + len(slot["images"])
                    slot["outputs"] = [output[start:end] for output in outputs]
                    start = end
            except Exception as err:  # noqa: BLE001 - every request of the batch gets the error, the loop lives on
                for slot in batch:
                    slot["error"] = err
            for slot in batch:
                slot["done"].set()


class ModelRunner:
    """Runs the model: answers for prepared images (concurrent requests batched by `MicroBatcher`), and
    evidence maps."""

    def __init__(self, served: ServedModel, batch_wait_s: float = 0.004):
        self.served = served
        self.names = served.loaded.info["class_names"]
        concurrent = served.loaded.runtime == "onnx"  # ONNX Runtime sessions take concurrent calls
        self.scoring = contextlib.nullcontext() if concurrent else threading.Lock()
        # evidence maps run the Keras model one at a time (and, on the Keras runtime, never beside a scoring call)
        self.explaining = threading.Lock() if concurrent else self.scoring
        # ONNX Runtime on one thread gains little past 8 images a call (115 images/s against 108 at 4, this
        # machine), so larger requests are spread over the workers
        workers, most = (len(os.sched_getaffinity(0)), SHARED_BATCH) if concurrent else (1, BATCH)
        self.batcher = MicroBatcher(self.outputs, max_images=most, max_wait_s=batch_wait_s, workers=workers)

    def outputs(self, images: np.ndarray) -> list[np.ndarray]:
        """The scoring model's outputs for `images`, BATCH at a time."""
        scorer = self.served.loaded.scorer
        parts = []
        with self.scoring:
            for start in range(0, len(images), BATCH):
                batch = images[start : start + BATCH].astype("float32")
                parts.append([np.asarray(output) for output in scorer.predict_on_batch(batch)])
        return [np.concatenate([part[k] for part in parts]) for k in range(len(parts[0]))]

    def answers(self, images: np.ndarray) -> list[dict]:
        """`Assessor.answers` for prepared images: status, calibrated P(tumor), label, gate distance."""
        from braintumor.model.assessment import scores_of

        return self.served.loaded.assessor.answers(scores_of(self.batcher(images), self.names))

    def evidence_map(self, image: np.ndarray) -> np.ndarray:
        from braintumor.model.saliency import evidence_map

        with self.explaining:
            return evidence_map(self.served.loaded.model, image[None], self.names)[0]

    def warm_up(self) -> None:
        size = int(self.served.loaded.info["image_size"])
        for count in (1, 2):
            self.answers(np.zeros((count, size, size, 3), dtype=np.uint8))


class FollowedAlias:
    """The model a reference names, swapped whole when its alias moves; readers take `current` once per request."""

    def __init__(self, reference: str, poll_seconds: float, runtime: str = "auto", batch_wait_s: float = 0.004):
        self.reference = reference
        self.poll_seconds = poll_seconds
        self.runtime, self.batch_wait_s = runtime, batch_wait_s
        self.current = self._ready(resolve(reference, runtime))
        self.swap_lock = threading.Lock()
        self.stop = threading.Event()
        self.last_error: str | None = None

    def _ready(self, served: ServedModel) -> ModelRunner:
        runner = ModelRunner(served, self.batch_wait_s)
        runner.warm_up()
        return runner

    def reload(self) -> bool:
        """Load the version the alias names now, if it is not the one served; True when swapped."""
        with self.swap_lock:
            wanted = current_version(self.reference)
            if wanted is None or wanted == self.current.served.version:
                return False
            fresh = self._ready(resolve(self.reference, self.runtime))
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
        match = REFERENCE.match(self.reference)
        if self.poll_seconds > 0 and match and match["alias"]:
            threading.Thread(target=self.poll, name="alias-poll", daemon=True).start()


def explained_slice(uploads: list[tuple[str, bytes]], series: str | None, index: int, size: int, limits: Limits):
    """The model input of one slice of `uploads` (what `classify` scored for it): of the series named `series`
    (an answer's `series` field), or of the one scan the uploads hold, at `index` in series order (an image: 0).
    An `ImageReadError` names what cannot be read, chosen or drawn (a series by its salted name, never by the
    names of its files, which may carry a patient's)."""
    names = series or (uploads[0][0] if len(uploads) == 1 else f"{len(uploads)} uploaded files")
    found, errors = read_scans([(name, name, data) for name, data in uploads], limits.max_pixels, limits.max_file_bytes)
    if errors and not found:  # nothing could be read: say why (an unreadable extra file is not the reason below)
        _, name, error = errors[0]
        reason, _, detail = error.partition(": ")
        raise ImageReadError(name, reason, detail or error)
    if series is not None:
        found = [one for one in found if one.name == series]
    if len(found) != 1:
        wanted = f"no series {series!r}" if series is not None else f"{len(found)} scans; name one with `series`"
        raise ImageReadError(names, "no_single_scan", f"{wanted} among the uploads")
    (scan,) = found
    if scan.refusal is not None:
        raise ImageReadError(names, "not_read", scan.refusal.text)
    if not 0 <= index < len(scan.slices):
        raise ImageReadError(names, "no_such_slice", f"slice {index} of {len(scan.slices)} (numbered from 0)")
    return prepare(scan.slices[index], size)


def classify(runner: ModelRunner, uploads: list[tuple[str, bytes]], limits: Limits) -> tuple[list, list, list]:
    """One result per uploaded image and per series (DICOM files grouped across uploads, NIfTI volumes, zipped
    studies; `predict.series_results`), ordered by the upload each first came in, or {"filename", "error"}; for
    each result the indices of the uploads it came from (for the audit log), and the model inputs it was scored
    on (none for an unreadable or refused scan)."""
    with runner.batcher.request():
        return classify_uploads(runner, uploads, limits)


def classify_uploads(runner: ModelRunner, uploads: list[tuple[str, bytes]], limits: Limits) -> tuple[list, list, list]:
    size = int(runner.served.loaded.info["image_size"])
    series, errors = read_scans(
        [(name, name, data) for name, data in uploads], limits.max_pixels, limits.max_file_bytes
    )
    results, prepared = series_results(series, runner.answers, size, name_key="filename")
    rows = [(one.inputs[0], *row, one.inputs) for one, *row in zip(series, results, prepared, strict=True)]
    rows += [(i, {"filename": name, "error": error}, None, [i]) for i, name, error in errors]
    rows.sort(key=lambda row: row[0])
    return [row[1] for row in rows], [row[3] for row in rows], [row[2] for row in rows]


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


@dataclass
class Access:
    """Who may call what, how often, and where each call is recorded (see `serve/access.py`). No keys: every
    caller is "anonymous" (the loopback default); no rate limit or audit log: none is applied or kept."""

    keys: list[ApiKey] | None = None
    rate: RateLimit | None = None
    audit: AuditLog | None = None

    def caller(self, scope: str):
        """A FastAPI dependency: the id of the key the request carries, 401 without a known key, 403 when the
        key lacks `scope`."""
        header = APIKeyHeader(name=KEY_HEADER, auto_error=False, description="an API key from `braintumor keys add`")

        def check(presented: str | None = Security(header)) -> str:
            return self.identify(presented, scope)

        return check

    def identify(self, presented: str | None, scope: str) -> str:
        """The id of the key `presented`; 401 without a known key, 403 when the key lacks `scope`."""
        if self.keys is None:
            return "anonymous"
        key = find_key(self.keys, presented)
        if key is None:
            raise HTTPException(
                401,
                f"missing or unknown API key: send yours in the {KEY_HEADER} header",
                headers={"WWW-Authenticate": "APIKey"},
            )
        if scope not in key.scopes:
            raise HTTPException(403, f"key {key.id!r} may not {scope} (its scopes: {', '.join(key.scopes)})")
        return key.id

    def spend(self, key_id: str, scans: int) -> None:
        """Count `scans` against the key's rate; 429 with Retry-After when it is spent."""
        wait = self.rate.wait(key_id, scans) if self.rate else 0.0
        if wait:
            raise HTTPException(
                429,
                f"rate limit of {self.rate.per_minute:g} scans a minute for key {key_id!r}: retry in {wait:.1f} s",
                headers={"Retry-After": str(math.ceil(wait))},
            )

    def record(self, request_id: str, key_id: str, endpoint: str, served: ServedModel, started: float, scans):
        """One audit line (no file names, no client address); `scans`: [(the bytes of its uploads, result)]."""
        if self.audit is None:
            return
        self.audit.write(
            {
                "request_id": request_id,
                "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
                "key_id": key_id,
                "endpoint": endpoint,
                "model": {k: served.describe()[k] for k in ("name", "version", "model_sha256")},
                "latency_ms": round(1000 * (time.perf_counter() - started), 2),
                "scans": [scan_record(data, result) for data, result in scans],
            }
        )


def create_app(
    reference: str,
    limits: Limits = Limits(),
    poll_seconds: float = 30.0,
    access: Access | None = None,
    dicomweb: str | None = None,
    runtime: str = "auto",
    batch_wait_ms: float = 4.0,
    feedback: FeedbackStore | None = None,
    kept_scans: KeptScans | None = None,
    with_metrics: bool = True,
) -> FastAPI:
    """The app for one model reference, loaded and warmed up before this returns; `access` None: no keys, no
    rate limit, no audit log (a loopback server for one user); `dicomweb`: the DICOMweb server that
    `POST /v1/studies/{uid}/predict` pulls studies from (None: that endpoint answers 404); `runtime`: ONNX
    Runtime or Keras (see `predict.load`); `batch_wait_ms`: how long a request waits for others to share its
    model call (0: no sharing); `feedback`: where answers and readers' verdicts are kept (None: no verdicts);
    `kept_scans`: where the model inputs of scans that get a tumor / no tumor verdict are kept (None: nowhere);
    `with_metrics`: `GET /metrics` for Prometheus (`serve/metrics.py`)."""
    access = access or Access()
    followed = FollowedAlias(reference, poll_seconds, runtime, batch_wait_ms / 1000)
    metrics = ServiceMetrics() if with_metrics else None
    health = SiteHealth()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        followed.start_polling()
        yield
        followed.stop.set()
        if access.audit is not None:
            access.audit.close()
        if feedback is not None:
            feedback.close()

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
    def model_info(key_id: str = Depends(access.caller("predict"))):
        served = followed.current.served
        return {
            "model": served.describe(),
            "class_names": served.loaded.info["class_names"],
            "test_metrics": served.metrics,
            "model_card": served.card,
            "feedback": feedback is not None,
            "keeps_scans": feedback is not None and kept_scans is not None,
            "limits": {
                "max_body_bytes": limits.max_body_bytes,
                "max_file_bytes": limits.max_file_bytes,
                "max_files": limits.max_files,
                "max_pixels": limits.max_pixels,
            },
        }

    @app.get("/v1/site-health")
    def site_health(key_id: str = Depends(access.caller("health"))):
        """This week's volume, refusal and uncertain rates of the caller's site (its key id), and any alert."""
        loaded = followed.current.served.loaded
        gate = loaded.info.get("gate") or {}
        return health.summary(key_id, gate.get("out_of_fold_refused"), shipped_reference(loaded))

    @app.post("/v1/reload")
    def reload(key_id: str = Depends(access.caller("reload"))):
        started, request_id = time.perf_counter(), uuid.uuid4().hex
        try:
            swapped = followed.reload()
        except Exception as err:  # noqa: BLE001 - the current model stays; say why
            raise HTTPException(502, f"could not load the model the alias names now: {err}") from err
        access.record(request_id, key_id, "reload", followed.current.served, started, [])
        return {"request_id": request_id, "reloaded": swapped, "model": followed.current.served.describe()}

    async def answered(uploads: list[tuple[str, bytes]], request_id: str, key_id: str, endpoint: str, started: float):
        """Classify `uploads` off the event loop, name each scan by its digest, audit each answer with the digests
        of its uploads (and keep it for verdicts), and answer."""
        runner = followed.current
        results, inputs, prepared = await run_in_threadpool(classify, runner, uploads, limits)
        scans = [([uploads[i][1] for i in used], result) for used, result in zip(inputs, results, strict=True)]
        for (data, result), images in zip(scans, prepared, strict=True):
            if "error" not in result:
                result["scan_sha256"] = scan_digest(data, series="series" in result)
                if kept_scans is not None and images is not None and len(images):
                    kept_scans.hold(request_id, result["scan_sha256"], images[..., 0])
        access.record(request_id, key_id, endpoint, runner.served, started, scans)
        model = runner.served.describe()
        if metrics is not None:
            metrics.observe(results, key_id, model.get("version"))
        health.observe(results, key_id)
        if feedback is not None:
            await run_in_threadpool(feedback.record_answers, request_id, key_id, model, results)
        return {"request_id": request_id, "not_for_diagnosis": True, "model": model, "results": results}

    @app.post("/v1/predict")
    async def predict(
        files: list[UploadFile] | None = File(None, description="one or more scans"),
        key_id: str = Depends(access.caller("predict")),
    ):
        started, request_id = time.perf_counter(), uuid.uuid4().hex
        if not files:
            raise HTTPException(400, "no files: send one or more scans in the multipart field `files`")
        if len(files) > limits.max_files:
            raise HTTPException(413, f"{len(files)} files, over the limit of {limits.max_files} a request")
        access.spend(key_id, len(files))
        uploads = [(upload.filename or "upload", await upload.read(limits.max_file_bytes + 1)) for upload in files]
        return await answered(uploads, request_id, key_id, "predict", started)

    @app.post("/v1/studies/{study_uid}/predict")
    async def predict_study(study_uid: str, key_id: str = Depends(access.caller("predict"))):
        """Pull a study from the server's DICOMweb source and answer each of its series."""
        from braintumor.data.dicomweb import study_entries
        from braintumor.errors import SourceError

        started, request_id = time.perf_counter(), uuid.uuid4().hex
        if dicomweb is None:
            raise HTTPException(404, "this server has no DICOMweb source: start it with --dicomweb URL")
        if not STUDY_UID.fullmatch(study_uid):
            raise HTTPException(422, "a StudyInstanceUID is up to 64 digits and dots")
        try:
            entries = await run_in_threadpool(study_entries, dicomweb, study_uid)
        except SourceError as err:
            raise HTTPException(502, str(err)) from err
        access.spend(key_id, len(entries))
        uploads = [(name, data) for _, name, data in entries]
        return await answered(uploads, request_id, key_id, "predict_study", started)

    @app.post(
        "/v1/explain",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "the scan and its evidence map"}},
    )
    async def explain(
        file: UploadFile | None = File(None, description="one scan: an image, a DICOM file, NIfTI or zipped study"),
        files: list[UploadFile] | None = File(None, description="or the loose DICOM files of a study"),
        series: str | None = Form(None, description="which series of the upload: its `series` in the answer"),
        slice_index: int = Form(0, alias="slice", ge=0, description="which slice, numbered as `slice_results`"),
        key_id: str = Depends(access.caller("explain")),
    ):
        started, request_id = time.perf_counter(), uuid.uuid4().hex
        sent = ([file] if file else []) + (files or [])
        if not sent:
            raise HTTPException(400, "no scan: send it in the multipart field `file` (or `files`, with `series`)")
        if len(sent) > limits.max_files:
            raise HTTPException(413, f"{len(sent)} files, over the limit of {limits.max_files} a request")
        access.spend(key_id, 1)
        runner = followed.current
        size = int(runner.served.loaded.info["image_size"])
        uploads = [(one.filename or "upload", await one.read(limits.max_file_bytes + 1)) for one in sent]
        data = [content for _, content in uploads]
        try:
            image = await run_in_threadpool(explained_slice, uploads, series, slice_index, size, limits)
        except ImageReadError as err:
            access.record(request_id, key_id, "explain", runner.served, started, [(data, {"error": err.reason})])
            raise HTTPException(422, f"{err.path}: {err.reason}: {err.detail}") from err
        png = await run_in_threadpool(lambda: side_by_side(image, runner.evidence_map(image)))
        access.record(request_id, key_id, "explain", runner.served, started, [(data, {"status": "explained"})])
        return Response(
            png,
            media_type="image/png",
            headers={
                "X-Model-Version": str(runner.served.version),
                "X-Request-Id": request_id,
                "X-Not-For-Diagnosis": "true",
            },
        )

    app.include_router(feedback_routes(feedback, access.caller, kept_scans))
    if metrics is not None:
        app.include_router(metrics.routes(access.identify, lambda: followed.current.served.describe()))
        app.middleware("http")(metrics.middleware())
    app.mount("/", StaticFiles(directory=WEB, html=True), name="page")
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    return app


def serve(
    reference: str,
    host: str,
    port: int,
    limits: Limits,
    poll_seconds: float,
    access: Access,
    dicomweb: str | None = None,
    runtime: str = "auto",
    batch_wait_ms: float = 4.0,
    feedback: FeedbackStore | None = None,
    kept_scans: KeptScans | None = None,
    with_metrics: bool = True,
) -> None:
    """Load and warm the model, then answer HTTP until stopped (`braintumor serve`).

    Args:
        reference: the model: a .keras path or a models:/ URI.
        host: address to listen on.
        port: port to listen on.
        limits: upload and batch limits.
        poll_seconds: how often a registry alias is checked for a new version.
        access: keys, rate limit and audit log.
        dicomweb: a DICOMweb server to pull studies from (`POST /v1/studies/{uid}/predict`), or None.
        runtime: "auto" (ONNX Runtime when the model has an export), "onnx" or "keras".
        batch_wait_ms: how long a request waits for others to share its model call.
        feedback: where answers and readers' verdicts are kept, or None.
        kept_scans: where the scans that get a verdict are kept, or None.
        with_metrics: serve `GET /metrics` (Prometheus).
    """
    import uvicorn

    started = time.perf_counter()
    app = create_app(
        reference, limits, poll_seconds, access, dicomweb, runtime, batch_wait_ms, feedback, kept_scans, with_metrics
    )
    served = app.state.followed.current.served
    log.info(
        "serve: %s (version %s) loaded and warmed up in %.1f s; http://%s:%d/",
        reference,
        served.version,
        time.perf_counter() - started,
        host,
        port,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)  # no client addresses
