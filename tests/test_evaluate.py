import json
import shutil

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from braintumor.data.datasets import load_split
from braintumor.model.inference import average_of, tumor_probability
from braintumor.quality.evaluate import binary_metrics, bootstrap_intervals, evaluate, threshold_for_recall
from braintumor.quality.explain import explain, grad_cam, pick_examples

from fixtures.split import LESION_RADIUS, make_split


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
    assert Image.open(in_tmp / "plots/evaluate/misclassified.png").size[0] > 100

    explain(params)
    index = json.loads((in_tmp / "plots/explain/index.json").read_text())
    assert index and all((in_tmp / "plots/explain" / panel["file"]).is_file() for panel in index)
    assert {panel["group"] for panel in index} <= {"correct_tumor", "correct_no_tumor", "misclassified"}


def lesion_detector(size: int) -> keras.Model:
    """A network that looks at nothing but the synthetic lesion: a 5x5 mean brightness above 0.8 (the heads
    stay below 0.6, the lesion is 1.0), pooled into the tumor score. Its true evidence is the lesion alone."""
    inputs = keras.Input((size, size, 3), name="image")
    bright = keras.layers.Conv2D(1, 5, padding="same", activation="relu")
    score = keras.layers.Dense(1, activation="sigmoid")
    x = bright(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, score(keras.layers.GlobalAveragePooling2D()(x)))
    bright.set_weights([np.full((5, 5, 3, 1), 1 / 75, dtype="float32"), np.array([-0.8], dtype="float32")])
    score.set_weights([np.array([[500.0]], dtype="float32"), np.array([-1.0], dtype="float32")])
    return model


def test_grad_cam_peaks_on_the_synthetic_lesion(tmp_path):
    """Grad-CAM of the shipped form (an average of members, each also on the mirrored image) must peak where
    the evidence is: on each synthetic tumor's lesion, whose position is known."""
    split = make_split(tmp_path / "split", counts=(("train", 2), ("val", 2), ("test", 24)))
    test = load_split(split, "test", "binary")
    manifest = pd.read_csv(split / "manifest.csv").set_index("path")
    shipped = average_of([lesion_detector(48), lesion_detector(48)], mirrored=True)
    tumors = np.flatnonzero(test["label"] == 1)
    assert (tumor_probability(shipped, test["x"][tumors], ["no_tumor", "tumor"]) > 0.5).all()
    cams = grad_cam(shipped, test["x"][tumors], ["no_tumor", "tumor"])
    radius = LESION_RADIUS * 48
    for cam, path in zip(cams, test["path"][tumors], strict=True):
        row, col = np.unravel_index(np.argmax(cam), cam.shape)
        lesion_row, lesion_col = manifest.loc[path, ["lesion_row", "lesion_col"]].to_numpy(float)
        assert np.hypot(row - lesion_row, col - lesion_col) <= radius, f"{path}: peak at {(row, col)}"
        far = np.hypot(*np.mgrid[:48, :48] - np.array([lesion_row, lesion_col])[:, None, None]) > 2 * radius
        assert cam[far].max() < 0.1 * cam.max()  # nothing away from the lesion
