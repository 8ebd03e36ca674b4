"""Calibration, the uncertain band, the out-of-distribution gate and the answers built from them."""

import hashlib

import keras
import numpy as np
import pytest
from scipy.special import expit

from braintumor.errors import ModelLoadError
from braintumor.model import calibration as cal
from braintumor.model.assessment import OUT_OF_DISTRIBUTION, READ, UNCERTAIN, Assessor, Scores, score
from braintumor.model.gate import GATE_FILE, FeatureGate
from braintumor.model.inference import average_of, members_of
from braintumor.model.scoring import feature_widths, scoring_model


def logistic_data(slope: float, intercept: float, n: int, seed: int = 0):
    """Scores whose true P(tumor) is sigmoid(slope * logit(score) + intercept), and labels drawn from it."""
    rng = np.random.default_rng(seed)
    score_ = expit(rng.normal(0, 2, n))
    y = (rng.random(n) < expit(slope * cal.logit(score_) + intercept)).astype(int)
    return y, score_


def test_platt_scaling_recovers_the_true_mapping_and_keeps_every_label():
    y, score_ = logistic_data(1.6, 0.9, 40_000)
    fitted = cal.fit_platt(y, score_)
    assert fitted["slope"] == pytest.approx(1.6, abs=0.06)
    assert fitted["intercept"] == pytest.approx(0.9, abs=0.06)
    p = cal.calibrated(score_, fitted)
    threshold = 0.3
    assert np.array_equal(score_ >= threshold, p >= cal.calibrated(np.array([threshold]), fitted)[0])


def test_calibration_lowers_the_error_it_is_fitted_for_out_of_fold():
    y, score_ = logistic_data(2.0, 1.0, 6_000)
    folds = np.arange(len(y)) % 5
    before, after = cal.calibration_scores(y, score_), cal.calibration_scores(y, cal.cross_fitted(y, score_, folds))
    assert after["ece"] < before["ece"] / 2
    assert after["nll"] < before["nll"]
    intervals = cal.paired_intervals(y, score_, cal.cross_fitted(y, score_, folds), 200, 0)
    assert intervals["ece_change"][1] < 0  # the whole interval says better


def test_expected_calibration_error_is_the_weighted_gap_per_bin():
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    p = np.array([0.95, 0.95, 0.95, 0.95, 0.05, 0.05, 0.05, 0.05])
    # two bins of four scans: |0.5 - 0.95| and |0.25 - 0.05|, half the scans each
    assert cal.expected_calibration_error(y, p) == pytest.approx(0.5 * 0.45 + 0.5 * 0.2)


def test_the_uncertain_band_holds_the_stated_share_of_errors_around_the_threshold():
    y, score_ = logistic_data(1.0, 0.0, 5_000, seed=3)
    threshold = 0.4
    low, high = cal.uncertain_band(y, score_, threshold, 0.5)
    assert low < threshold < high
    wrong = (score_ >= threshold).astype(int) != y
    inside = (score_ >= low) & (score_ < high)
    assert inside[wrong].mean() >= 0.5
    assert inside[wrong].mean() > inside[~wrong].mean()  # errors crowd near the threshold
    curve = cal.risk_coverage(y, score_, threshold)
    assert curve[0]["coverage"] > curve[-1]["coverage"] and curve[0]["risk"] > curve[-1]["risk"]


def blobs(members: int, n: int, widths=(6, 4), seed: int = 0):
    """Feature groups of `members` fold models for n images of two classes (class means 1 apart)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    features = [
        rng.normal(0, 1, (n, width)) + labels[:, None] * np.eye(width)[0] + 4.0
        for _ in range(members)
        for width in widths
    ]
    return features, labels


def test_the_gate_refuses_one_percent_of_held_out_images_and_what_lies_far_away():
    members = 3
    features, labels = blobs(members, 3_000)
    folds = np.arange(3_000) % members
    gate = FeatureGate.fit(features, labels, folds, members)
    assert gate.out_of_fold_refused == pytest.approx(0.01, abs=0.003)
    fresh, _ = blobs(members, 2_000, seed=1)
    assert (gate.distance(fresh) > 1).mean() < 0.01  # the mean over members refuses less than one member
    far = [f[:50] * np.where(np.arange(f.shape[1]) % 2, -1, 1) for f in fresh]  # other directions, same norms
    assert (gate.distance(far) > 1).all()


def tiny_ensemble(size: int = 32) -> keras.Model:
    def member(k: int) -> keras.Model:
        inputs = keras.Input((size, size, 3))
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
        y = keras.layers.Conv2D(8, 3, padding="same")(x)
        y = keras.layers.GroupNormalization(groups=4)(y)
        x = keras.layers.Add()([x, y])
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x))
        return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="prediction")(x), name=f"m_fold{k}")

    keras.utils.set_random_seed(0)
    members = [member(0), member(1)]
    for layer in [layer for m in members for layer in m.layers if isinstance(layer, keras.layers.GroupNormalization)]:
        layer.set_weights([np.random.default_rng(1).normal(1, 0.5, 8), np.random.default_rng(2).normal(0, 0.5, 8)])
    return average_of(members, mirrored=True)


def test_the_scoring_model_gives_the_shipped_output_each_member_view_and_the_gate_features():
    model = tiny_ensemble()
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3)).astype(np.uint8)
    scores = score(scoring_model(model, with_features=True), images, ["no_tumor", "tumor"])
    shipped = model.predict(images.astype("float32"), verbose=0)[:, 0]
    assert np.abs(scores.raw - shipped).max() < 1e-6
    assert scores.members.shape == (7, 4)  # two members, two views each
    assert np.abs(scores.members.mean(axis=1) - shipped).max() < 1e-6
    # per member, on the image as given: mean and spread over the image of its residual sum, then of its last map
    members, _ = members_of(model)
    expected = []
    for member in members:
        add = next(layer for layer in member.layers if isinstance(layer, keras.layers.Add))
        pool = next(layer for layer in member.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D))
        for tensor in (add.output, pool.input):
            maps = keras.Model(member.inputs, tensor).predict(images.astype("float32"), verbose=0)
            expected += [maps.mean(axis=(1, 2)), maps.std(axis=(1, 2))]
    assert len(scores.features) == len(expected)
    for got, want in zip(scores.features, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_saved_gate_loads_only_for_its_network_and_its_digest(tmp_path):
    model = tiny_ensemble()
    scorer = scoring_model(model, with_features=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (60, 32, 32, 3)).astype(np.uint8)
    scores = score(scorer, images, ["no_tumor", "tumor"])
    gate = FeatureGate.fit(scores.features, np.arange(60) // 2 % 2, np.arange(60) % 2, 2)
    digest = gate.save(tmp_path / GATE_FILE)
    assert digest == hashlib.sha256((tmp_path / GATE_FILE).read_bytes()).hexdigest()
    again = FeatureGate.load(tmp_path / GATE_FILE, feature_widths(scorer), digest)
    assert np.allclose(again.distance(scores.features), gate.distance(scores.features), rtol=1e-4)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        FeatureGate.load(tmp_path / GATE_FILE, feature_widths(scorer), "0" * 64)
    other = keras.Model(scorer.inputs, scorer.outputs[:-2])  # one feature group fewer
    with pytest.raises(ModelLoadError, match="feature groups"):
        FeatureGate.load(tmp_path / GATE_FILE, feature_widths(other))
    np.savez(tmp_path / "pickled.npz", scales=np.array([{"code": 1}], dtype=object))
    with pytest.raises(ModelLoadError, match="not a gate file"):
        FeatureGate.load(tmp_path / "pickled.npz", feature_widths(scorer))


class FixedGate:
    def __init__(self, distances):
        self.distances = np.asarray(distances)

    def distance(self, features):
        return self.distances


def test_answers_are_read_uncertain_or_not_read_with_their_reasons():
    info = {
        "threshold": 0.3,
        "calibration": {"method": "platt", "slope": 1.0, "intercept": 0.0},
        "uncertain_band": [0.2, 0.5],
    }
    scores = Scores(
        raw=np.array([0.9, 0.05, 0.35, 0.9, 0.9]),
        members=np.array([[0.9, 0.9, 0.9], [0.0, 0.1, 0.05], [0.3, 0.4, 0.35], [0.9, 0.9, 0.9], [1.0, 1.0, 0.1]]),
        features=[],
    )
    answers = Assessor(info, FixedGate([0.5, 0.5, 0.5, 3.0, 0.5])).answers(scores)
    assert [a["status"] for a in answers] == [READ, READ, UNCERTAIN, OUT_OF_DISTRIBUTION, UNCERTAIN]
    assert [a["label"] for a in answers] == [1, 0, None, None, None]
    assert "probability" not in answers[3] and "brain MR slice" in answers[3]["reason"]
    assert "uncertain band" in answers[2]["reason"] and "disagree" in answers[4]["reason"]


def test_a_description_with_a_malformed_calibration_or_band_is_refused():
    for bad in (
        {"calibration": {"method": "platt", "slope": -1.0, "intercept": 0.0}},
        {"calibration": {"method": "isotonic"}},
        {"uncertain_band": [0.6, 0.2]},
        {"gate": {"sha256": "short"}},
    ):
        with pytest.raises(ModelLoadError):
            Assessor({"threshold": 0.3, **bad}, None)


def test_the_exported_group_normalisation_is_keras_layer_also_far_from_zero():
    """`GroupNormByChannelMoments` (what the ONNX export computes) equals the trained layer, also on activations
    whose mean is a hundred times their spread, where a one-pass variance would cancel."""
    from braintumor.model.scoring import GroupNormByChannelMoments

    rng = np.random.default_rng(5)
    inputs = keras.Input((6, 5, 12))
    trained = keras.layers.GroupNormalization(groups=3)
    keras.Model(inputs, trained(inputs))
    trained.set_weights([rng.normal(1, 0.5, 12), rng.normal(0, 0.5, 12)])
    for offset, spread in ((0.0, 1.0), (50.0, 0.5)):
        x = (offset + spread * rng.normal(size=(4, 6, 5, 12))).astype("float32")
        expected = keras.ops.convert_to_numpy(trained(x))
        assert np.abs(keras.ops.convert_to_numpy(GroupNormByChannelMoments(trained)(x)) - expected).max() < 1e-4


def test_the_onnx_export_scores_as_keras_and_loads_only_as_described(tmp_path):
    """The scoring model exported to ONNX gives the Keras outputs (the shipped score, every member view, the gate
    features); a wrong digest, a custom operator or another image size is refused."""
    import onnx

    from braintumor.model.onnx_scorer import OnnxScorer
    from braintumor.model.scoring import export_onnx

    scorer = scoring_model(tiny_ensemble(), with_features=True)
    export_onnx(scorer, tmp_path / "model.onnx")
    digest = hashlib.sha256((tmp_path / "model.onnx").read_bytes()).hexdigest()
    exported = OnnxScorer(tmp_path / "model.onnx", digest, 32)
    images = np.random.default_rng(4).integers(0, 256, (9, 32, 32, 3)).astype(np.uint8)
    names = ["no_tumor", "tumor"]
    keras_scores, onnx_scores = score(scorer, images, names, batch_size=4), score(exported, images, names, 4)
    assert np.abs(keras_scores.raw - onnx_scores.raw).max() < 1e-5
    assert np.abs(keras_scores.members - onnx_scores.members).max() < 1e-5
    assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(keras_scores.features, onnx_scores.features, strict=True))
    assert exported.feature_widths() == feature_widths(scorer)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        OnnxScorer(tmp_path / "model.onnx", "0" * 64, 32)
    with pytest.raises(ModelLoadError, match="image_size"):
        OnnxScorer(tmp_path / "model.onnx", digest, 48)
    graph = onnx.load(tmp_path / "model.onnx")
    graph.graph.node.append(onnx.helper.make_node("Run", ["image"], ["out"], domain="com.example.custom"))
    onnx.save(graph, tmp_path / "custom.onnx")
    custom = hashlib.sha256((tmp_path / "custom.onnx").read_bytes()).hexdigest()
    with pytest.raises(ModelLoadError, match="com.example.custom"):
        OnnxScorer(tmp_path / "custom.onnx", custom, 32)
