"""From a network call to an answer a reader can act on: read (P(tumor) and a label), uncertain (read this one
first) or out of distribution (not read: it does not look like a brain MR slice).

Evaluate fits what this needs (calibration, the uncertain band, the gate) and writes it beside the model;
`braintumor predict`, the web service and evaluate itself answer through `Assessor`, so an answer means the same
wherever it is given. A model described without them (older models) is answered as before: the raw score, a
label, no gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from braintumor.errors import ModelLoadError
from braintumor.model.calibration import calibrated
from braintumor.model.gate import FeatureGate
from braintumor.model.outputs import PREDICT_CHUNK, tumor_probability_of

READ, UNCERTAIN, OUT_OF_DISTRIBUTION = "read", "uncertain", "out_of_distribution"
SPLIT_VOTE = 1 / 3  # members disagree when at least this share of member-views falls on each side of the threshold
SPLIT_REASON = "the fold models disagree"


def finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def check_trust_info(info: dict, where: str) -> None:
    """The optional calibration, uncertain band and gate of a description (evaluate writes all three; older
    models have none): well-formed, or a `ModelLoadError` naming the field."""
    calibration = info.get("calibration")
    if calibration is not None and not (
        isinstance(calibration, dict)
        and calibration.get("method") == "platt"
        and finite(calibration.get("slope"))
        and calibration["slope"] > 0
        and finite(calibration.get("intercept"))
    ):
        raise ModelLoadError(
            f"{where}: `calibration` must be Platt scaling with a positive slope (got {calibration!r})"
        )
    band = info.get("uncertain_band")
    if band is not None and not (
        isinstance(band, list) and len(band) == 2 and all(finite(b) for b in band) and 0 <= band[0] <= band[1] <= 1
    ):
        raise ModelLoadError(f"{where}: `uncertain_band` must be [low, high] probabilities (got {band!r})")
    gate = info.get("gate")
    if gate is not None and not (
        isinstance(gate, dict) and isinstance(gate.get("sha256"), str) and len(gate["sha256"]) == 64
    ):
        raise ModelLoadError(f"{where}: `gate` must name the SHA-256 of the model's gate file (got {gate!r})")


@dataclass
class Scores:
    raw: np.ndarray  # the shipped model's P(tumor) score (what model.json's `threshold` applies to)
    members: np.ndarray  # (images, members x views) each member's score on each view
    features: list[np.ndarray]  # the gate's feature groups, member by member


def score(scorer, x, class_names: list[str], batch_size: int = 64) -> Scores:
    """`scoring.scoring_model`'s outputs (Keras, or its ONNX export run by `onnx_scorer.OnnxScorer`) for uint8
    images `x` (an array, or anything `np.asarray` reads in slices), in chunks of PREDICT_CHUNK images."""
    chunk = max(batch_size, PREDICT_CHUNK // batch_size * batch_size)
    parts = []
    for start in range(0, len(x), chunk):
        images = np.asarray(x[start : start + chunk], dtype="float32")
        parts.append(scorer.predict(images, batch_size=batch_size, verbose=0))
    return scores_of([np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(len(parts[0]))], class_names)


def scores_of(outputs: list[np.ndarray], class_names: list[str]) -> Scores:
    """`Scores` from the scoring model's outputs."""
    raw = tumor_probability_of(np.asarray(outputs[0], dtype=np.float64), class_names)
    stacked = np.asarray(outputs[1], dtype=np.float64)
    members = np.stack([tumor_probability_of(stacked[:, k], class_names) for k in range(stacked.shape[1])], axis=1)
    return Scores(raw, members, [np.asarray(f, dtype=np.float64) for f in outputs[2:]])


class Assessor:
    """Turns `Scores` into answers with the model's calibration, uncertain band and gate (each optional)."""

    def __init__(self, info: dict, gate: FeatureGate | None, where: str = "model description"):
        check_trust_info(info, where)
        self.threshold = float(info["threshold"])
        self.calibration = info.get("calibration")
        self.band = info.get("uncertain_band")
        self.gate = gate

    @property
    def probability_threshold(self) -> float:
        """The threshold in the units answers show (calibrated P(tumor) when the model has a calibration)."""
        return float(calibrated(np.array([self.threshold]), self.calibration)[0])

    def answers(self, scores: Scores) -> list[dict]:
        probability = calibrated(scores.raw, self.calibration)
        above = scores.members >= self.threshold
        split = np.minimum(above.mean(axis=1), 1 - above.mean(axis=1)) >= SPLIT_VOTE
        spread = scores.members.std(axis=1)
        distance = self.gate.distance(scores.features) if self.gate is not None else None
        answers = []
        for k, p in enumerate(probability):
            answer = {"probability": round(float(p), 6), "member_spread": round(float(spread[k]), 4)}
            if distance is not None:
                answer["gate_distance"] = round(float(distance[k]), 4)
            if distance is not None and distance[k] > 1.0:
                answer.update(
                    status=OUT_OF_DISTRIBUTION,
                    label=None,
                    reason=f"does not look like a brain MR slice (gate distance {distance[k]:.2f}, refused above 1.00)",
                    refusal="gate",
                )
                del answer["probability"]
            elif self.band is not None and self.band[0] <= p < self.band[1]:
                answer.update(
                    status=UNCERTAIN,
                    label=None,
                    reason=f"P(tumor) {p:.2f} is inside the uncertain band {self.band[0]:.2f}-{self.band[1]:.2f}",
                )
            elif self.band is not None and split[k]:
                answer.update(
                    status=UNCERTAIN,
                    label=None,
                    reason=f"{SPLIT_REASON} ({above[k].sum()} of {above.shape[1]} member views call it a tumor)",
                )
            else:
                answer.update(status=READ, label=int(scores.raw[k] >= self.threshold))
            answers.append(answer)
        return answers
