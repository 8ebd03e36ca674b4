"""One answer for a series (a DICOM series, a NIfTI volume) from its slices' answers, in series order.

The rule: a series is called a tumor when two adjacent slices are each read as tumor. A mass a reader would act
on spans neighbouring slices at the slice spacings of clinical MR, while single-slice false alarms of this model
are scattered (a bright vessel, a flow artefact), so the pair rule cuts false alarms at little cost in recall.
A series with a positive or uncertain slice but no positive pair is `uncertain` (read it first): a missed
tumor is the costly error. Its P(tumor) is that of its strongest adjacent pair (the lower of the two), or of its
one slice. Slices that do not look like brain MR slices (the skull's top, the neck) are listed, never counted;
a series without any other is not read. No labelled volumes exist here to place a series threshold: the rule
reuses the slice threshold, and `benchmarks/series_verdict.py` measures its false-positive rate on healthy
volumes.
"""

from __future__ import annotations

from braintumor.model.assessment import OUT_OF_DISTRIBUTION, READ, UNCERTAIN

RUN = 2  # adjacent slices read as tumor that make a tumor series


def series_answer(slices: list[dict]) -> dict:
    """The series' status, label, P(tumor), reason and `driving_slices` (indices into `slices`)."""
    scored = [k for k, answer in enumerate(slices) if answer["status"] != OUT_OF_DISTRIBUTION]
    if not scored:
        return {
            "status": OUT_OF_DISTRIBUTION,
            "label": None,
            "reason": f"none of its {len(slices)} slices looks like a brain MR slice",
            "refusal": "no_slice_read",
            "driving_slices": [],
        }
    if len(slices) == 1:
        answer = {k: v for k, v in slices[0].items() if k in ("status", "label", "probability", "reason", "refusal")}
        return {**answer, "driving_slices": [0]}
    runs = [
        list(range(k, k + RUN))
        for k in range(len(slices) - RUN + 1)
        if all(slices[j]["status"] != OUT_OF_DISTRIBUTION for j in range(k, k + RUN))
    ]
    strength = {tuple(run): min(slices[j]["probability"] for j in run) for run in runs}
    positive = [run for run in runs if all(slices[j]["label"] == 1 for j in run)]
    suspect = [k for k in scored if slices[k]["label"] == 1 or slices[k]["status"] == UNCERTAIN]
    if positive:
        driving = max(positive, key=lambda run: strength[tuple(run)])
        return {
            "status": READ,
            "label": 1,
            "probability": strength[tuple(driving)],
            "driving_slices": driving,
        }
    if runs:
        driving = max(runs, key=lambda run: strength[tuple(run)])
        probability = strength[tuple(driving)]
    else:  # no two adjacent slices both look like brain MR
        driving = [max(scored, key=lambda k: slices[k]["probability"])]
        probability = slices[driving[0]]["probability"]
    if suspect:
        top = sorted(suspect, key=lambda k: -slices[k]["probability"])[:RUN]
        return {
            "status": UNCERTAIN,
            "label": None,
            "probability": probability,
            "reason": f"{len(suspect)} slice(s) suspect or uncertain, but no {RUN} adjacent slices read as tumor",
            "driving_slices": sorted(top),
        }
    return {"status": READ, "label": 0, "probability": probability, "driving_slices": driving}
