"""The `register` stage: record this pipeline state in MLflow and keep the registry's `champion` the best model.

Selection rule (params `register.*`): among the MLflow runs on the same data fingerprint (same deduplicated
images, labels and split) whose test accuracy and specificity clear the floors, the candidate has the highest
test recall at its threshold, then the highest accuracy (then the earliest run). The candidate is registered
under `register.model_name` with the model card as its description, and the alias `champion` moves to it only
when it beats the current champion on the same data. A champion evaluated on other data is not comparable:
`register.champion_on_new_data` says whether the candidate then replaces it or the champion stays.

It is a DVC stage so that every `dvc repro` and `dvc exp run` records its run and updates the registry, and
`metrics/register.json` (the decision) is versioned with each experiment. The decision runs under a file
lock next to the local store, so concurrent registrations (queued experiments) do not interleave; with a
shared tracking server, the server's database serialises the individual registry writes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from filelock import FileLock

from braintumor.atomic import write_json
from braintumor.model_card import model_card
from braintumor.params import validate_register
from braintumor.tracking import (CARD_FILE, DATA_TAG, MODEL_URI_TAG, configure, data_fingerprint, log_run,
                                 project_root)

log = logging.getLogger(__name__)

CHAMPION = "champion"
COMPARED = ("recall", "accuracy")  # in order of importance


def eligible_runs(experiment: str, fingerprint: str, min_accuracy: float, min_specificity: float) -> list:
    """Runs on `fingerprint` with a logged model that clear both floors, best first by the selection rule."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=[experiment], output_format="list",
        filter_string=f"tags.`{DATA_TAG}` = '{fingerprint}' and metrics.accuracy >= {min_accuracy} "
                      f"and metrics.specificity >= {min_specificity}",
    )
    runs = [run for run in runs if MODEL_URI_TAG in run.data.tags]
    return sorted(runs, key=lambda run: (*(-run.data.metrics[m] for m in COMPARED), run.info.start_time))


def summary(run, version=None) -> dict:
    metrics = run.data.metrics
    return {"run_id": run.info.run_id, "version": int(version.version) if version else None,
            "model": run.data.tags.get("model"), "data_fingerprint": run.data.tags.get(DATA_TAG),
            **{m: metrics.get(m) for m in (*COMPARED, "specificity", "roc_auc")}}


def registered_version(client, name: str, run):
    """The model version registered from `run`, registering it (with its model card) when there is none."""
    import mlflow

    found = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if found:
        return found[0]
    version = mlflow.register_model(run.data.tags[MODEL_URI_TAG], name,
                                    tags={"data_fingerprint": run.data.tags.get(DATA_TAG, "")})
    card = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{CARD_FILE}")
    client.update_model_version(name, version.version, description=card)
    log.info("register: %s version %s from run %s", name, version.version, run.info.run_id)
    return version


def current_champion(client, name: str):
    """(version, run) holding the `champion` alias, or (None, None)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
        return version, client.get_run(version.run_id)
    except MlflowException:
        return None, None


def decide(candidate, champion, champion_on_new_data: str) -> tuple[bool, str]:
    """(move the alias?, why) for a candidate run against the current champion run."""
    if champion is None:
        return True, "no champion yet"
    if champion.info.run_id == candidate.info.run_id:
        return False, "the candidate already is the champion"
    if champion.data.tags.get(DATA_TAG) != candidate.data.tags.get(DATA_TAG):
        if champion_on_new_data == "replace":
            return True, "the champion was evaluated on other data; register.champion_on_new_data is replace"
        return False, ("the champion was evaluated on other data, so the two do not compare; "
                       "set register.champion_on_new_data: replace to let the candidate take over")
    ours = tuple(candidate.data.metrics[m] for m in COMPARED)
    theirs = tuple(champion.data.metrics.get(m, float("-inf")) for m in COMPARED)
    if ours > theirs:
        return True, f"candidate {dict(zip(COMPARED, ours))} beats champion {dict(zip(COMPARED, theirs))}"
    return False, f"champion {dict(zip(COMPARED, theirs))} is at least as good as {dict(zip(COMPARED, ours))}"


def register(params: dict, model_dir: str | Path = "models", split_dir: str | Path = "artifacts/split",
             metrics_dir: str | Path = "metrics", plots_dir: str | Path = "plots",
             decision_path: str | Path = "metrics/register.json") -> dict:
    """Run the register stage (see the module docstring); returns the decision written to `decision_path`."""
    from mlflow import MlflowClient

    config = validate_register(params)
    model_dir, split_dir, metrics_dir = Path(model_dir), Path(split_dir), Path(metrics_dir)
    name = config["model_name"]
    uri = configure(config["experiment"])
    lock = project_root() / "mlflow" / "register.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock):
        fingerprint = data_fingerprint(split_dir / "manifest.csv")
        card = model_card(model_dir, metrics_dir, fingerprint)
        run = log_run(params, config["experiment"], fingerprint, card, model_dir, split_dir, metrics_dir,
                      Path(plots_dir))
        client = MlflowClient()
        before_version, before_run = current_champion(client, name)
        decision = {
            "tracking_uri": re.sub(r"//[^/@]*@", "//", uri), "model_name": name, "data_fingerprint": fingerprint,
            "run_id": run["run_id"], "run_logged": int(run["new"]), "compared": list(COMPARED),
            "floors": {"accuracy": config["min_accuracy"], "specificity": config["min_specificity"]},
            "champion_before": summary(before_run, before_version) if before_run else None,
        }
        ranked = eligible_runs(config["experiment"], fingerprint, config["min_accuracy"], config["min_specificity"])
        if not ranked:
            decision.update(candidate=None, promoted=0, champion=decision["champion_before"],
                            outcome="no run on this data clears the floors; nothing registered")
        else:
            best = ranked[0]
            version = registered_version(client, name, best)
            promote, why = decide(best, before_run, config["champion_on_new_data"])
            if promote:
                client.set_registered_model_alias(name, CHAMPION, version.version)
            after_version, after_run = current_champion(client, name)
            decision.update(candidate=summary(best, version), promoted=int(promote),
                            champion=summary(after_run, after_version) if after_run else None,
                            outcome=("promoted: " if promote else "kept: ") + why)
    decision["champion_version"] = (decision["champion"] or {}).get("version")
    write_json(decision_path, decision)
    log.info("register: %s (champion: version %s)", decision["outcome"], decision["champion_version"])
    return decision
