"""Pull a registered model version without importing MLflow, and keep it in a local content-addressed cache.

`models:/NAME@ALIAS` and `models:/NAME/VERSION` need three facts (the version an alias names, where its files
are, the run's test metrics) and four files (MLmodel, the Keras archive, the gate, the ONNX export). Importing
MLflow for them costs more memory than the whole prediction (benchmarks/predict_runtime.py), so they are read
over the tracking server's REST API (http, https) or straight from the embedded SQLite store; any other store
(PostgreSQL, MySQL, Databricks) goes through MLflow's own client. Every call looks the alias up again, so an
alias that moved is noticed at once; the files of a version are pulled once, checked against the digests the
registered model states, and checked again before each use. When the registry cannot be reached, the version
the alias named last is answered from the cache and a warning says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

from braintumor.atomic import atomic_path
from braintumor.errors import ModelLoadError

log = logging.getLogger(__name__)

REFERENCE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
CACHE_ENV = "BRAINTUMOR_MODEL_CACHE"
ARTIFACTS_ROUTE = "/api/2.0/mlflow-artifacts/artifacts"
TIMEOUT_S = 30


class RegistryUnreachable(Exception):
    """The registry did not answer (down, refused, timed out): a cached version may stand in."""


@dataclass(frozen=True)
class Version:
    """One registered model version: what an answer reports about it and where its files are."""

    name: str
    version: str
    run_id: str
    description: str
    location: str  # the URI of the model's folder (MLmodel and data/)
    metrics: dict  # the run's metrics (test recall, specificity, ...)


@dataclass(frozen=True)
class Pulled:
    """A version's verified files in the cache; `offline` when the registry was not reached."""

    folder: Path
    version: Version
    offline: bool = False


def project_root() -> Path:
    """The repository root: `DVC_ROOT` inside `dvc exp run` (which may run in a temporary copy), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def redact(text: str) -> str:
    """`text` (a URI, or a message that quotes one) without the user and password a URI may carry:
    `https://user:token@host/...` becomes `https://host/...`."""
    return re.sub(r"(?<=://)[^/\s@]+@", "", text)


def registry_uri() -> str | None:
    """Where registered models live: `MLFLOW_REGISTRY_URI`, else `MLFLOW_TRACKING_URI`, else the project's
    embedded store when run inside the project (as `braintumor register` wrote it); None when none is set."""
    for name in ("MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_URI"):
        if os.environ.get(name):
            return os.environ[name]
    store = project_root() / "mlflow" / "mlflow.db"
    return f"sqlite:///{store}" if store.is_file() else None


def local_path(uri: str) -> Path | None:
    """The local folder a `file:` URI or a plain path names (None for a remote URI)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri) if not parsed.scheme else None


def copy_files(folder: Path, files: list[str], dest: Path) -> None:
    for rel in files:
        source = folder / rel
        if not source.is_file():
            raise ModelLoadError(f"{source}: missing from the registered model's folder")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest / rel)


class RestRegistry:
    """A tracking server's REST API (`mlflow server`): registry calls and the proxied artifact store."""

    def __init__(self, uri: str):
        import requests

        self.base = uri.rstrip("/")
        self.http = requests.Session()
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            self.http.headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            self.http.auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        self.http.verify = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "false").lower() != "true"

    def _get(self, url: str, stream: bool = False, **params):
        import requests

        try:
            answer = self.http.get(url, params=params, timeout=TIMEOUT_S, stream=stream)
        except requests.RequestException as err:
            raise RegistryUnreachable(f"{redact(self.base)}: {type(err).__name__}") from err
        if answer.status_code >= 500:
            raise RegistryUnreachable(f"{redact(self.base)}: HTTP {answer.status_code}")
        if not answer.ok:
            try:
                message = answer.json().get("message", answer.text)
            except ValueError:
                message = answer.text[:200]
            raise ModelLoadError(f"{redact(self.base)}: HTTP {answer.status_code}: {redact(message)}")
        return answer

    def _call(self, route: str, **params) -> dict:
        return self._get(f"{self.base}/api/2.0/mlflow/{route}", **params).json()

    def version(self, name: str, alias: str | None = None, number: str | None = None) -> Version:
        if alias:
            found = self._call("registered-models/alias", name=name, alias=alias)["model_version"]
        else:
            found = self._call("model-versions/get", name=name, version=number)["model_version"]
        location = self._call("model-versions/get-download-uri", name=name, version=found["version"])["artifact_uri"]
        run_id = found.get("run_id", "")
        metrics = self._call("runs/get", run_id=run_id)["run"]["data"].get("metrics", []) if run_id else []
        return Version(
            name,
            str(found["version"]),
            run_id,
            found.get("description", ""),
            location,
            {m["key"]: m["value"] for m in metrics},
        )

    def fetch(self, version: Version, files: list[str], dest: Path) -> None:
        """Copy `files` (paths inside the model's folder) to `dest`: over the server's artifact proxy for an
        `mlflow-artifacts:` location, from disk for a local one."""
        folder = local_path(version.location)
        if folder is not None:
            return copy_files(folder, files, dest)
        parsed = urlparse(version.location)
        if parsed.scheme == "mlflow-artifacts":
            path = parsed.path.lstrip("/")
        elif parsed.scheme in ("http", "https") and ARTIFACTS_ROUTE + "/" in parsed.path:
            path = parsed.path.split(ARTIFACTS_ROUTE + "/", 1)[1]
        else:
            raise ModelLoadError(
                f"{redact(version.location)}: an artifact store this client does not read; serve artifacts "
                "through the tracking server (`mlflow server --serve-artifacts`), or pip install mlflow's "
                "store client and set MLFLOW_TRACKING_URI to a database URI"
            )
        for rel in files:
            answer = self._get(f"{self.base}{ARTIFACTS_ROUTE}/{path.rstrip('/')}/{rel}", stream=True)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            with open(dest / rel, "wb") as out:
                for chunk in answer.iter_content(1 << 20):
                    out.write(chunk)


class SqliteRegistry:
    """The embedded SQLite store `braintumor register` writes (read-only; MLflow's own tables)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.path = Path(uri.removeprefix("sqlite:///"))

    def _rows(self, query: str, *args) -> list[tuple]:
        if not self.path.is_file():
            raise RegistryUnreachable(f"{self.path}: no such database")
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=TIMEOUT_S)) as db:
                return db.execute(query, args).fetchall()
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "unable to open" in str(err):
                raise RegistryUnreachable(f"{self.path}: {err}") from err
            raise ModelLoadError(
                f"{self.path}: not the MLflow schema this client reads ({err}); use a tracking server "
                "(MLFLOW_TRACKING_URI=http://...)"
            ) from err

    def version(self, name: str, alias: str | None = None, number: str | None = None) -> Version:
        if alias:
            named = self._rows("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?", name, alias)
            if not named:
                raise ModelLoadError(f"{self.uri}: registered model {name!r} has no alias {alias!r}")
            number = str(named[0][0])
        found = self._rows(
            "SELECT version, run_id, description, storage_location, source FROM model_versions "
            "WHERE name = ? AND version = ?",
            name,
            int(number),
        )
        if not found:
            raise ModelLoadError(f"{self.uri}: registered model {name!r} has no version {number}")
        version, run_id, description, location, source = found[0]
        if not location and str(source).startswith("runs:/"):  # a version registered from a run's artifacts
            run, _, inner = str(source).removeprefix("runs:/").partition("/")
            location = self._rows("SELECT artifact_uri FROM runs WHERE run_uuid = ?", run)[0][0] + "/" + inner
        metrics = self._rows("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", run_id or "")
        return Version(name, str(version), run_id or "", description or "", location or source, dict(metrics))

    def fetch(self, version: Version, files: list[str], dest: Path) -> None:
        folder = local_path(version.location)
        if folder is None:
            return MlflowRegistry(self.uri).fetch(version, files, dest)
        return copy_files(folder, files, dest)


class MlflowRegistry:
    """Any other store, through MLflow's client (the heavy import this module avoids elsewhere)."""

    def __init__(self, uri: str):
        import mlflow

        self.uri = uri
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or uri)
        mlflow.set_registry_uri(uri)

    def version(self, name: str, alias: str | None = None, number: str | None = None) -> Version:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient()
        try:
            found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
            location = client.get_model_version_download_uri(name, found.version)
            metrics = client.get_run(found.run_id).data.metrics if found.run_id else {}
        except MlflowException as err:
            raise ModelLoadError(f"{redact(self.uri)}: {redact(err.message)}") from err
        return Version(name, str(found.version), found.run_id or "", found.description or "", location, metrics)

    def fetch(self, version: Version, files: list[str], dest: Path) -> None:
        import mlflow

        for rel in files:
            target = (dest / rel).parent
            target.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(f"{version.location.rstrip('/')}/{rel}", dst_path=str(target))


def registry_for(uri: str):
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        return RestRegistry(uri)
    if uri.startswith("sqlite:///"):
        return SqliteRegistry(uri)
    return MlflowRegistry(uri)


def cache_root() -> Path:
    """`BRAINTUMOR_MODEL_CACHE`, else `$XDG_CACHE_HOME/braintumor/models` (`~/.cache/...`)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "braintumor" / "models"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_files(mlmodel: Path) -> tuple[list[str], dict]:
    """The files the model needs besides MLmodel (the Keras archive, the gate and ONNX export its metadata
    names) with the digests the metadata states for them: the gate's and the export's (the archive MLflow
    wrote is a re-save, not the file `model_sha256` names). Only names inside the folder are accepted."""
    try:
        description = yaml.safe_load(mlmodel.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{mlmodel}: not a readable MLflow model description ({err})") from err
    flavor = (description or {}).get("flavors", {}).get("keras") or {}
    data = str(flavor.get("data", "data"))
    metadata = description.get("metadata") or {}
    files = {f"{data}/model.keras": None}
    for part in ("gate", "onnx"):
        if isinstance(metadata.get(part), dict) and metadata[part].get("file"):
            files[f"{data}/{metadata[part]['file']}"] = metadata[part].get("sha256")
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ModelLoadError(f"{mlmodel}: {rel!r} leads outside the model folder")
    return list(files), files


class ModelCache:
    """Pulled versions, one folder per set of files (named by the digest of their digests); per registry, what
    each version and alias last resolved to. Each use re-checks every file against its digest at the pull."""

    def __init__(self, uri: str, root: Path | None = None):
        self.root = root or cache_root()
        self.refs = self.root / "refs" / hashlib.sha256(redact(uri).encode()).hexdigest()[:16]

    def _ref(self, name: str, kind: str, key: str) -> Path:
        return self.refs / name / kind / f"{key}.json"

    def _write(self, path: Path, record: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=1))

    def lookup(self, name: str, alias: str | None, number: str | None) -> tuple[Path, Version] | None:
        """The verified cached folder of `name` at `number` (or at what `alias` named last), or None."""
        if alias:
            seen = self._ref(name, "aliases", alias)
            if not seen.is_file():
                return None
            number = json.loads(seen.read_text())["version"]
        ref = self._ref(name, "versions", str(number))
        if not ref.is_file():
            return None
        record = json.loads(ref.read_text())
        folder = self.root / record["sha256"]
        files = record["files"].items()
        changed = [rel for rel, digest in files if not (folder / rel).is_file() or sha256(folder / rel) != digest]
        if changed:
            log.warning("model cache: %s of %s differs from what was pulled; pulling it again", changed, folder)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return folder, Version(**record["version"])

    def remember_alias(self, name: str, alias: str, version: str) -> None:
        self._write(self._ref(name, "aliases", alias), {"version": version})

    def store(self, version: Version, fetch) -> Path:
        """Pull `version` with `fetch(files, dest)`, check its digests, keep it under its archive's digest."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".pull-{version.name}-{version.version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            fetch(["MLmodel"], staging)
            files, stated = model_files(staging / "MLmodel")
            fetch(files, staging)
            digests = {rel: sha256(staging / rel) for rel in ["MLmodel", *files]}
            wrong = [rel for rel in files if stated[rel] and stated[rel] != digests[rel]]
            if wrong:
                raise ModelLoadError(
                    f"models:/{version.name}/{version.version}: {', '.join(wrong)} pulled with another SHA-256 "
                    "than its MLmodel states; the registered files are damaged or were replaced"
                )
            folder = self.root / hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
            if not folder.exists():  # the same files pulled before (under another version): kept as they are
                staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        record = {
            "sha256": folder.name,
            "files": digests,
            "version": asdict(version),
            "pulled": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self._write(self._ref(version.name, "versions", version.version), record)
        return folder


def pull(reference: str) -> Pulled:
    """The verified local folder of the registered model `reference` names (`models:/NAME@ALIAS` or
    `models:/NAME/VERSION`), pulled when the cache does not hold that version."""
    match = REFERENCE.match(reference)
    if not match:
        raise ModelLoadError(f"{reference}: not a models:/NAME@ALIAS or models:/NAME/VERSION reference")
    uri = registry_uri()
    if uri is None:
        raise ModelLoadError(
            f"{reference}: no registry to look it up in; set MLFLOW_TRACKING_URI to the tracking server or "
            "database that holds the model (or run inside the project after `dvc repro`)"
        )
    name, alias, number = match["name"], match["alias"], match["version"]
    cache = ModelCache(uri)
    try:
        registry = registry_for(uri)
        version = registry.version(name, alias, number)
    except RegistryUnreachable as err:
        cached = cache.lookup(name, alias, number)
        if cached is None:
            raise ModelLoadError(
                f"{reference}: the registry at {redact(uri)} did not answer ({err}) and no copy is cached; "
                "check MLFLOW_TRACKING_URI and the server"
            ) from err
        folder, version = cached
        log.warning(
            "%s: the registry at %s did not answer (%s); answering with the cached version %s",
            reference,
            redact(uri),
            err,
            version.version,
        )
        return Pulled(folder, version, offline=True)
    if alias:
        cache.remember_alias(name, alias, version.version)
    cached = cache.lookup(name, None, version.version)
    if cached is not None and (cached[1].location, cached[1].run_id) == (version.location, version.run_id):
        return Pulled(cached[0], version)  # a version number the registry gave another model is pulled anew
    try:
        folder = cache.store(version, lambda files, dest: registry.fetch(version, files, dest))
    except RegistryUnreachable as err:
        raise ModelLoadError(f"{reference}: the registry at {redact(uri)} stopped answering ({err})") from err
    log.info("%s: version %s pulled into %s", reference, version.version, folder)
    return Pulled(folder, version)


def current_version(reference: str) -> str | None:
    """The version a `models:/NAME@ALIAS` reference names now (None for any other reference)."""
    match = REFERENCE.match(reference)
    if not match or not match["alias"]:
        return None
    uri = registry_uri()
    if uri is None:
        raise ModelLoadError(f"{reference}: no registry (set MLFLOW_TRACKING_URI)")
    return registry_for(uri).version(match["name"], match["alias"]).version
