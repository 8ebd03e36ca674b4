"""Answering scans over HTTP: `POST /v1/predict` (uploaded files), `POST /v1/studies/{uid}/predict` (a study
pulled from DICOMweb) and `POST /v1/explain` (one slice beside its evidence map). Uploads are read into memory
and decoded there, through the pixel limit and format allowlist of `images.open_image`; each answer is audited,
counted for the metrics and the site-health strip, and kept for readers' verdicts."""

from __future__ import annotations

import io
import re
import time
import uuid
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from braintumor.data.images import DEFAULT_MAX_PIXELS, prepare
from braintumor.data.scans import read_scans
from braintumor.errors import ImageReadError
from braintumor.serve.access import Access, scan_digest
from braintumor.serve.feedback import FeedbackStore, KeptScans
from braintumor.serve.metrics import ServiceMetrics
from braintumor.serve.predict import series_results
from braintumor.serve.runner import FollowedAlias, ModelRunner
from braintumor.serve.watch import SiteHealth

STUDY_UID = re.compile(r"[0-9.]{1,64}")


@dataclass(frozen=True)
class Limits:
    """What one request may send; anything past a limit is refused with a message, never decoded."""

    max_body_bytes: int = 100 << 20
    max_file_bytes: int = 20 << 20
    max_files: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS


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


def scan_routes(
    followed: FollowedAlias,
    limits: Limits,
    access: Access,
    dicomweb: str | None,
    kept_scans: KeptScans | None,
    metrics: ServiceMetrics | None,
    health: SiteHealth,
    feedback: FeedbackStore | None,
) -> APIRouter:
    """The routes that answer scans, on the model `followed` names at each request (see `create_app`)."""
    router = APIRouter()

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

    @router.post("/v1/predict")
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

    @router.post("/v1/studies/{study_uid}/predict")
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

    @router.post(
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

    return router
