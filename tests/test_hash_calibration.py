"""The dedup thresholds in params.yaml, checked on altered copies of real scans (see data/hash_calibration.py)."""

from pathlib import Path

import pytest

from braintumor.data.hash_calibration import ALTERATIONS, hash_calibration_set, rates, write_altered_copies
from braintumor.params import load_params

from conftest import KAGGLE2020, REPO, real_subset

pytestmark = pytest.mark.real_data


def test_params_thresholds_catch_altered_copies_and_keep_classes_apart(tmp_path):
    files = real_subset(per_folder=15)[KAGGLE2020]
    training = {rel: path for rel, path in files.items() if rel.startswith("Training/")}
    originals = [str(path) for path in training.values()]
    classes = [Path(rel).parent.name for rel in training]
    altered = write_altered_copies(originals, tmp_path)
    assert len(altered) == len(originals) * len(ALTERATIONS)
    config = load_params(REPO / "params.yaml")["dedup"]
    base, copies = hash_calibration_set(originals, altered, config["hash_size"], workers=2)

    chosen = rates(base, copies, altered, classes, config["phash_max_distance"], config["dhash_max_distance"])
    assert chosen["detection_rate"] >= 0.9, chosen
    for name in ("resize_half", "jpeg_q50", "to_grayscale", "to_rgb", "brightness_+15%", "pad_10%"):
        assert chosen["per_alteration"][name] >= 0.95, name
    assert chosen["false_merge_rate"] <= 1e-3
