"""The `register` stage: record this pipeline state in MLflow and keep the registry's `champion` the best model.

Selection rule (params `register.*`): among the MLflow runs on the same data fingerprint (same deduplicated
images, labels and split) and the same `evaluate.target_recall`, whose test recall, accuracy and specificity clear
the floors, the candidate has the highest out-of-fold accuracy at the target recall, then the highest test recall,
then test accuracy (then what its model carries, then the latest run). Every run's threshold puts its out-of-fold
recall at the target, so out-of-fold accuracy says how many healthy scans it clears at that recall, measured on
all ~2000 train+val images. Ranking on the ~220 test images instead let one scan decide (one tumor is 0.5 points
of test recall) and made the test split part of model selection; it stays the unbiased report, and a floor. The
candidate is registered under `register.model_name` with the model card as its description, and the alias
`champion` moves to it only when it ranks above the current champion. A champion evaluated on other data or at
another target recall is not comparable: `register.champion_on_new_data` says whether the candidate then replaces
it or the champion stays.

It is a DVC stage so that every `dvc repro` and `dvc exp run` records its run and updates the registry, and
`metrics/register.json` (the decision) is versioned with each experiment. The decision runs under a file
lock next to the local store, so concurrent registrations of one clone (queued experiments) do not interleave;
registrations from several clones or hosts into one shared tracking server re-read the alias around its move
(`move_champion`). Only a finished run that recorded its model is reused, so a killed registration never
blocks a later one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from filelock import FileLock, Timeout

from braintumor import paths
from braintumor.atomic import write_json
from braintumor.errors import RegistryError
from braintumor.params import validate_register
from braintumor.registry.model_card import model_card
from braintumor.registry.pull import project_root, redact
from braintumor.registry.tracking import (
    CARD_FILE,
    DATA_TAG,
    MODEL_URI_TAG,
    TRUST_TAG,
    configure,
    data_fingerprint,
    log_run,
)

log = logging.getLogger(__name__)

CHAMPION = "champion"
LOCK_TIMEOUT_S = 600  # registrations into the embedded store take about a minute
MOVE_ATTEMPTS = 10
# The ranking, most important first: MLflow metric keys (flattened metrics/evaluate.json) and their short names.
COMPARED = {
    "threshold_selection.out_of_fold.accuracy": "out_of_fold_accuracy",
    "recall": "recall",
    "accuracy": "accuracy",
}
TARGET_RECALL = "evaluate.target_recall"  # the param the out-of-fold accuracy depends on


def ranking(run) -> tuple[float, ...]:
    return tuple(run.data.metrics.get(key, float("-inf")) for key in COMPARED)


def carried(run) -> set[str]:
    """What the run's model carries beside the network (calibration, gate, onnx: `tracking.CARRIED`)."""
    return set(filter(None, run.data.tags.get(TRUST_TAG, "").split("+")))


CARRIED_TEXT = {"calibration": "calibration", "gate": "the gate", "onnx": "an ONNX export"}


def eligible_runs(experiment: str, fingerprint: str, target_recall: float, floors: dict[str, float]) -> list:
    """Runs on `fingerprint` at `target_recall` with a logged model that clear the floors ({metric: floor}),
    best first by the selection rule."""
    import mlflow

    clears = " and ".join(f"metrics.{metric} >= {floor}" for metric, floor in floors.items())
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        output_format="list",
        filter_string=f"tags.`{DATA_TAG}` = '{fingerprint}' and params.`{TARGET_RECALL}` = '{target_recall}' "
        f"and {clears}",
    )
    runs = [run for run in runs if MODEL_URI_TAG in run.data.tags]
    # level runs: the one whose model carries most (calibration, the gate, an ONNX export) first, then the latest:
    # level in everything, a later model is the same figures from newer code (a faster export, a stabler archive)
    return sorted(runs, key=lambda run: (*(-value for value in ranking(run)), -len(carried(run)), -run.info.start_time))


def summary(run, version=None) -> dict:
    metrics = run.data.metrics
    return {
        "run_id": run.info.run_id,
        "version": int(version.version) if version else None,
        "model": run.data.tags.get("model"),
        "data_fingerprint": run.data.tags.get(DATA_TAG),
        "target_recall": float(run.data.params.get(TARGET_RECALL, "nan")),
        **{short: metrics.get(key) for key, short in COMPARED.items()},
        **{m: metrics.get(m) for m in ("specificity", "roc_auc")},
    }


def registered_version(client, name: str, run):
    """The model version registered from `run`, registering it (with its model card) when there is none."""
    import mlflow

    found = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if found:
        return found[0]
    version = mlflow.register_model(
        run.data.tags[MODEL_URI_TAG], name, tags={"data_fingerprint": run.data.tags.get(DATA_TAG, "")}
    )
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
        other = "on other data"
    elif champion.data.params.get(TARGET_RECALL) != candidate.data.params.get(TARGET_RECALL):
        other = f"at target recall {champion.data.params.get(TARGET_RECALL)}"
    else:
        other = None
    if other:
        if champion_on_new_data == "replace":
            return True, f"the champion was evaluated {other}; register.champion_on_new_data is replace"
        return False, (
            f"the champion was evaluated {other}, so the two do not compare; "
            "set register.champion_on_new_data: replace to let the candidate take over"
        )
    lost = lost_sites(candidate, champion)
    if lost:
        return False, (
            f"the candidate finds fewer tumors than the champion at {'; '.join(lost)} (same test images); a site "
            "the champion serves is not given up silently: move the alias by hand if that is intended"
        )
    ours, theirs = (dict(zip(COMPARED.values(), ranking(run), strict=True)) for run in (candidate, champion))
    if ranking(candidate) > ranking(champion):
        return True, f"candidate {ours} beats champion {theirs}"
    if ranking(candidate) == ranking(champion) and carried(candidate) > carried(champion):
        added = " and ".join(CARRIED_TEXT[k] for k in CARRIED_TEXT if k in carried(candidate) - carried(champion))
        return True, f"candidate {ours} ranks level with the champion and adds {added}"
    if (
        ranking(candidate) == ranking(champion)
        and carried(candidate) == carried(champion)
        and candidate.info.start_time > champion.info.start_time
    ):
        return True, f"candidate {ours} is level with the champion in figures and contents, and newer"
    return False, f"champion {theirs} is at least as good as {ours}"


def site_figures(run) -> dict[str, dict[str, float]]:
    """{site: {recall, specificity}} from a run's `per_site.<site>.<metric>` metrics (evaluate's per-site
    figures, logged by `tracking.log_run`)."""
    figures: dict[str, dict[str, float]] = {}
    for key, value in run.data.metrics.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "per_site" and parts[2] in ("recall", "specificity"):
            figures.setdefault(parts[1], {})[parts[2]] = value
    return figures


def lost_sites(candidate, champion) -> list[str]:
    """The sites of the champion where the candidate's recall is lower (on the same data, the same scans)."""
    ours, theirs = site_figures(candidate), site_figures(champion)
    return [
        f"{site} (recall {theirs[site]['recall']:.3f} -> {ours[site]['recall']:.3f})"
        for site in sorted(set(ours) & set(theirs))
        if "recall" in ours[site] and "recall" in theirs[site] and ours[site]["recall"] < theirs[site]["recall"]
    ]


def number(version) -> int | None:
    return int(version.version) if version is not None else None


def move_champion(client, name: str, candidate, version, champion_on_new_data: str) -> tuple[bool, str]:
    """Point `champion` at `version` (of run `candidate`) if it beats the current champion; (moved?, why).

    Registrations from other clones or hosts share the tracking server but not the file lock, so the alias can
    move between our read and our write. It is read again right before the write, and after it: whenever it
    moved meanwhile, the decision is taken again against the new champion. Each registration thus ends having
    compared itself with the champion it leaves, and a slower one cannot put back a worse model.

    Args:
        client: an MlflowClient on the tracking server.
        name: the registered model's name.
        candidate: the best eligible run (the one just ranked first).
        version: its model version.
        champion_on_new_data: keep | replace (see params.yaml).
    """
    for _ in range(MOVE_ATTEMPTS):
        seen_version, seen_run = current_champion(client, name)
        promote, why = decide(candidate, seen_run, champion_on_new_data)
        if not promote:
            return False, why
        if number(current_champion(client, name)[0]) != number(seen_version):
            continue  # moved while we decided
        client.set_registered_model_alias(name, CHAMPION, version.version)
        if number(current_champion(client, name)[0]) == number(version):
            return True, why
    raise RegistryError(
        f"the `{CHAMPION}` alias of {name} moved {MOVE_ATTEMPTS} times while this registration "
        "decided; other registrations are racing it. Run `dvc repro register` again."
    )


def register(
    params: dict,
    model_dir: str | Path = paths.MODEL_DIR,
    split_dir: str | Path = paths.SPLIT_DIR,
    metrics_dir: str | Path = paths.METRICS_DIR,
    plots_dir: str | Path = paths.PLOTS_DIR,
    decision_path: str | Path = paths.STAGE_METRICS["register"],
) -> dict:
    """Run the register stage (see the module docstring); returns the decision written to `decision_path`.

    Args:
        params: the whole params.yaml.
        model_dir: the deployable model (evaluate's output).
        split_dir: the split stage's output (its data fingerprint).
        metrics_dir: the stages' metrics, logged with the run.
        plots_dir: the stages' plots, logged with the run.
        decision_path: where the decision JSON goes.
    """
    config = validate_register(params)
    model_dir, split_dir, metrics_dir = Path(model_dir), Path(split_dir), Path(metrics_dir)
    uri = configure(config["experiment"])
    lock = project_root() / "mlflow" / "register.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(lock, timeout=LOCK_TIMEOUT_S):
            decision = record_and_decide(params, config, uri, model_dir, split_dir, metrics_dir, Path(plots_dir))
    except Timeout as err:
        raise RegistryError(
            f"{lock}: another registration has held this lock for over {LOCK_TIMEOUT_S} s. If "
            "none is running (a killed one leaves the file but not the lock), run again; "
            "otherwise wait for it to finish"
        ) from err
    decision["champion_version"] = (decision["champion"] or {}).get("version")
    write_json(decision_path, decision)
    log.info("register: %s (champion: version %s)", decision["outcome"], decision["champion_version"])
    return decision


def record_and_decide(
    params: dict, config: dict, uri: str, model_dir: Path, split_dir: Path, metrics_dir: Path, plots_dir: Path
) -> dict:
    """Log this state as a run, register the best eligible run and move the champion to it if it ranks higher.

    Args:
        params: the whole params.yaml.
        config: its register section.
        uri: the tracking URI.
        model_dir: the deployable model.
        split_dir: the split stage's output.
        metrics_dir: the stages' metrics.
        plots_dir: the stages' plots.
    """
    from mlflow import MlflowClient

    name, target_recall = config["model_name"], params["evaluate"]["target_recall"]
    floors = {metric: config[f"min_{metric}"] for metric in ("recall", "accuracy", "specificity")}
    fingerprint = data_fingerprint(split_dir / "manifest.csv")
    card = model_card(model_dir, metrics_dir, fingerprint)
    run = log_run(params, config["experiment"], fingerprint, card, model_dir, split_dir, metrics_dir, plots_dir)
    client = MlflowClient()
    before_version, before_run = current_champion(client, name)
    decision = {
        "tracking_uri": redact(uri),
        "model_name": name,
        "data_fingerprint": fingerprint,
        "run_id": run["run_id"],
        "run_logged": int(run["new"]),
        "compared": list(COMPARED.values()),
        "target_recall": target_recall,
        "floors": floors,
        "champion_before": summary(before_run, before_version) if before_run else None,
    }
    ranked = eligible_runs(config["experiment"], fingerprint, target_recall, floors)
    if not ranked:
        decision.update(
            candidate=None,
            promoted=0,
            champion=decision["champion_before"],
            outcome="no run on this data and target recall clears the floors; nothing registered",
        )
    else:
        best = ranked[0]
        version = registered_version(client, name, best)
        promote, why = move_champion(client, name, best, version, config["champion_on_new_data"])
        after_version, after_run = current_champion(client, name)
        decision.update(
            candidate=summary(best, version),
            promoted=int(promote),
            champion=summary(after_run, after_version) if after_run else None,
            outcome=("promoted: " if promote else "kept: ") + why,
        )
    return decision
