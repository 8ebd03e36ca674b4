"""The register stage against real MLflow tracking servers on loopback: runs, model card, champion rule."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from braintumor.registry import CHAMPION, register
from braintumor.tracking import data_fingerprint
from conftest_mlflow import postgres, tool_env, tracking_server


def registering(server: str, monkeypatch, experiment: str):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("DVC_ROOT", str(Path.cwd()))

    def run(state, **changes):
        workspace, params = state
        params = copy.deepcopy(params)
        params["register"].update(experiment=experiment, model_name=f"{experiment}-model", **changes)
        with contextlib.chdir(workspace):
            return register(params)

    return run


def better(states) -> str:
    """The variant the selection rule must prefer: highest out-of-fold accuracy at the target recall, then
    test recall, then test accuracy."""
    scores = {name: json.loads((ws / "metrics/evaluate.json").read_text()) for name, (ws, _) in states.items()}
    return max(scores, key=lambda name: (scores[name]["threshold_selection"]["out_of_fold"]["accuracy"],
                                         scores[name]["recall"], scores[name]["accuracy"]))


def champion_model(client, name: str) -> str:
    return client.get_run(client.get_model_version_by_alias(name, CHAMPION).run_id).data.tags["model"]


def test_champion_is_the_better_variant_and_registering_again_changes_nothing(mlflow_server, trained_states,
                                                                             monkeypatch, in_tmp):
    run = registering(mlflow_server, monkeypatch, "champion")
    first = run(trained_states["seed_fsm"])
    assert first["outcome"] == "promoted: no champion yet" and first["champion_version"] == 1
    second = run(trained_states["seed_cnn"])
    client = MlflowClient()
    assert champion_model(client, "champion-model") == better(trained_states)
    assert second["promoted"] == int(better(trained_states) == "seed_cnn")

    versions = {v.version for v in client.search_model_versions("name = 'champion-model'")}
    runs = mlflow.search_runs(experiment_names=["champion"], output_format="list")
    again = [run(trained_states[name]) for name in ("seed_fsm", "seed_cnn")]
    assert all(decision["promoted"] == 0 and decision["run_logged"] == 0 for decision in again)
    assert {v.version for v in client.search_model_versions("name = 'champion-model'")} == versions
    assert len(mlflow.search_runs(experiment_names=["champion"], output_format="list")) == len(runs) == 2
    assert champion_model(client, "champion-model") == better(trained_states)
    workspace = trained_states["seed_cnn"][0]
    assert json.loads((workspace / "metrics/register.json").read_text()) == again[-1]


def test_run_holds_params_epoch_metrics_tags_model_and_card(mlflow_server, trained_states, monkeypatch, in_tmp):
    decision = registering(mlflow_server, monkeypatch, "contents")(trained_states["seed_cnn"])
    client = MlflowClient()
    run = client.get_run(decision["run_id"])
    workspace, params = trained_states["seed_cnn"]
    assert run.data.params["train.model"] == "seed_cnn" and run.data.params["seed"] == str(params["seed"])
    evaluated = json.loads((workspace / "metrics/evaluate.json").read_text())
    assert run.data.metrics["recall"] == evaluated["recall"]
    assert run.data.metrics["at_0.5.accuracy"] == evaluated["at_0.5"]["accuracy"]
    members = json.loads((workspace / "metrics/train.json").read_text())["members"]
    for member in members:
        history = client.get_metric_history(run.info.run_id, f"epoch.fold{member['fold']}/val/loss")
        assert [m.step for m in history] == list(range(member["epochs_run"]))
    tags = run.data.tags
    assert tags["keras_backend"] == "tensorflow" and tags["braintumor.data_fingerprint"] == data_fingerprint(
        workspace / "artifacts/split/manifest.csv")
    assert len(tags["git_commit"]) in (40, len("unknown")) and tags["device"]
    artifacts = {a.path for folder in ("metrics", "evaluate") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"metrics/evaluate.json", "evaluate/roc.json", "evaluate/misclassified.png"} <= artifacts

    version = client.get_model_version("contents-model", decision["champion_version"])
    assert "Not a diagnostic device" in version.description and f"{evaluated['threshold']:.6f}" in version.description
    # the card says what the shipped model averages, read off the model itself by evaluate
    shipped = json.loads((workspace / "models/model.json").read_text())
    assert shipped["mirror_average"] is params["train"]["mirror_average"] is True
    assert "left-right mirror" in version.description
    logged = mlflow.models.get_model_info(f"models:/contents-model/{version.version}")
    assert logged.signature.inputs.inputs[0].shape == (-1, 48, 48, 3)
    assert logged.saved_input_example_info is not None
    assert logged.metadata["threshold"] == pytest.approx(evaluated["threshold"], abs=1e-6)


def test_floors_keep_weak_runs_out(mlflow_server, trained_states, monkeypatch, in_tmp):
    decision = registering(mlflow_server, monkeypatch, "floors")(trained_states["seed_fsm"], min_accuracy=1.0)
    assert decision["candidate"] is None and decision["champion"] is None
    assert "clears the floors" in decision["outcome"]
    assert MlflowClient().search_model_versions("name = 'floors-model'") == []


def test_champion_tested_on_other_data_stays_unless_replace(mlflow_server, trained_states, monkeypatch, in_tmp):
    run = registering(mlflow_server, monkeypatch, "newdata")
    run(trained_states["seed_fsm"])
    workspace, params = trained_states["seed_cnn"]
    moved = in_tmp / "other-data"
    shutil.copytree(workspace, moved)
    manifest = pd.read_csv(moved / "artifacts/split/manifest.csv")
    manifest.loc[0, "split"] = "val" if manifest.loc[0, "split"] != "val" else "train"
    manifest.to_csv(moved / "artifacts/split/manifest.csv", index=False)

    kept = run((moved, params))
    assert kept["promoted"] == 0 and "other data" in kept["outcome"]
    assert champion_model(MlflowClient(), "newdata-model") == "seed_fsm"
    replaced = run((moved, params), champion_on_new_data="replace")
    assert replaced["promoted"] == 1 and replaced["run_logged"] == 0
    assert replaced["champion"]["data_fingerprint"] == kept["data_fingerprint"] != replaced["champion_before"][
        "data_fingerprint"]


def test_champion_at_another_target_recall_is_not_compared(mlflow_server, trained_states, monkeypatch, in_tmp):
    """Out-of-fold accuracy depends on the target recall the threshold aims at, so runs at different targets
    do not rank against each other."""
    from braintumor.evaluation import evaluate

    run = registering(mlflow_server, monkeypatch, "target")
    first = run(trained_states["seed_fsm"])
    workspace, params = trained_states["seed_cnn"]
    moved = in_tmp / "other-target"
    shutil.copytree(workspace, moved)
    params = copy.deepcopy(params)
    params["evaluate"]["target_recall"] = 0.9
    with contextlib.chdir(moved):
        evaluate(params)  # a new threshold, so a new model file and run

    kept = run((moved, params))
    assert kept["promoted"] == 0 and "target recall 0.98" in kept["outcome"]
    assert kept["candidate"]["target_recall"] == 0.9 and kept["champion"]["run_id"] == first["run_id"]
    replaced = run((moved, params), champion_on_new_data="replace")
    assert replaced["promoted"] == 1 and replaced["champion"]["run_id"] == kept["run_id"]


def test_concurrent_registrations_leave_one_version_per_run(mlflow_server, trained_states, in_tmp):
    """Two `braintumor register` processes at once, as queued experiments of one repository run them."""
    processes = []
    for name, (workspace, params) in trained_states.items():
        params = copy.deepcopy(params)
        params["register"].update(experiment="concurrent", model_name="concurrent-model")
        (workspace / "concurrent.yaml").write_text(yaml.safe_dump(params))
        env = tool_env(MLFLOW_TRACKING_URI=mlflow_server, DVC_ROOT=str(in_tmp))
        processes.append(subprocess.Popen([sys.executable, "-m", "braintumor.cli", "register", "--params",
                                           "concurrent.yaml"], cwd=workspace, env=env, stderr=subprocess.PIPE,
                                          text=True))
    for process in processes:
        assert process.wait(timeout=600) == 0, process.stderr.read()
    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient()
    versions = client.search_model_versions("name = 'concurrent-model'")
    runs = [v.run_id for v in versions]
    assert len(runs) == len(set(runs)) >= 1
    assert champion_model(client, "concurrent-model") == better(trained_states)


def test_registry_on_postgresql(trained_states, monkeypatch, in_tmp):
    with postgres() as database, tracking_server(in_tmp, database) as server:
        run = registering(server, monkeypatch, "postgres")
        for name in ("seed_fsm", "seed_cnn"):
            run(trained_states[name])
        assert champion_model(MlflowClient(), "postgres-model") == better(trained_states)
