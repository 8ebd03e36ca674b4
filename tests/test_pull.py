"""`models:/` references without MLflow on the predict path: resolved over the REST API or from the embedded
SQLite store, pulled once into a content-addressed cache, checked by digest at each use, answered from the cache
when the registry is down, and pulled again when an alias moves or a cached file changes."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from braintumor.errors import ModelLoadError
from braintumor.registry import pull as pulling
from braintumor.registry.pull import RestRegistry, SqliteRegistry, pull, sha256
from braintumor.registry.register import register
from braintumor.serve.predict import load, predict

from conftest import save
from fixtures.servers import register_states, tool_env
from fixtures.split import synthetic_scan

MODEL = "models:/pull-model@champion"


@pytest.fixture(scope="module")
def registry(mlflow_server, trained_states, tmp_path_factory):
    """seed_fsm as version 1 and seed_cnn (whose gate reads the synthetic scans) as version 2 of `pull-model` on
    the session's tracking server."""
    client = register_states(trained_states, "pull", "pull-model", mlflow_server, tmp_path_factory.mktemp("pull-root"))
    client.set_registered_model_alias("pull-model", "champion", "2")
    return client


@pytest.fixture
def server(registry, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # the tracking server is the registry
    registry.set_registered_model_alias("pull-model", "champion", "2")
    return registry


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("pull-scans")
    return [save(root / f"{k}.png", synthetic_scan(k, k % 2 == 0, 80)[..., 0]) for k in range(6)]


def counting_fetches(monkeypatch) -> list[str]:
    """The files each registry pulls from now on."""
    fetched = []
    for registry in (RestRegistry, SqliteRegistry):
        real = registry.fetch

        def fetch(self, version, files, dest, real=real):
            fetched.extend(files)
            return real(self, version, files, dest)

        monkeypatch.setattr(registry, fetch.__name__, fetch)
    return fetched


def test_a_registered_model_is_pulled_once_and_answers_as_its_local_copy(
    server, trained_states, scans, monkeypatch, model_cache
):
    fetched = counting_fetches(monkeypatch)
    first = pull(MODEL)
    assert first.version.version == "2" and not first.offline and fetched
    assert first.folder.parent == model_cache and {"recall", "specificity"} <= set(first.version.metrics)
    fetched.clear()
    again = pull(MODEL)
    assert again.folder == first.folder and not fetched  # warm: one lookup, no file pulled
    local = load(str(trained_states["seed_cnn"][0] / "models/model.keras"))
    answers = [predict(model, scans)[0] for model in (load(MODEL), local)]
    assert sum("probability" in a for a in answers[1]) >= 2
    assert answers[0] == answers[1]  # the same statuses, labels and probabilities


def test_a_cold_and_a_warm_pull_import_no_mlflow(server, mlflow_server, model_cache, tmp_path):
    code = (
        "import sys; from braintumor.serve.predict import load; load(sys.argv[1]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    )
    env = tool_env(MLFLOW_TRACKING_URI=mlflow_server, BRAINTUMOR_MODEL_CACHE=str(model_cache))
    for _ in ("cold", "warm"):
        done = subprocess.run(
            [sys.executable, "-c", code, MODEL], env=env, capture_output=True, text=True, cwd=tmp_path
        )
        assert done.returncode == 0 and done.stdout.split("\n")[-2] == "[]", done.stderr[-2000:]
    assert len([p for p in model_cache.iterdir() if p.name != "refs"]) == 1


@pytest.mark.parametrize("damaged", ["data/model.keras", "data/gate.npz", "MLmodel"])
def test_a_changed_cached_file_is_refused_by_its_digest_and_pulled_again(server, monkeypatch, caplog, damaged):
    folder = pull(MODEL).folder
    intact = sha256(folder / damaged)
    data = bytearray((folder / damaged).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / damaged).write_bytes(bytes(data))
    fetched = counting_fetches(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = pull(MODEL)
    assert damaged in fetched and "differs from what was pulled" in caplog.text
    assert sha256(again.folder / damaged) == intact


def test_a_moved_alias_is_noticed_on_the_next_call(server, monkeypatch):
    first = pull(MODEL)
    server.set_registered_model_alias("pull-model", "champion", "1")
    moved = pull(MODEL)
    assert moved.version.version == "1" and moved.folder != first.folder
    server.set_registered_model_alias("pull-model", "champion", "2")
    fetched = counting_fetches(monkeypatch)
    back = pull(MODEL)
    assert back.version.version == "2" and back.folder == first.folder and not fetched


def test_a_registry_that_is_down_answers_from_the_cache_and_says_so(server, monkeypatch, caplog):
    warm = pull(MODEL)

    def refused(*args, **kwargs):
        raise requests.ConnectionError("connection refused")

    monkeypatch.setattr(requests.Session, "get", refused)
    with caplog.at_level(logging.WARNING):
        offline = pull(MODEL)
    assert offline.offline and offline.folder == warm.folder and offline.version.version == "2"
    assert "did not answer" in caplog.text and "cached version 2" in caplog.text
    with pytest.raises(ModelLoadError, match="no copy is cached"):
        pull("models:/pull-model/1")


def test_the_embedded_store_is_read_without_mlflow_and_a_reused_version_number_is_pulled_anew(
    trained_states, scans, monkeypatch, tmp_path
):
    """The project's own `mlflow/mlflow.db` (what `make repro` leaves): read with SQLite. When the store is
    made again, its version 1 is another model: the cache must not answer with the old one."""
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # the project's own store, nothing else
        monkeypatch.delenv(variable, raising=False)
    pulled = {}
    for name in ("seed_cnn", "seed_fsm"):  # each in a store of its own: version 1 both times
        monkeypatch.setenv("DVC_ROOT", str(tmp_path / name))
        workspace, params = trained_states[name]
        params = copy.deepcopy(params)
        params["register"].update(experiment="embedded", model_name="pull-model")
        with contextlib.chdir(workspace):
            register(params)
        monkeypatch.delenv("MLFLOW_TRACKING_URI")  # which MLflow's set_tracking_uri leaves behind
        monkeypatch.delenv("MLFLOW_REGISTRY_URI")
        if name == "seed_fsm":  # the store made again where the first one was
            shutil.copyfile(tmp_path / name / "mlflow/mlflow.db", tmp_path / "seed_cnn/mlflow/mlflow.db")
            monkeypatch.setenv("DVC_ROOT", str(tmp_path / "seed_cnn"))
        pulled[name] = pull(MODEL)
        assert pulled[name].version.version == "1" and pulled[name].version.location.startswith("file:")
        info = json.loads((workspace / "models/model.json").read_text())
        assert sha256(pulled[name].folder / "data/gate.npz") == info["gate"]["sha256"]
    assert pulled["seed_cnn"].folder != pulled["seed_fsm"].folder
    local = load(str(trained_states["seed_fsm"][0] / "models/model.keras"))
    assert predict(load(MODEL), scans)[0] == predict(local, scans)[0]


def test_pulled_files_that_differ_from_the_stated_digests_are_not_kept(server, monkeypatch, model_cache):
    real = RestRegistry.fetch

    def swapped(self, version, files, dest):
        real(self, version, files, dest)
        for name in files:
            if name.endswith("gate.npz"):
                data = bytearray((dest / name).read_bytes())
                data[len(data) // 2] ^= 0xFF
                (dest / name).write_bytes(bytes(data))

    monkeypatch.setattr(RestRegistry, "fetch", swapped)
    with pytest.raises(ModelLoadError, match="another SHA-256 than its MLmodel states"):
        pull(MODEL)
    assert [p.name for p in model_cache.iterdir() if p.name != "refs"] == []


def test_no_registry_anywhere_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ModelLoadError, match="MLFLOW_TRACKING_URI"):
        pull(MODEL)
    assert pulling.registry_uri() is None
    assert not list(tmp_path.iterdir())  # and nothing was created there
