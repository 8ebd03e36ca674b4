"""Readers' verdicts on the service's answers, kept durably: the first half of the loop that turns a site's own
scans into reviewed training data (issue 43).

Every answer the service gives is recorded (request id, the scan's digest, the model that answered and what it
said), so that a verdict can only name an answer that was given: `POST /v1/feedback` carries the request id and
the scan digest the answer returned, and a code (tumor, no tumor, not a brain MR, can't tell; a subtype where the
reader knows it), never free text, which is where patient names get typed. A verdict keeps the key id that gave
it (the reader or site), the time and a copy of the model's answer. Verdicts are appended, never overwritten: a
second reader's verdict on the same scan sits beside the first (agreement between readers is a figure too), and a
reader who corrects theirs adds a newer row.

The store is any SQLAlchemy database: SQLite beside the audit log by default (write-ahead log, every commit
synced, so a server killed between two verdicts loses neither), or the site's PostgreSQL, which two replicas of
the service can write at once. Each verdict is committed before its answer is sent.
"""

from __future__ import annotations

import datetime
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import Column, DateTime, Float, Integer, MetaData, String, Table, create_engine, event, insert, select
from sqlalchemy.exc import OperationalError, ProgrammingError

from braintumor.atomic import atomic_path

VERDICTS = ("tumor", "no_tumor", "not_brain_mr", "cant_tell")
TRAINING_VERDICTS = ("tumor", "no_tumor")  # the verdicts whose scans can become training data
SUBTYPES = ("glioma", "meningioma", "pituitary")

metadata = MetaData()


def _answer_columns() -> list[Column]:
    """What an answer said, as the model gave it: kept with each answer and copied into each verdict."""
    return [
        Column("request_id", String(32), nullable=False, index=True),
        Column("scan_sha256", String(64), nullable=False),
        Column("model_name", String(200)),
        Column("model_version", String(40)),
        Column("model_sha256", String(64)),
        Column("status", String(40), nullable=False),
        Column("probability", Float),
        Column("gate_distance", Float),
    ]


answers = Table(
    "answers",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("asked_by", String(100), nullable=False),  # the key id that asked
    *_answer_columns(),
)
verdicts = Table(
    "verdicts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("key_id", String(100), nullable=False, index=True),  # the reader (or site) that gave it
    *_answer_columns(),
    Column("verdict", String(20), nullable=False),
    Column("subtype", String(20)),
    Column("kept", String(200)),  # where its pixels were kept (relative to the kept-scans folder), if they were
)


class Verdict(BaseModel):
    """The body of `POST /v1/feedback`: codes only (unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="the `request_id` of the answer")
    scan_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the `scan_sha256` of the scan in that answer")
    verdict: Literal[VERDICTS]  # type: ignore[valid-type]
    subtype: Literal[SUBTYPES] | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def subtype_only_for_a_tumor(self):
        if self.subtype is not None and self.verdict != "tumor":
            raise ValueError(f"a subtype goes with the verdict `tumor`, not `{self.verdict}`")
        return self


class UnknownAnswer(LookupError):
    """No answer of this service has that request id and scan digest."""


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class FeedbackStore:
    """The answers and verdicts tables of one database (created on first use)."""

    def __init__(self, url: str):
        self.url = url
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, connect_args={"timeout": 30} if sqlite else {}, pool_pre_ping=not sqlite)
        if sqlite:
            event.listen(self.engine, "connect", _durable_sqlite)
        try:
            metadata.create_all(self.engine)
        except (OperationalError, ProgrammingError):  # another replica created them at the same moment
            metadata.create_all(self.engine)

    def record_answers(self, request_id: str, key_id: str, model: dict, results: list[dict]) -> None:
        """Keep every scan answer of one request (those with a digest: an unreadable file has none)."""
        rows = [
            {
                "time": now(),
                "asked_by": key_id,
                "request_id": request_id,
                "scan_sha256": result["scan_sha256"],
                "model_name": model.get("name"),
                "model_version": None if model.get("version") is None else str(model["version"]),
                "model_sha256": model.get("model_sha256"),
                "status": result["status"],
                "probability": result.get("probability"),
                "gate_distance": result.get("gate_distance"),
            }
            for result in results
            if "scan_sha256" in result and "status" in result
        ]
        if rows:
            with self.engine.begin() as db:
                db.execute(insert(answers), rows)

    def answer(self, request_id: str, scan_sha256: str) -> dict:
        """The answer of `request_id` on the scan `scan_sha256`; `UnknownAnswer` when there is none."""
        with self.engine.connect() as db:
            where = (answers.c.request_id == request_id, answers.c.scan_sha256 == scan_sha256)
            found = db.execute(select(answers).where(*where).limit(1)).mappings().first()
        if found is None:
            raise UnknownAnswer(
                f"no answer of this service has request id {request_id} for scan {scan_sha256[:12]}…: send the "
                "`request_id` and `scan_sha256` of the answer"
            )
        return dict(found)

    def add(self, verdict: Verdict, key_id: str, kept: str | None = None) -> dict:
        """Append `verdict` by `key_id` with a copy of the answer it names (`UnknownAnswer` when none does) and
        where its pixels were kept."""
        answer = self.answer(verdict.request_id, verdict.scan_sha256)
        row = {c.name: answer[c.name] for c in _answer_columns()}
        row |= {"time": now(), "key_id": key_id, "verdict": verdict.verdict, "subtype": verdict.subtype}
        row["kept"] = kept
        with self.engine.begin() as db:
            row["id"] = db.execute(insert(verdicts).values(**row)).inserted_primary_key[0]
        return row

    def verdicts(self) -> list[dict]:
        """Every verdict, oldest first."""
        with self.engine.connect() as db:
            return [dict(r) for r in db.execute(select(verdicts).order_by(verdicts.c.id)).mappings()]

    def latest_by_scan(self) -> dict[str, list[dict]]:
        """{scan digest: each reader's latest verdict on it}: what export and watch count (a reader who corrected
        a verdict counts once, with the correction)."""
        latest = {(v["scan_sha256"], v["key_id"]): v for v in self.verdicts()}
        by_scan: dict[str, list[dict]] = {}
        for (scan, _), verdict in latest.items():
            by_scan.setdefault(scan, []).append(verdict)
        return by_scan

    def close(self) -> None:
        self.engine.dispose()


class KeptScans:
    """The model inputs of recent answers, held in memory (at most `budget_mb`, oldest dropped first) until a
    reader's tumor / no tumor verdict asks to keep one: then its pixels are written to `folder` as PNG, named by
    the scan's digest. Pixels only: nothing from a DICOM header, no file name, no PNG text chunk."""

    def __init__(self, folder: Path, budget_mb: float = 64):
        self.folder, self.budget = Path(folder), int(budget_mb * (1 << 20))
        self.held: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self.size, self.lock = 0, threading.Lock()

    def hold(self, request_id: str, scan_sha256: str, pixels: np.ndarray) -> None:
        """`pixels`: (slices, size, size) uint8, the grayscale model inputs of one scan (one slice: an image)."""
        with self.lock:
            self.held[(request_id, scan_sha256)] = pixels
            self.size += pixels.nbytes
            while self.size > self.budget and self.held:
                self.size -= self.held.popitem(last=False)[1].nbytes

    def keep(self, request_id: str, scan_sha256: str) -> str | None:
        """Write the scan's pixels (`<digest>.png`, or `<digest>/slice-NNN.png` for a series); its path relative
        to the folder, or None when they are no longer held (more scans came since than the budget holds)."""
        with self.lock:
            pixels = self.held.get((request_id, scan_sha256))
        if pixels is None:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        if len(pixels) == 1:
            with atomic_path(self.folder / f"{scan_sha256}.png") as tmp:
                Image.fromarray(pixels[0]).save(tmp, format="PNG")
            return f"{scan_sha256}.png"
        with atomic_path(self.folder / scan_sha256) as tmp:
            tmp.mkdir()
            for k, image in enumerate(pixels):
                Image.fromarray(image).save(tmp / f"slice-{k:03d}.png", format="PNG")
        return scan_sha256


def _durable_sqlite(connection, _record) -> None:
    """Write-ahead log and a sync at every commit: a verdict answered is a verdict on disk."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def feedback_routes(store: FeedbackStore | None, caller, kept_scans: KeptScans | None = None) -> APIRouter:
    """`POST /v1/feedback`, behind the `feedback` scope (`caller`: `Access.caller` of the app)."""
    routes = APIRouter()

    @routes.post("/v1/feedback", status_code=201)
    def feedback(verdict: Verdict, key_id: str = Depends(caller("feedback"))):
        """A reader's verdict on one scan of an answer: appended beside any earlier one, never over it."""
        if store is None:
            raise HTTPException(404, "this server keeps no verdicts: start it with --feedback-db URL or --audit-log")
        try:
            store.answer(verdict.request_id, verdict.scan_sha256)
            wanted = kept_scans is not None and verdict.verdict in TRAINING_VERDICTS
            kept = kept_scans.keep(verdict.request_id, verdict.scan_sha256) if wanted else None
            row = store.add(verdict, key_id, kept)
        except UnknownAnswer as err:
            raise HTTPException(404, str(err)) from err
        answer = {key: row[key] for key in ("model_name", "model_version", "status", "probability", "gate_distance")}
        return {
            "id": row["id"],
            "time": row["time"].isoformat(timespec="milliseconds"),
            "key_id": key_id,
            "request_id": verdict.request_id,
            "scan_sha256": verdict.scan_sha256,
            "verdict": verdict.verdict,
            "subtype": verdict.subtype,
            "answer": answer,
            "scan_kept": kept is not None,
        }

    return routes
