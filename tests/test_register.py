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

from braintumor.registry.register import CHAMPION, register
from braintumor.registry.tracking import TRUST_TAG, data_fingerprint

from fixtures.servers import postgres, tool_env, tracking_server


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
    return max(
        scores,
        key=lambda name: (
            scores[name]["threshold_selection"]["out_of_fold"]["accuracy"],
            scores[name]["recall"],
            scores[name]["accuracy"],
        ),
    )


def champion_model(client, name: str) -> str:
    return client.get_run(client.get_model_version_by_alias(name, CHAMPION).run_id).data.tags["model"]


def test_champion_is_the_better_variant_and_registering_again_changes_nothing(
    mlflow_server, trained_states, monkeypatch, in_tmp
):
    run = registering(mlflow_server, monkeypatch, "champion")
    first = run(trained_states["seed_fsm"])
    assert first["promoted"] and first["champion_version"] == 1  # the first registered run becomes champion
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


def test_a_champion_without_the_gate_yields_to_the_same_model_with_it(
    mlflow_server, trained_states, monkeypatch, in_tmp, tmp_path
):
    workspace, params = trained_states["seed_cnn"]
    older = tmp_path / "older"
    shutil.copytree(workspace, older)
    info = json.loads((older / "models/model.json").read_text())
    for key in ("calibration", "probability_threshold", "uncertain_band", "gate"):
        del info[key]  # as `evaluate` wrote it before it fitted them
    (older / "models/model.json").write_text(json.dumps(info))
    (older / "models/gate.npz").unlink()
    run = registering(mlflow_server, monkeypatch, "trust")
    assert run((older, params))["champion_version"] == 1
    decision = run((workspace, params))
    assert decision["champion_version"] == 2 and "adds calibration and the gate" in decision["outcome"]
    client = MlflowClient()
    assert TRUST_TAG in client.get_run(client.get_model_version_by_alias("trust-model", CHAMPION).run_id).data.tags
    assert run((older, params))["champion_version"] == 2  # and the older one does not take it back


def test_of_level_models_the_newer_one_is_the_champion(mlflow_server, trained_states, monkeypatch, in_tmp, tmp_path):
    """The same figures and contents from a later evaluate (here: the model described anew, as when a new export
    of the same network ships) take the alias, so `@champion` is what the pipeline makes now; registering the
    older state again reuses its run and does not take the alias back."""
    workspace, params = trained_states["seed_cnn"]
    newer = tmp_path / "newer"
    shutil.copytree(workspace, newer)
    info = json.loads((newer / "models/model.json").read_text())
    info["input"] += " (described anew)"
    (newer / "models/model.json").write_text(json.dumps(info))
    run = registering(mlflow_server, monkeypatch, "level")
    assert run((workspace, params))["champion_version"] == 1
    decision = run((newer, params))
    assert decision["champion_version"] == 2 and "level with the champion" in decision["outcome"]
    again = run((workspace, params))
    assert again["run_logged"] == 0 and again["champion_version"] == 2


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
        workspace / "artifacts/split/manifest.csv"
    )
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
    assert (
        replaced["champion"]["data_fingerprint"]
        == kept["data_fingerprint"]
        != replaced["champion_before"]["data_fingerprint"]
    )


def test_champion_at_another_target_recall_is_not_compared(mlflow_server, trained_states, monkeypatch, in_tmp):
    """Out-of-fold accuracy depends on the target recall the threshold aims at, so runs at different targets
    do not rank against each other."""
    from braintumor.quality.evaluate import evaluate

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
    for workspace, params in trained_states.values():
        params = copy.deepcopy(params)
        params["register"].update(experiment="concurrent", model_name="concurrent-model")
        (workspace / "concurrent.yaml").write_text(yaml.safe_dump(params))
        env = tool_env(MLFLOW_TRACKING_URI=mlflow_server, DVC_ROOT=str(in_tmp))
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "braintumor.cli", "register", "--params", "concurrent.yaml"],
                cwd=workspace,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
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


def test_a_failed_registration_does_not_block_the_next(mlflow_server, trained_states, monkeypatch, in_tmp):
    """A run that failed after it set its digest tag (here: logging the model raised) must not be reused."""
    from mlflow.models import Model

    run = registering(mlflow_server, monkeypatch, "wedge")
    real_log = Model.log

    def fails(*args, **kwargs):
        raise RuntimeError("artifact store unreachable")

    monkeypatch.setattr(Model, "log", fails)
    with pytest.raises(RuntimeError, match="artifact store unreachable"):
        run(trained_states["seed_fsm"])
    failed = mlflow.search_runs(experiment_names=["wedge"], output_format="list")
    assert [r.info.status for r in failed] == ["FAILED"]
    monkeypatch.setattr(Model, "log", real_log)
    decision = run(trained_states["seed_fsm"])
    assert decision["run_logged"] == 1 and decision["promoted"] == 1 and decision["run_id"] != failed[0].info.run_id


def test_a_slower_registration_cannot_put_back_a_worse_champion(mlflow_server, trained_states, monkeypatch, in_tmp):
    """Two registrations from different clones into one server both read "no champion", then move the alias:
    the better one first. The barrier forces that overlap; the worse one must then decide again and keep out."""
    import threading

    from braintumor.registry import register as registry

    run = registering(mlflow_server, monkeypatch, "race")
    best_name = better(trained_states)
    worse_name = next(name for name in trained_states if name != best_name)
    decisions = {name: run(trained_states[name]) for name in trained_states}
    client = MlflowClient()
    client.delete_registered_model_alias("race-model", CHAMPION)
    runs = {name: client.get_run(d["run_id"]) for name, d in decisions.items()}
    versions = {
        name: client.get_model_version("race-model", str(d["candidate"]["version"])) for name, d in decisions.items()
    }
    assert {name: d["candidate"]["run_id"] for name, d in decisions.items()} == {
        name: d["run_id"] for name, d in decisions.items()
    }  # each registered its own version

    barrier, best_moved = threading.Barrier(2, timeout=60), threading.Event()
    real_decide, real_set = registry.decide, client.set_registered_model_alias
    first_decision = threading.local()

    def decide(candidate, champion, mode):
        outcome = real_decide(candidate, champion, mode)
        if not getattr(first_decision, "done", False):  # both have decided against "no champion" ...
            first_decision.done = True
            barrier.wait()
            if candidate.info.run_id == runs[worse_name].info.run_id:
                assert best_moved.wait(60)  # ... and the better one moves the alias first
        return outcome

    def set_alias(name, alias, version):
        real_set(name, alias, version)
        if str(version) == versions[best_name].version:
            best_moved.set()

    monkeypatch.setattr(registry, "decide", decide)
    monkeypatch.setattr(client, "set_registered_model_alias", set_alias)
    outcomes = {}

    def register_as(name):
        outcomes[name] = registry.move_champion(client, "race-model", runs[name], versions[name], "keep")

    threads = [threading.Thread(target=register_as, args=(name,)) for name in (best_name, worse_name)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert outcomes[best_name][0] is True and outcomes[worse_name][0] is False, outcomes
    assert champion_model(client, "race-model") == best_name


def test_models_and_metrics_of_two_evaluations_are_not_registered_together(
    mlflow_server, trained_states, monkeypatch, in_tmp
):
    """An evaluate stage killed between writing models/ and metrics/evaluate.json leaves them disagreeing."""
    from braintumor.errors import RegistryError

    workspace, params = trained_states["seed_fsm"]
    copy_root = in_tmp / "interrupted"
    shutil.copytree(workspace, copy_root)
    other, _ = trained_states["seed_cnn"]
    shutil.copy(other / "metrics/evaluate.json", copy_root / "metrics/evaluate.json")
    run = registering(mlflow_server, monkeypatch, "mixed")
    with pytest.raises(RegistryError, match="do not describe"):
        run((copy_root, params))
    assert mlflow.search_runs(experiment_names=["mixed"], output_format="list") == []


def test_a_held_lock_ends_with_a_message_not_a_hang(mlflow_server, trained_states, monkeypatch, in_tmp):
    from filelock import FileLock

    from braintumor.errors import RegistryError
    from braintumor.registry import register as registry

    monkeypatch.setattr(registry, "LOCK_TIMEOUT_S", 1)
    run = registering(mlflow_server, monkeypatch, "locked")
    (in_tmp / "mlflow").mkdir(exist_ok=True)
    with FileLock(in_tmp / "mlflow" / "register.lock"):  # another registration of this clone, still running
        with pytest.raises(RegistryError, match="another registration has held this lock for over 1 s"):
            run(trained_states["seed_fsm"])


def test_the_data_fingerprint_counts_the_scored_images_only(tmp_path):
    rows = pd.DataFrame(
        {
            "path": ["a.png", "b.png", "c.png"],
            "label": [1, 0, 1],
            "sha256": ["aa", "bb", "cc"],
            "split": ["train", "test", "val"],
        }
    )
    rows.to_csv(tmp_path / "representatives.csv", index=False)
    with_members = pd.concat([rows.assign(representative=True), rows.iloc[:1].assign(path="a2.png", sha256="a2")])
    with_members.assign(representative=[True, True, True, False]).to_csv(tmp_path / "clusters.csv", index=False)
    relabelled = rows.assign(label=[1, 1, 1])
    relabelled.to_csv(tmp_path / "relabelled.csv", index=False)
    fingerprint = data_fingerprint(tmp_path / "representatives.csv")
    assert data_fingerprint(tmp_path / "clusters.csv") == fingerprint  # the members are trained on, never scored
    assert data_fingerprint(tmp_path / "relabelled.csv") != fingerprint


def fake_run(run_id: str, metrics: dict, start: int = 0):
    """What `decide` reads of an MLflow run."""
    from types import SimpleNamespace

    from braintumor.registry.register import TARGET_RECALL
    from braintumor.registry.tracking import DATA_TAG

    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, start_time=start),
        data=SimpleNamespace(metrics=metrics, tags={DATA_TAG: "same data"}, params={TARGET_RECALL: "0.98"}),
    )


def test_a_candidate_that_finds_fewer_tumors_at_a_site_is_not_promoted_silently():
    from braintumor.registry.register import decide

    figures = {"threshold_selection.out_of_fold.accuracy": 0.9, "recall": 0.95, "accuracy": 0.9}
    champion = fake_run("a", {**figures, "per_site.site-x.recall": 1.0, "per_site.site-x.specificity": 0.8})
    better_overall = {**figures, "recall": 0.97, "per_site.site-x.recall": 0.9, "per_site.site-x.specificity": 0.9}
    promote, why = decide(fake_run("b", better_overall, 1), champion, "keep")
    assert not promote and "site-x (recall 1.000 -> 0.900)" in why
    same_at_site = {**better_overall, "per_site.site-x.recall": 1.0}
    promote, why = decide(fake_run("c", same_at_site, 1), champion, "keep")
    assert promote and "beats" in why
