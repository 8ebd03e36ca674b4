"""Where the pipeline reads and writes, relative to the repository root: named once here (dvc.yaml's outs are the
same paths). Each stage function takes them as defaults, so tests and other layouts can pass their own."""

FETCH_DIR = "artifacts/fetch"
DEDUP_DIR = "artifacts/dedup"
SPLIT_DIR = "artifacts/split"
TRAIN_DIR = "artifacts/train"
EVALUATE_DIR = "artifacts/evaluate"
REVIEW_DIR = "artifacts/review"
MODEL_DIR = "models"  # the shipped model: model.keras and its description model.json
METRICS_DIR = "metrics"
PLOTS_DIR = "plots"

MODEL_INFO = f"{MODEL_DIR}/model.json"
OUT_OF_FOLD = f"{TRAIN_DIR}/oof.npz"
TEST_PREDICTIONS = f"{EVALUATE_DIR}/test_predictions.csv"
TRAIN_LIVE_DIR = f"{METRICS_DIR}/train"  # dvclive's curves of every fold
DEDUP_REVIEW = f"{PLOTS_DIR}/dedup_review.png"
EVALUATE_PLOTS = f"{PLOTS_DIR}/evaluate"
REVIEW_GALLERY = f"{PLOTS_DIR}/review/label_issues.png"
EXPLAIN_PLOTS = f"{PLOTS_DIR}/explain"
# the optional generalize stage (benchmarks/dvc.yaml)
GENERALIZE_DIR = "artifacts/generalize"
GENERALIZE_METRICS = f"{METRICS_DIR}/generalize.json"
GENERALIZE_GALLERY = f"{PLOTS_DIR}/generalize/worst_errors.png"

# metrics/<stage>.json of every stage but explain (which writes only plots)
STAGE_METRICS = {
    stage: f"{METRICS_DIR}/{stage}.json"
    for stage in ("fetch", "dedup", "split", "train", "evaluate", "review", "register")
}
