"""The `evaluate` stage: choose the operating threshold out of fold, measure the test split, ship the model.

The decision threshold aims at `evaluate.target_recall` (a missed tumor is the costly error) with the best
specificity. The validation split alone holds too few healthy scans to place it, so the threshold comes
from the out-of-fold predictions the train stage saved: every train+val image scored by the fold model
that did not see it, i.e. by the members of the very ensemble that ships. The spread of the per-fold
thresholds is reported. Test metrics are given at the chosen threshold and at 0.5.

The same out-of-fold scores fit what makes an answer trustworthy (model/assessment.py): Platt calibration of
the score, the "uncertain" band around the threshold, and the out-of-distribution gate on the fold models'
features of train+val. The deployable copy of the model, with all of them in its `model.json` and `gate.npz`,
is written to `models/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn import metrics as skm

from braintumor import paths
from braintumor.atomic import atomic_path, write_csv, write_json
from braintumor.data.datasets import load_split, load_splits
from braintumor.labels import collection_of, site_of
from braintumor.model import calibration as cal
from braintumor.model.assessment import (
    OUT_OF_DISTRIBUTION,
    READ,
    SPLIT_REASON,
    UNCERTAIN,
    Assessor,
    Scores,
    score,
    scores_of,
)
from braintumor.model.gate import GATE_FILE, METHOD, FeatureGate
from braintumor.model.inference import inference_graph, load_model, members_of, save_model
from braintumor.model.onnx_scorer import ONNX_FILE, OnnxScorer
from braintumor.model.scoring import export_onnx, scoring_model
from braintumor.params import validate_evaluate

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def threshold_for_recall(y: np.ndarray, p: np.ndarray, target_recall: float) -> float:
    """The highest threshold whose recall is at least `target_recall` (so the best specificity there)."""
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        raise ValueError("no tumor images to place the threshold on")
    needed = min(positives.size, math.ceil(target_recall * positives.size - 1e-9))
    return float(positives[needed - 1])


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, predicted, labels=[0, 1]).ravel()
    both = len(np.unique(y)) == 2
    result = {
        "accuracy": (tp + tn) / len(y),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "f1": skm.f1_score(y, predicted, zero_division=0),
        "roc_auc": skm.roc_auc_score(y, p) if both else float("nan"),
        "pr_auc": skm.average_precision_score(y, p) if both else float("nan"),
        "brier": skm.brier_score_loss(y, p),
        "tp": int(tp),
        "fn": int(fn),
        "tn": int(tn),
        "fp": int(fp),
    }
    return {k: (round(float(v), 4) if isinstance(v, float | np.floating) else v) for k, v in result.items()}


def bootstrap_intervals(y: np.ndarray, p: np.ndarray, threshold: float, resamples: int, seed: int) -> dict:
    """95 % percentile intervals of recall, specificity, accuracy and ROC AUC over `resamples` bootstrap resamples
    of the test set. With 30-odd healthy test scans, one scan moves specificity by about 3 points: the interval
    says how far apart two models must be before a difference means anything.

    Args:
        y: true labels (1 = tumor).
        p: P(tumor).
        threshold: the operating threshold.
        resamples: bootstrap resamples.
        seed: the bootstrap's seed.
    """
    rng = np.random.default_rng(seed)
    predicted = p >= threshold
    values = {"recall": [], "specificity": [], "accuracy": [], "roc_auc": []}
    for _ in range(resamples):
        pick = rng.integers(0, len(y), len(y))
        yy, pp = y[pick], predicted[pick]
        if (yy == 1).any():
            values["recall"].append(pp[yy == 1].mean())
        if (yy == 0).any():
            values["specificity"].append(1 - pp[yy == 0].mean())
        if 0 < yy.sum() < len(yy):
            values["roc_auc"].append(skm.roc_auc_score(yy, p[pick]))
        values["accuracy"].append((pp == yy).mean())
    return {
        name: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
        for name, v in values.items()
        if v
    }


def evaluate(
    params: dict,
    split_dir: str | Path = paths.SPLIT_DIR,
    train_dir: str | Path = paths.TRAIN_DIR,
    model_dir: str | Path = paths.MODEL_DIR,
    metrics_path: str | Path = paths.STAGE_METRICS["evaluate"],
    plots_dir: str | Path = paths.EVALUATE_PLOTS,
    predictions_path: str | Path = paths.TEST_PREDICTIONS,
) -> dict:
    """Run the evaluate stage (see the module docstring). The test predictions, one row an image, let
    `braintumor compare` set two experiments side by side on the same images.

    Args:
        params: the whole params.yaml.
        split_dir: the split stage's output (the test split).
        train_dir: the train stage's output (model and out-of-fold predictions).
        model_dir: where the deployable model and model.json go.
        metrics_path: the stage's metrics JSON.
        plots_dir: DVC plot data and the gallery.
        predictions_path: one row per test image.
    """
    config = validate_evaluate(params)
    train_dir, plots_dir = Path(train_dir), Path(plots_dir)
    info = json.loads((train_dir / "model.json").read_text())
    model = inference_graph(load_model(train_dir / "model.keras"))  # what ships: no augmentation layers
    names = info["class_names"]
    with np.load(train_dir / "oof.npz") as data:
        oof = {key: data[key] for key in data.files}
    target = config["target_recall"]
    placing = oof["fold"] >= 0  # fold -1: left out of training by `train.clean_learning`, so out of placement too
    threshold = threshold_for_recall(oof["label"][placing], oof["probability"][placing], target)
    folds = sorted(set(oof["fold"][placing].tolist()))
    fold_thresholds = [
        threshold_for_recall(oof["label"][oof["fold"] == f], oof["probability"][oof["fold"] == f], target)
        for f in folds
    ]

    test = load_split(split_dir, "test", info["task"])
    scorer = scoring_model(model, with_features=True)
    test_scores = score(scorer, test["x"], names)
    p = test_scores.raw
    y = test["label"]
    chosen = binary_metrics(y, p, threshold)
    manifest = pd.read_csv(Path(split_dir) / "manifest.csv", keep_default_na=False)
    sources = manifest.set_index("path").loc[test["path"].astype(object), "source"].to_numpy()
    result = {
        **{
            k: chosen[k] for k in ("recall", "accuracy", "specificity", "precision", "f1", "roc_auc", "pr_auc", "brier")
        },
        "threshold": round(threshold, 6),
        "test_images": len(y),
        "confusion": {k: chosen[k] for k in ("tp", "fn", "tn", "fp")},
        "ci95": bootstrap_intervals(y, p, threshold, config["bootstrap"], params["seed"]),
        "at_0.5": binary_metrics(y, p, 0.5),
        "threshold_selection": {
            "target_recall": target,
            "folds": len(folds),
            "images": int(placing.sum()),
            **({"left_out_by_clean_learning": int((~placing).sum())} if not placing.all() else {}),
            "fold_thresholds": [round(t, 6) for t in fold_thresholds],
            "fold_threshold_spread": round(max(fold_thresholds) - min(fold_thresholds), 6),
            "out_of_fold": {  # every train+val image as labelled, any left out of placement too
                k: v
                for k, v in binary_metrics(oof["label"], oof["probability"], threshold).items()
                if k in ("recall", "specificity", "accuracy", "roc_auc")
            },
        },
        "per_source": {
            source: binary_metrics(y[sources == source], p[sources == source], threshold)
            for source in sorted(set(sources))
        },
        "per_site": per_site(manifest, test["path"], y, p, threshold),
    }
    if info["task"] == "multiclass":
        probs = model.predict(test["x"].astype("float32"), verbose=0)
        result["multiclass_accuracy"] = round(float((probs.argmax(1) == test["y"]).mean()), 4)

    oof_placed = {key: value[placing] for key, value in oof.items()}
    calibration = cal.fit_platt(oof_placed["label"], oof_placed["probability"])
    if calibration["slope"] <= 0:  # scores that rank tumors below healthy scans: calibrating would flip them
        log.warning(
            "evaluate: out of fold, higher scores mean fewer tumors (Platt slope %.3f); P(tumor) ships uncalibrated",
            calibration["slope"],
        )
        calibration = None
    calibrated_threshold = float(cal.calibrated(np.array([threshold]), calibration)[0])
    band = cal.uncertain_band(
        oof_placed["label"],
        cal.calibrated(oof_placed["probability"], calibration),
        calibrated_threshold,
        config["uncertain_errors"],
    )
    gate = fit_gate(scorer, split_dir, oof_placed, info["task"], names, len(members_of(model)[0]) or 1)
    trust = {
        "calibration": calibration,
        "probability_threshold": round(calibrated_threshold, 6),
        "uncertain_band": [round(band[0], 6), round(band[1], 6)],
    }
    assessor = Assessor({"threshold": threshold, **trust}, gate)
    oof_cross = (
        cal.cross_fitted(oof_placed["label"], oof_placed["probability"], oof_placed["fold"])
        if calibration
        else oof_placed["probability"]
    )
    result.update(
        trust_metrics(y, p, test_scores, assessor, oof_placed, oof_cross, config["bootstrap"], params["seed"])
    )

    with atomic_path(model_dir) as staging:
        staging.mkdir()
        save_model(model, staging / "model.keras")
        result["model_sha256"] = file_sha256(staging / "model.keras")  # what register checks models/ against
        gate_sha256 = gate.save(staging / GATE_FILE)
        onnx = onnx_export(scorer, staging / ONNX_FILE, test["x"], test_scores, threshold, info)
        if onnx:
            result["onnx"] = {k: onnx[k] for k in ("max_abs_diff", "labels_equal")}
        (staging / "model.json").write_text(
            json.dumps(
                {
                    **info,
                    "model_sha256": result["model_sha256"],
                    "mirror_average": members_of(model)[1],
                    "threshold": threshold,
                    "target_recall": target,
                    **trust,
                    "gate": {
                        "file": GATE_FILE,
                        "sha256": gate_sha256,
                        "method": METHOD,
                        "refuse_above": 1.0,
                        "out_of_fold_refused": result["gate"]["out_of_fold_refused"],
                    },
                    "test_metrics": {k: result[k] for k in ("recall", "accuracy", "specificity", "roc_auc")},
                    "reference": answer_reference(assessor.answers(test_scores)),
                    **({"onnx": onnx} if onnx else {}),
                },
                indent=2,
            )
            + "\n"
        )
    write_csv(predictions_path, pd.DataFrame({"path": test["path"], "label": y, "probability": p}))
    write_json(metrics_path, result)
    write_plots(
        plots_dir,
        y,
        p,
        threshold,
        test["x"],
        test["path"],
        config["gallery"],
        trust_figures(y, p, assessor, oof_placed, oof_cross, band),
    )
    log.info(
        "evaluate: threshold %.4f (folds %s); test recall %.4f, specificity %.4f, accuracy %.4f "
        "(at 0.5: %.4f / %.4f / %.4f)",
        threshold,
        result["threshold_selection"]["fold_thresholds"],
        result["recall"],
        result["specificity"],
        result["accuracy"],
        result["at_0.5"]["recall"],
        result["at_0.5"]["specificity"],
        result["at_0.5"]["accuracy"],
    )
    return result


def per_site(manifest: pd.DataFrame, paths: np.ndarray, y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Test metrics of each site whose scans are in the test split: the user's `data/site-<name>/` folders
    (what `braintumor feedback accept` writes), by the collection their path names."""
    rows = manifest.set_index("path").loc[paths.astype(object)]
    sites = np.array([site_of(s, collection_of(s, o)) for s, o in zip(rows.source, rows.original, strict=True)])
    return {
        site: {"images": int((sites == site).sum()), **binary_metrics(y[sites == site], p[sites == site], threshold)}
        for site in sorted(set(sites) - {""})
    }


def answer_reference(answers: list[dict]) -> dict:
    """What the model answers on its test split, shipped in model.json so that `braintumor watch` and the
    page's strip compare a site with it without the split: 101 quantiles of the calibrated P(tumor) and of the
    gate distances of the scans read, and the share refused."""
    read = [a for a in answers if a["status"] != OUT_OF_DISTRIBUTION]
    quantiles = np.linspace(0, 1, 101)
    distances = [a["gate_distance"] for a in read if "gate_distance" in a]
    return {
        "images": len(answers),
        "refused": round(1 - len(read) / len(answers), 4),
        "p_tumor_quantiles": [round(float(q), 6) for q in np.quantile([a["probability"] for a in read], quantiles)],
        "gate_distance_quantiles": [round(float(q), 6) for q in np.quantile(distances, quantiles)] if distances else [],
    }


def image_grid(count: int, width: float, height: float) -> tuple[plt.Figure, np.ndarray]:
    """A figure of `count` image cells (at least one), up to 8 a row, each `width` x `height` inches, axes off;
    returns it and its axes in reading order."""
    columns = max(1, min(8, count))
    rows = max(1, math.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes.ravel()


def onnx_export(scorer, path: Path, x, scores: Scores, threshold: float, info: dict) -> dict | None:
    """Export the scoring model to ONNX at `path` and check it on the test split against the Keras scores it
    must reproduce; returns model.json's `onnx` entry, or None (with a warning) where the backend cannot export,
    so that the Keras model still ships."""
    try:
        export_onnx(scorer, path)
    except Exception as err:  # noqa: BLE001 - no exporter for this backend, tf2onnx missing, an op it lacks
        log.warning("evaluate: no ONNX export (%s: %s); the Keras model ships alone", type(err).__name__, err)
        path.unlink(missing_ok=True)
        return None
    digest = file_sha256(path)
    outputs = OnnxScorer(path, digest, info["image_size"]).predict(np.asarray(x, dtype="float32"), batch_size=64)
    exported = scores_of(outputs, info["class_names"])
    difference = float(np.abs(exported.raw - scores.raw).max()) if len(scores.raw) else 0.0
    log.info("evaluate: ONNX export checked on the test split, max |P(tumor) difference| %.2e", difference)
    return {
        "file": path.name,
        "sha256": digest,
        "max_abs_diff": round(difference, 8),
        "labels_equal": bool(((exported.raw >= threshold) == (scores.raw >= threshold)).all()),
    }


def fit_gate(scorer, split_dir: Path, oof: dict, task: str, names: list[str], members: int) -> FeatureGate:
    """The out-of-distribution gate, fitted on the features of the train+val images `oof` lists (each member on
    the images it trained on, scaled on its held-out fold: see `model/gate.py`).

    Args:
        scorer: the scoring model of the shipped ensemble.
        split_dir: the split stage's output.
        oof: out-of-fold rows (path, label, fold) that took part in placing the threshold.
        task: binary or multiclass.
        names: the model's class names.
        members: fold models in the ensemble (fold k is member k's held-out fold).
    """
    pool = load_splits(split_dir, ("train", "val"), task, lazy=True)
    index = {path: row for row, path in enumerate(pool["path"])}
    rows = np.array([index[path] for path in oof["path"]])
    features = score(scorer, pool["x"][rows], names).features
    gate = FeatureGate.fit(features, oof["label"], oof["fold"], members)
    log.info("evaluate: out-of-distribution gate fitted on %d train+val images, %d fold models", len(rows), members)
    return gate


def trust_metrics(y, p, test_scores: Scores, assessor: Assessor, oof: dict, oof_cross, resamples: int, seed: int):
    """evaluate.json's calibration, uncertain-band and gate figures (test split, and out of fold).

    Args:
        y: test labels.
        p: the test split's raw ensemble scores.
        test_scores: the scoring model's outputs on the test split.
        assessor: the answers' rules, as the model ships them.
        oof: out-of-fold rows that placed the threshold.
        oof_cross: their cross-fitted calibrated probabilities.
        resamples: bootstrap resamples.
        seed: the bootstrap's seed.
    """
    calibration = assessor.calibration
    test_calibrated = cal.calibrated(p, calibration)
    answers = assessor.answers(test_scores)
    status = np.array([a["status"] for a in answers])
    wrong = (p >= assessor.threshold).astype(int) != y
    read = status == READ
    oof_wrong = (oof["probability"] >= assessor.threshold).astype(int) != oof["label"]
    oof_calibrated = cal.calibrated(oof["probability"], calibration)
    in_band = (oof_calibrated >= assessor.band[0]) & (oof_calibrated < assessor.band[1])
    return {
        "calibration": {
            **(
                {k: calibration[k] if k == "method" else round(calibration[k], 4) for k in calibration}
                if calibration
                else {"method": "none"}
            ),
            "test_raw": cal.calibration_scores(y, p),
            "test_calibrated": cal.calibration_scores(y, test_calibrated),
            "test_ci95": cal.paired_intervals(y, p, test_calibrated, resamples, seed),
            "out_of_fold_raw": cal.calibration_scores(oof["label"], oof["probability"]),
            "out_of_fold_cross_fitted": cal.calibration_scores(oof["label"], oof_cross),
            "out_of_fold_ci95": cal.paired_intervals(oof["label"], oof["probability"], oof_cross, resamples, seed),
        },
        "uncertain": {
            "band": assessor.band,
            "out_of_fold_share": round(float(in_band.mean()), 4),
            "out_of_fold_errors_held": round(float(in_band[oof_wrong].mean()), 4) if oof_wrong.any() else None,
            "test_share": round(float((status == UNCERTAIN).mean()), 4),
            "test_split_vote_share": round(float(np.mean([SPLIT_REASON in a.get("reason", "") for a in answers])), 4),
            "test_errors_held": round(float((status[wrong] == UNCERTAIN).mean()), 4) if wrong.any() else None,
            "test_read_accuracy": round(float((~wrong[read]).mean()), 4) if read.any() else None,
        },
        "gate": {
            "method": METHOD,
            "out_of_fold_refused": round(assessor.gate.out_of_fold_refused, 4),
            "test_refused": round(float((status == OUT_OF_DISTRIBUTION).mean()), 4),
        },
    }


def trust_figures(y, p, assessor: Assessor, oof: dict, oof_cross, band) -> dict[str, plt.Figure]:
    """reliability.png (observed tumor rate against P(tumor), before and after calibration, test and out of
    fold) and risk_coverage.png (error rate of the scans answered against the share answered, as the uncertain
    band widens; the chosen band marked)."""
    reliability, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, (title, labels, before, after) in zip(
        axes,
        [
            ("test split", y, p, cal.calibrated(p, assessor.calibration)),
            ("out of fold (calibration cross-fitted)", oof["label"], oof["probability"], oof_cross),
        ],
        strict=True,
    ):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for name, scores, colour in (("raw score", before, "tab:red"), ("calibrated", after, "tab:blue")):
            points = cal.reliability(labels, scores)
            ax.plot(
                [q["predicted"] for q in points],
                [q["observed"] for q in points],
                "o-",
                color=colour,
                ms=3,
                label=f"{name} (ECE {cal.expected_calibration_error(labels, scores):.3f})",
            )
        ax.set(title=title, xlabel="P(tumor) shown", ylabel="observed tumor rate", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7)
    reliability.tight_layout()
    coverage, ax = plt.subplots(figsize=(4.5, 4))
    calibrated_oof = cal.calibrated(oof["probability"], assessor.calibration)
    threshold = assessor.probability_threshold
    curve = cal.risk_coverage(oof["label"], calibrated_oof, threshold)
    ax.plot([q["coverage"] for q in curve], [q["risk"] for q in curve], "-", color="tab:blue")
    answered = (calibrated_oof < band[0]) | (calibrated_oof >= band[1])
    wrong = (calibrated_oof >= threshold).astype(int) != oof["label"]
    ax.plot(
        [answered.mean()],
        [wrong[answered].mean()],
        "o",
        color="tab:red",
        label=f"chosen band {band[0]:.2f}-{band[1]:.2f}",
    )
    ax.set(
        title="out of fold: answered vs error rate",
        xlabel="share answered (not uncertain)",
        ylabel="error rate of the answered scans",
    )
    ax.legend(fontsize=7)
    coverage.tight_layout()
    return {"reliability.png": reliability, "risk_coverage.png": coverage}


def write_plots(plots_dir: Path, y, p, threshold, images, paths, gallery: int, figures: dict) -> None:
    """DVC plot data (confusion, ROC, PR), a gallery PNG of misclassified test images, and `figures` (name: a
    matplotlib figure, closed once saved).

    Args:
        plots_dir: folder for the plot files.
        y: true labels of the test split.
        p: its P(tumor).
        threshold: the operating threshold.
        images: the test images.
        paths: their files.
        gallery: misclassified images to show.
        figures: further figures to save beside them.
    """
    label = np.array(["no_tumor", "tumor"])
    fpr, tpr, _ = skm.roc_curve(y, p)
    precision, recall, _ = skm.precision_recall_curve(y, p)
    with atomic_path(plots_dir) as staging:
        staging.mkdir()
        (staging / "confusion.json").write_text(
            json.dumps(
                [
                    {"actual": a, "predicted": b}
                    for a, b in zip(label[y], label[(p >= threshold).astype(int)], strict=True)
                ]
            )
        )
        (staging / "roc.json").write_text(
            json.dumps([{"fpr": round(float(f), 5), "tpr": round(float(t), 5)} for f, t in zip(fpr, tpr, strict=True)])
        )
        (staging / "pr.json").write_text(
            json.dumps(
                [
                    {"recall": round(float(r), 5), "precision": round(float(q), 5)}
                    for r, q in zip(recall, precision, strict=True)
                ]
            )
        )
        wrong = np.flatnonzero((p >= threshold).astype(int) != y)
        wrong = wrong[np.argsort(-np.abs(p[wrong] - threshold))][:gallery]
        fig, axes = image_grid(len(wrong), 1.8, 2.0)
        for ax, index in zip(axes, wrong, strict=False):  # more axes than images
            ax.imshow(images[index][..., 0], cmap="gray")
            ax.set_title(
                f"true {label[y[index]]}\nP(tumor)={p[index]:.2f}\n{Path(str(paths[index])).name[:18]}", fontsize=6
            )
        fig.suptitle(
            f"misclassified test images at threshold {threshold:.3f} ({len(wrong)} shown, most confident first)"
            if len(wrong)
            else "no misclassified test images",
            fontsize=8,
        )
        fig.tight_layout()
        fig.savefig(staging / "misclassified.png", dpi=110)
        plt.close(fig)
        for name, figure in figures.items():
            figure.savefig(staging / name, dpi=110)
            plt.close(figure)
