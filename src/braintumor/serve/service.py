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

By concern: the scan routes live in `serve/answering.py`, readers' verdicts in `serve/feedback.py`, `/metrics`
in `serve/metrics.py`, keys, rate limit and audit log in `serve/access.py`, the model and its batching in
`serve/runner.py`; this module puts them together with the model's own routes and the page.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from braintumor.serve.access import Access
from braintumor.serve.answering import Limits, scan_routes
from braintumor.serve.feedback import FeedbackStore, KeptScans, feedback_routes
from braintumor.serve.metrics import ServiceMetrics
from braintumor.serve.runner import FollowedAlias
from braintumor.serve.watch import SiteHealth, shipped_reference

log = logging.getLogger(__name__)

WEB = Path(__file__).with_name("web")


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


def create_app(
    reference: str,
    limits: Limits | None = None,
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
    access, limits = access or Access(), limits or Limits()
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

    app.include_router(scan_routes(followed, limits, access, dicomweb, kept_scans, metrics, health, feedback))
    app.include_router(feedback_routes(feedback, access.caller, kept_scans))
    if metrics is not None:
        app.include_router(metrics.routes(access.identify, lambda: followed.current.served.describe()))
        app.middleware("http")(metrics.middleware())
    app.mount("/", StaticFiles(directory=WEB, html=True), name="page")
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    return app


def serve(app: FastAPI, host: str, port: int, load_seconds: float) -> None:
    """Answer HTTP with an app of `create_app` until stopped (`braintumor serve`).

    Args:
        app: the app, its model loaded and warmed up.
        host: address to listen on.
        port: port to listen on.
        load_seconds: how long loading and warming took, for the start-up line.
    """
    import uvicorn

    followed = app.state.followed
    log.info(
        "serve: %s (version %s) loaded and warmed up in %.1f s; http://%s:%d/",
        followed.reference,
        followed.current.served.version,
        load_seconds,
        host,
        port,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)  # no client addresses
