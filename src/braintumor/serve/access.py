"""Who may ask `braintumor serve`, how often, and what is kept of each answer: API keys, a rate limit per key,
and an append-only audit log that holds nothing identifying.

Keys are random tokens (`braintumor keys add`), shown once and stored as SHA-256 digests in a JSON file, each with
an id and its scopes (predict, explain, reload, feedback, metrics, health). A plain digest suffices because a key
is 256 random bits, not a password: nothing can be guessed from it. A request carries its key in the `X-API-Key`
header; the digest is compared with every stored one in constant time. A key never reaches a log: the audit log
names the key's id.

The audit log is JSON lines, one per request: request id, time, key id, endpoint, model name/version/digest,
latency, and per scan its SHA-256, status, calibrated P(tumor) and gate distance. No file names, no image
bytes, no client address: a file name is where a hand export puts a patient's name.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import HTTPException, Security
from fastapi.security import APIKeyHeader

from braintumor.atomic import atomic_path
from braintumor.errors import AccessError

if TYPE_CHECKING:
    from braintumor.serve.runner import ServedModel

SCOPES = ("predict", "explain", "reload", "feedback", "metrics", "health")
KEY_HEADER = "X-API-Key"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    sha256: str
    scopes: tuple[str, ...]


def read_keys(path: Path) -> list[ApiKey]:
    """The keys in `path` ({"keys": [{"id", "sha256", "scopes"}]}); an `AccessError` names what is wrong."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())["keys"]
        keys = [ApiKey(str(e["id"]), str(e["sha256"]), tuple(e["scopes"])) for e in entries]
    except FileNotFoundError as err:
        raise AccessError(
            f"{path}: no such keys file (create one with `braintumor keys add ID --keys {path}`)"
        ) from err
    except (ValueError, KeyError, TypeError) as err:
        raise AccessError(f"{path}: not a keys file written by `braintumor keys add` ({err})") from err
    for key in keys:
        if len(key.sha256) != 64 or not set(key.sha256) <= set("0123456789abcdef"):
            raise AccessError(f"{path}: key {key.id!r} has no SHA-256 digest")
        if not key.scopes or not set(key.scopes) <= set(SCOPES):
            raise AccessError(f"{path}: key {key.id!r} has scopes {list(key.scopes)}; allowed: {', '.join(SCOPES)}")
    if len({key.id for key in keys}) != len(keys):
        raise AccessError(f"{path}: two keys share an id")
    return keys


def add_key(path: Path, key_id: str, scopes: list[str]) -> str:
    """Create a key with `scopes`, store its digest in `path` (created if missing) and return the key itself,
    which is not stored anywhere."""
    if not set(scopes) <= set(SCOPES) or not scopes:
        raise AccessError(f"scopes must be some of {', '.join(SCOPES)} (got {scopes})")
    keys = read_keys(path) if Path(path).exists() else []
    if any(key.id == key_id for key in keys):
        raise AccessError(f"{path}: a key with id {key_id!r} exists; revoke it first or choose another id")
    token = secrets.token_urlsafe(32)
    write_keys(path, [*keys, ApiKey(key_id, digest(token), tuple(scopes))])
    return token


def revoke_key(path: Path, key_id: str) -> None:
    keys = read_keys(path)
    if not any(key.id == key_id for key in keys):
        raise AccessError(f"{path}: no key with id {key_id!r}")
    write_keys(path, [key for key in keys if key.id != key_id])


def write_keys(path: Path, keys: list[ApiKey]) -> None:
    """The keys file, whole or not at all, readable by its owner only."""
    with atomic_path(path) as staging:
        staging.write_text(json.dumps({"keys": [vars(k) | {"scopes": list(k.scopes)} for k in keys]}, indent=2))
        staging.chmod(0o600)


def find_key(keys: list[ApiKey], presented: str | None) -> ApiKey | None:
    """The key whose digest matches `presented`, compared with every stored digest in constant time."""
    if not presented:
        return None
    wanted, found = digest(presented), None
    for key in keys:
        if secrets.compare_digest(wanted, key.sha256):
            found = key  # no early exit: the time taken does not say which key matched
    return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys: list[ApiKey] | None) -> None:
    """Refuse to listen beyond this machine without keys."""
    if keys is None and not is_loopback(host):
        raise AccessError(
            f"--host {host} opens the service to the network; give --keys FILE (create keys with "
            "`braintumor keys add`), or bind 127.0.0.1"
        )


@dataclass
class RateLimit:
    """A token bucket per key: `per_minute` scans a minute on average, up to `burst` at once."""

    per_minute: float
    burst: int
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # key id: (tokens, time)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self, key_id: str, cost: int) -> float:
        """0 when `cost` scans may go now (and they are counted), else the seconds until they may."""
        with self.lock:
            now = time.monotonic()
            tokens, then = self.buckets.get(key_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.per_minute / 60)
            if cost <= tokens:
                self.buckets[key_id] = (tokens - cost, now)
                return 0.0
            self.buckets[key_id] = (tokens, now)
            return (min(cost, self.burst) - tokens) * 60 / self.per_minute


class AuditLog:
    """Append-only JSON lines; one writer lock, one line a request, flushed as it is written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the server's life
        self.lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self.lock:
            self.file.write(line)
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def scan_digest(inputs: list[bytes], series: bool) -> str:
    """The digest an answer names its scan by: its upload's SHA-256, or for a series the SHA-256 of its files'
    sorted digests (the same files in any order and any grouping of requests give the same digest)."""
    digests = sorted(hashlib.sha256(data).hexdigest() for data in inputs)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest() if series else digests[0]


def scan_record(inputs: list[bytes], result: dict) -> dict:
    """What the audit log keeps of one answer: the digest of its upload (of each, for a series), the series'
    salted name, and the answer's numbers; never a file name or anything read from a DICOM header."""
    digests = [hashlib.sha256(data).hexdigest() for data in inputs]
    record = {"input_sha256": digests[0]} if "series" not in result else {"series": result["series"]}
    if "series" in result:
        record["inputs_sha256"] = digests
        record["scan_sha256"] = scan_digest(inputs, series=True)
    if "error" in result:
        record["status"] = "error"
        record["error"] = result["error"].split(":", 1)[0]  # the reason code; the detail may echo the name
    else:
        record.update({k: result[k] for k in ("status", "refusal", "probability", "gate_distance") if k in result})
    return record


@dataclass
class Access:
    """Who may call what, how often, and where each call is recorded. No keys: every
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
