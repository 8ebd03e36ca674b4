"""`braintumor compare`: the paired bootstrap of two models' differences on the same images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from braintumor.errors import CompareError
from braintumor.quality.compare import held_out_differences, paired_difference


def scored(seed: int, noise: float, n: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(0)  # the same images and labels for every model
    label = (rng.random(n) < 0.8).astype(int)
    own = np.random.default_rng(seed)
    probability = np.clip(label * 0.6 + 0.2 + own.normal(0, noise, n), 0, 1)
    return pd.DataFrame({"path": [f"img{k}.png" for k in range(n)], "label": label, "probability": probability})


def test_a_model_against_itself_differs_by_nothing():
    a = scored(1, 0.2)
    result = paired_difference(a, a.sample(frac=1, random_state=0), 0.5, 0.5, 300, 0, "test")  # any row order
    for name in ("recall", "specificity", "roc_auc"):
        assert result[name]["difference"] == 0 and result[name]["ci95"] == [0, 0]
    assert result["images"] == 300 and result["healthy"] == (a.label == 0).sum()


def test_a_clearly_better_model_has_an_interval_above_zero_and_a_jittered_copy_does_not():
    noisy, clean = scored(1, 0.35), scored(2, 0.05)
    better = paired_difference(noisy, clean, 0.5, 0.5, 200, 0, "test")
    assert better["roc_auc"]["difference"] > 0 and better["roc_auc"]["ci95"][0] > 0
    assert better["specificity"]["ci95"][0] > 0
    jitter = np.random.default_rng(9).normal(0, 0.02, len(noisy))
    jittered = noisy.assign(probability=np.clip(noisy.probability + jitter, 0, 1))  # the same model, retrained
    same = paired_difference(noisy, jittered, 0.5, 0.5, 200, 0, "test")
    for name in ("recall", "specificity", "roc_auc"):
        assert same[name]["ci95"][0] <= 0 <= same[name]["ci95"][1], name


def test_other_images_cannot_be_compared():
    a = scored(1, 0.2)
    with pytest.raises(CompareError, match="other images or labels"):
        paired_difference(a, a.iloc[:-1], 0.5, 0.5, 10, 0, "test")
    relabelled = a.assign(label=1 - a.label)
    with pytest.raises(CompareError, match="out_of_fold: the two revisions"):
        paired_difference(a, relabelled, 0.5, 0.5, 10, 0, "out_of_fold")


def held_out_scores(hold_out: str, seed: int, noise: float, threshold: float, n: int = 200) -> pd.DataFrame:
    frame = scored(seed, noise, n).rename(columns={"probability": "p_tumor"})
    return frame.assign(hold_out=hold_out, path=hold_out + "/" + frame.path, threshold=threshold)


def test_held_out_collections_compare_where_both_revisions_held_them_out_each_at_its_own_threshold():
    a = pd.concat([held_out_scores("kaggle2018", 1, 0.35, 0.5), held_out_scores("kaggle2020_testing", 1, 0.2, 0.5)])
    b = pd.concat([held_out_scores("kaggle2018", 2, 0.05, 0.9)])  # a better recipe, one collection held out
    result = held_out_differences(a, b, 300, 0)
    assert list(result) == ["kaggle2018"]
    assert result["kaggle2018"]["roc_auc"]["ci95"][0] > 0
    # at B's own threshold of 0.9, B calls no tumor below it: its recall is B's, not A's threshold's
    tumors = b.label == 1
    assert result["kaggle2018"]["recall"]["b"] == pytest.approx((b.p_tumor[tumors] >= 0.9).mean(), abs=1e-4)
    with pytest.raises(CompareError, match="held out kaggle2018: the two revisions"):
        held_out_differences(a, b.iloc[:-1], 10, 0)
