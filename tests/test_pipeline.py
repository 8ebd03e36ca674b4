"""End to end: `dvc repro` of the whole pipeline on a small subset of the real Kaggle mirror (tiny model)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import yaml
from mlflow import MlflowClient

from braintumor.serve.access import add_key

from conftest import KAGGLE2018, KAGGLE2020, REPO, SHARED_KAGGLE, kaggle_cache, real_subset
from fixtures.browser import chromium_page
from fixtures.servers import BIN, free_port, serving, tool_env

pytestmark = pytest.mark.real_data


def dvc(repo, *args):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlflow_server):
    subset = real_subset(per_folder=12)
    root = tmp_path_factory.mktemp("pipeline")
    cache = root / "kagglehub"
    for handle in (KAGGLE2018, KAGGLE2020):
        kaggle_cache(cache, handle, subset[handle])
    repo = root / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, repo / name)
    for name in ("stages", "src", "labels"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "data").mkdir()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["image_size"] = 48
    params["train"].update(model="seed_fsm", epochs=2)
    params["train"]["folds"] = 2
    params["evaluate"].update(bootstrap=100)
    params["explain"].update(images=1, lime_samples=20)
    params["register"].update(
        experiment="pipeline",
        model_name="pipeline-model",
        min_recall=0.0,
        min_accuracy=0.0,
        min_specificity=0.0,
        champion_on_new_data="replace",
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "add", "data")  # tracked, as in the project (data.dvc): queued experiments' copies get it too
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "pipeline"], cwd=repo, check=True)
    os.environ.update(KAGGLEHUB_CACHE=str(cache), MLFLOW_TRACKING_URI=mlflow_server)
    yield repo
    os.environ.pop("KAGGLEHUB_CACHE")
    os.environ.pop("MLFLOW_TRACKING_URI")


def ran(output):
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_repro_runs_all_stages_then_nothing_then_only_what_a_param_touches(repo):
    stages = ran(dvc(repo, "repro"))
    assert stages[:5] == ["fetch", "dedup", "split", "train", "evaluate"] and stages[-1] == "register"
    assert sorted(stages[5:7]) == ["explain", "review"]  # both follow evaluate

    fetched = json.loads((repo / "metrics/fetch.json").read_text())
    for name, folders in (("kaggle2018", 4), ("kaggle2020", 8)):  # every file kept or listed with its reason
        counts = fetched["per_source"][name]
        assert counts["images"] + sum(counts["skipped"].values()) == 12 * folders
        assert set(counts["skipped"]) <= {"not_brain_mr", "excluded_by_review"}
    # the first twelve of Testing/no_tumor hold head CT (image(1).jpg, image(103).jpg, ...): left out as not MR
    assert fetched["per_source"]["kaggle2020"]["skipped"]["not_brain_mr"] >= 1
    dedup = json.loads((repo / "metrics/dedup.json").read_text())
    # the 2018 archive ships every image twice: at least one exact duplicate per pair
    assert dedup["exact_duplicates"] >= 24
    assert (
        dedup["images_in"]
        == dedup["images_out"]
        + dedup["exact_duplicates"]
        + dedup["near_duplicates"]
        + dedup["label_conflicts"]
        + dedup["unreadable"]
    )
    split = json.loads((repo / "metrics/split.json").read_text())
    assert split["leakage"] == {"val_in_train": 0, "test_in_train": 0}
    manifest = pd.read_csv(repo / "artifacts/split/manifest.csv", keep_default_na=False)
    assert {"path", "label", "subtype", "source", "group", "split"} <= set(manifest.columns)
    assert all((repo / path).is_file() for path in manifest.path)
    assert set(manifest.split) == {"train", "val", "test"} and set(manifest.label) == {0, 1}
    assert (manifest.groupby("group")["split"].nunique() == 1).all()
    assert len(manifest) == dedup["images_out"] == split["images"]
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluated["test_images"] == split["per_split"]["test"]["images"]
    review = json.loads((repo / "metrics/review.json").read_text())  # every scored image ranked, none relabelled
    assert review["flagged"]["test"]["images"] == evaluated["test_images"]
    assert review["flagged"]["train_val"]["images"] == split["images"] - evaluated["test_images"]
    # metrics round the threshold to 6 digits; the model keeps it whole
    assert json.loads((repo / "models/model.json").read_text())["threshold"] == pytest.approx(
        evaluated["threshold"], abs=1e-6
    )

    assert ran(dvc(repo, "repro")) == []

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dedup"]["phash_max_distance"] -= 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(dvc(repo, "repro"))[:2] == ["dedup", "split"]  # then train... only if the split changed

    params["train"]["learning_rate"] /= 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = ran(dvc(repo, "repro"))
    assert stages[:2] == ["train", "evaluate"] and sorted(stages[2:4]) == ["explain", "review"]
    assert stages[4:] == ["register"]


def test_exp_run_of_two_variants_leaves_the_better_as_champion(repo):
    for model in ("seed_fsm", "seed_cnn"):
        dvc(repo, "exp", "run", "-S", f"train.model={model}")
    decision = json.loads((repo / "metrics/register.json").read_text())
    runs = mlflow.search_runs(
        experiment_names=["pipeline"],
        output_format="list",
        filter_string=f"tags.`braintumor.data_fingerprint` = '{decision['data_fingerprint']}'",
    )
    assert {run.data.tags["model"] for run in runs} == {"seed_fsm", "seed_cnn"}
    assert all(run.data.tags["dvc_experiment"] for run in runs if run.data.tags["model"] == "seed_cnn")
    ranked = ("threshold_selection.out_of_fold.accuracy", "recall", "accuracy")  # the selection rule's order
    best = max(runs, key=lambda run: tuple(run.data.metrics[key] for key in ranked))
    champion = MlflowClient().get_model_version_by_alias("pipeline-model", "champion")
    metrics = MlflowClient().get_run(champion.run_id).data.metrics
    assert tuple(metrics[key] for key in ranked) == tuple(best.data.metrics[key] for key in ranked)
    assert decision["champion"]["run_id"] == champion.run_id
    assert decision["champion"]["data_fingerprint"] == decision["data_fingerprint"]


def test_compare_gives_paired_intervals_of_two_experiments(repo):
    """After the two experiments of the test above: `braintumor compare` reads both through dvc.api."""
    names = dvc(repo, "exp", "list", "--name-only").split()
    assert len(names) >= 2
    braintumor = [os.path.join(os.path.dirname(sys.executable), "braintumor"), "compare"]
    result = subprocess.run(
        braintumor + [names[0], names[1], "--json", "--resamples", "200"], cwd=repo, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    compared = json.loads(result.stdout)
    test_images = json.loads((repo / "metrics/split.json").read_text())["per_split"]["test"]["images"]
    assert compared["test"]["images"] == test_images
    for where in ("test", "out_of_fold"):
        for metric in ("recall", "specificity", "roc_auc"):
            m = compared[where][metric]
            assert m["difference"] == pytest.approx(m["b"] - m["a"], abs=2e-4)
            assert m["ci95"][0] <= m["ci95"][1]
    itself = subprocess.run(
        braintumor + [names[0], names[0], "--json", "--resamples", "50"], cwd=repo, capture_output=True, text=True
    )
    assert json.loads(itself.stdout)["test"]["roc_auc"]["ci95"] == [0, 0]
    table = subprocess.run(braintumor + [names[0], "workspace"], cwd=repo, capture_output=True, text=True)
    assert table.returncode == 0 and "| test (" in table.stdout
    missing = subprocess.run(braintumor + [names[0], "no-such-exp"], cwd=repo, capture_output=True, text=True)
    assert missing.returncode == 2 and "no-such-exp" in missing.stderr


def test_two_queue_workers_register_into_one_server_and_the_better_run_is_champion(repo):
    """`dvc queue start --jobs 2`: two experiments run and register at once into the shared tracking server."""
    for rate in ("0.003", "0.0003"):
        dvc(
            repo,
            "exp",
            "run",
            "--queue",
            "-S",
            f"train.learning_rate={rate}",
            "-S",
            "register.experiment=queue",
            "-S",
            "register.model_name=queue-model",
        )
    dvc(repo, "queue", "start", "--jobs", "2")
    deadline = time.monotonic() + 900
    while re.search(r"\b(Running|Queued)\b", dvc(repo, "queue", "status")):
        assert time.monotonic() < deadline, dvc(repo, "queue", "status")
        time.sleep(5)
    assert dvc(repo, "queue", "status").count("Success") >= 2, dvc(repo, "queue", "status")
    runs = mlflow.search_runs(experiment_names=["queue"], output_format="list")
    assert len({run.data.params["train.learning_rate"] for run in runs}) == 2
    ranked = ("threshold_selection.out_of_fold.accuracy", "recall", "accuracy")
    best = max(runs, key=lambda run: tuple(run.data.metrics[key] for key in ranked))
    champion = MlflowClient().get_model_version_by_alias("queue-model", "champion")
    metrics = MlflowClient().get_run(champion.run_id).data.metrics  # (a tie may keep either of two equals)
    assert tuple(metrics[key] for key in ranked) == tuple(best.data.metrics[key] for key in ranked)


def site_scans(per_folder: int) -> dict[Path, str]:
    """Real scans the pipeline has not taken (Kaggle 2020 `Testing/`, after the first 12 files of each class
    folder that `repo` takes), each with the verdict its reader gives: its folder's class."""
    root = SHARED_KAGGLE / "datasets" / KAGGLE2020
    scans = {}
    for folder in sorted(p for p in root.rglob("Testing/*") if p.is_dir()):
        for path in sorted(folder.iterdir())[12 : 12 + per_folder]:
            scans[path] = "no_tumor" if folder.name == "no_tumor" else "tumor"
    return scans


def braintumor(repo: Path, *args: str) -> str:
    result = subprocess.run([str(BIN / "braintumor"), *args], cwd=repo, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_readers_verdicts_on_the_page_become_a_site_the_models_update_and_the_champion_the_page_reloads(
    repo, mlflow_server, tmp_path
):
    """Issue 43's loop, whole: verdicts given on the page in Chromium, `feedback export`, a reviewer's
    `feedback accept`, `dvc add data` and `dvc repro` (the small site joins by an update of the fold models, and
    moves no image already placed), a new champion, and the page answering with it."""
    dvc(repo, "repro")  # a champion to serve (up to date after the tests above; the whole pipeline alone)
    placed = pd.read_csv(repo / "artifacts/split/manifest.csv").set_index("path").split
    client = MlflowClient()
    before = client.get_model_version_by_alias("pipeline-model", "champion").version
    scans = {}  # named as a careless upload would be: a patient's name in each file name
    for k, (path, verdict) in enumerate(site_scans(per_folder=5).items()):
        scans[shutil.copyfile(path, tmp_path / f"DOE_JANE_{k:02d}{path.suffix}")] = verdict
    keys, kept, port = tmp_path / "keys.json", tmp_path / "kept", free_port()
    key = add_key(keys, "ward-3", ["predict", "feedback"])
    url = f"http://127.0.0.1:{port}"
    args = [str(BIN / "braintumor"), "serve", "--model", "models:/pipeline-model@champion", "--poll-seconds", "1"]
    args += ["--port", str(port), "--keys", str(keys), "--audit-log", str(tmp_path / "audit.jsonl")]
    args += ["--keep-feedback-scans", str(kept), "--rate-limit", "100000", "--burst", "1000"]
    with serving(args, f"{url}/readyz", tmp_path / "serve.log"), chromium_page() as page:
        page.goto(url + "/")
        page.fill("#key-input", key)
        page.click("#key button")
        page.wait_for_selector(f"#model:has-text('version {before}')")
        assert "keeps the pixels" in page.locator("#verdict-keeps").inner_text()  # the reader is told
        page.set_input_files("#files", [str(path) for path in scans])
        page.wait_for_selector("#status:has-text('scans read')", timeout=120_000)
        rows = page.locator("#queue tbody tr[data-filename]")
        given = {}
        for k in range(rows.count()):  # the reader's verdict on each scan read, from the keyboard
            name = rows.nth(k).get_attribute("data-filename")
            given[name] = scans[tmp_path / name]
            rows.nth(k).click()
            page.keyboard.press("t" if given[name] == "tumor" else "n")
            page.wait_for_selector(f"#queue tbody tr[data-filename='{name}'][data-verdict='{given[name]}']")
        assert set(given.values()) == {"tumor", "no_tumor"}, given  # the gate reads scans of both classes

        feedback = ["--feedback-db", f"sqlite:///{tmp_path / 'feedback.db'}", "--kept", str(kept)]
        exported = braintumor(repo, "feedback", "export", *feedback)
        known = set(pd.read_csv(repo / "artifacts/fetch/manifest.csv").sha256)  # a copy of a scan in the data
        new = {n: v for n, v in given.items() if hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() not in known}
        assert f"{len(given)} scans with verdicts: {len(new)} to add, 0 to relabel" in exported
        assert not (repo / "data/site-ward-3").exists()  # nothing reaches the data before a reviewer accepts
        braintumor(repo, "feedback", "accept", "--all", "--reviewer", "Reviewer A", *feedback)
        added = {c: len(list((repo / "data/site-ward-3" / c).iterdir())) for c in ("tumor", "no_tumor")}
        assert added == {c: list(new.values()).count(c) for c in ("tumor", "no_tumor")}
        decisions = pd.read_csv(repo / "labels/feedback_decisions.csv")
        assert len(decisions) == len(new) and set(decisions.reviewer) == {"Reviewer A"}
        assert set(decisions.decision) == {"accepted"} and set(decisions.site) == {"ward-3"}
        written = list((repo / "data").rglob("*")) + list((repo / "labels").iterdir())
        assert not [p for p in written if "DOE" in p.name or (p.is_file() and b"DOE_JANE" in p.read_bytes())]

        dvc(repo, "add", "data")
        stages = ran(dvc(repo, "repro"))
        assert stages[0] == "fetch" and stages[-1] == "register"
        fetched = pd.read_csv(repo / "artifacts/fetch/manifest.csv", keep_default_na=False)
        site_rows = fetched[fetched.original.str.startswith("site-ward-3/")]
        assert len(site_rows) == len(new)  # every accepted scan taken, in its site's folder
        assert sorted(site_rows.label) == sorted(int(v == "tumor") for v in new.values())
        split = pd.read_csv(repo / "artifacts/split/manifest.csv", keep_default_na=False)
        in_site = split.original.str.startswith("site-ward-3/")
        assert split.set_index("path").split.reindex(placed.index).equals(placed)  # the site moved no image
        tested = split[(split.split == "test") & in_site]
        learnt = int((in_site & (split.split != "test")).sum())  # (dedup keeps one image a cluster)
        trained = json.loads((repo / "metrics/train.json").read_text())
        assert trained["sites"] == {"site-ward-3": {"scans": learnt, "way": "update"}} and learnt > 0
        assert all(member["update_images"] > member["images"] for member in trained["members"])
        evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
        assert set(evaluated["per_site"]) == ({"site-ward-3"} if len(tested) else set())
        decision = json.loads((repo / "metrics/register.json").read_text())
        after = client.get_model_version_by_alias("pipeline-model", "champion").version
        assert int(after) > int(before), decision
        assert decision["champion"]["run_id"] == client.get_model_version("pipeline-model", after).run_id

        deadline = time.monotonic() + 60  # the server looks at the alias every second and loads what it names
        while (
            requests.get(f"{url}/v1/model", headers={"X-API-Key": key}, timeout=10).json()["model"]["version"] != after
        ):
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(1)
        page.reload()
        page.wait_for_selector(f"#model:has-text('version {after}')")
        page.set_input_files("#files", [str(tmp_path / next(iter(given)))])  # a scan read again: by the new model
        page.wait_for_selector("#status:has-text('scans read')", timeout=60_000)
        page.locator("#queue tbody tr[data-filename]").first.click()
        assert f"(model version {after};" in page.locator("#detail-reading").inner_text()
