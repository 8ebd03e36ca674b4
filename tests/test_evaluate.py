"""The evaluate stage's threshold, metrics and intervals, and the explain stage end to end."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from braintumor.quality.evaluate import binary_metrics, bootstrap_intervals, evaluate, threshold_for_recall
from braintumor.quality.explain import explain, pick_examples


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_is_the_highest_that_reaches_the_target_recall(target):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    t = threshold_for_recall(y, p, target)
    assert (p[y == 1] >= t).mean() >= target
    higher = np.unique(p[p > t])
    if higher.size:  # any higher cut-off misses the target
        assert (p[y == 1] >= higher[0]).mean() < target


def test_binary_metrics_on_a_known_confusion():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1])
    m = binary_metrics(y, p, 0.5)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (3, 1, 5, 1)
    assert m["recall"] == 0.75 and m["specificity"] == pytest.approx(0.8333, abs=1e-4)
    assert m["accuracy"] == 0.8 and m["precision"] == 0.75


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.where(rng.random(300) < 0.85, y, 1 - y).astype(float)
    ci = bootstrap_intervals(y, p, 0.5, 500, seed=0)
    point = binary_metrics(y, p, 0.5)
    for name in ("recall", "specificity", "accuracy", "roc_auc"):
        low, high = ci[name]
        assert low < point[name] < high and high - low < 0.2


def test_pick_examples_groups_by_outcome():
    y = np.array([1, 1, 0, 0, 1, 0])
    p = np.array([0.99, 0.6, 0.1, 0.7, 0.2, 0.3])
    chosen = pick_examples(y, p, 0.5, 1)
    assert chosen["correct_tumor"].tolist() == [0] and chosen["correct_no_tumor"].tolist() == [2]
    assert chosen["misclassified"].tolist() == [4]  # the more confident of the two errors (0.2 vs 0.7)


def test_evaluate_and_explain_stages_end_to_end(trained_states, in_tmp):
    """On a state the shared fixture trained already (no training of its own)."""
    workspace, params = trained_states["seed_cnn"]
    shutil.copytree(workspace / "artifacts", in_tmp / "artifacts")
    result = evaluate(params)

    on_disk = json.loads((in_tmp / "metrics/evaluate.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    for key in ("recall", "accuracy", "specificity", "precision", "f1", "roc_auc", "pr_auc", "brier", "threshold"):
        assert key in on_disk
    selection = on_disk["threshold_selection"]
    assert len(selection["fold_thresholds"]) == 2 and selection["images"] == 96 + 32
    assert on_disk["per_source"]["synthetic"]["tp"] == on_disk["confusion"]["tp"]
    shipped = json.loads((in_tmp / "models/model.json").read_text())
    assert shipped["threshold"] == pytest.approx(on_disk["threshold"], abs=1e-6)
    assert (in_tmp / "models/model.keras").is_file()
    confusion = json.loads((in_tmp / "plots/evaluate/confusion.json").read_text())
    assert len(confusion) == 32 and set(confusion[0]) == {"actual", "predicted"}
    Image.open(in_tmp / "plots/evaluate/misclassified.png").verify()  # a readable PNG

    explain(params)
    index = json.loads((in_tmp / "plots/explain/index.json").read_text())
    assert index and all((in_tmp / "plots/explain" / panel["file"]).is_file() for panel in index)
    assert {panel["group"] for panel in index} <= {"correct_tumor", "correct_no_tumor", "misclassified"}


def test_sites_are_scored_on_their_own_test_scans_and_the_reference_ships_quantiles():
    from braintumor.quality.evaluate import answer_reference, per_site

    originals = ["site-a/tumor/1.png", "site-a/no_tumor/2.png", "site-a/tumor/3.png", "tumor/4.png", "yes/Y5.jpg"]
    manifest = pd.DataFrame(
        {
            "path": [f"p{k}" for k in range(5)],
            "source": ["local", "local", "local", "local", "kaggle2018"],
            "original": originals,
        }
    )
    y, p = np.array([1, 0, 1, 1, 1]), np.array([0.9, 0.2, 0.3, 0.8, 0.7])
    sites = per_site(manifest, np.array(manifest.path), y, p, 0.5)
    assert list(sites) == ["site-a"]  # the plain class folders and other sources are no site
    assert sites["site-a"]["images"] == 3 and sites["site-a"]["recall"] == 0.5 and sites["site-a"]["specificity"] == 1
    answers = [{"status": "read", "probability": q, "gate_distance": q / 2} for q in np.linspace(0, 1, 99)]
    reference = answer_reference(answers + [{"status": "out_of_distribution", "gate_distance": 3.0}])
    assert reference["images"] == 100 and reference["refused"] == 0.01
    assert len(reference["p_tumor_quantiles"]) == 101 and reference["p_tumor_quantiles"][50] == 0.5
    assert reference["gate_distance_quantiles"][-1] == 0.5  # of the scans read only
