"""The `braintumor` command: a subcommand per pipeline stage (as `stages/*.py` run them), predict, serve, compare."""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from braintumor.data.images import DEFAULT_MAX_PIXELS
from braintumor.serve.access import SCOPES
from braintumor.stage import VERBOSE, add_arguments, configure_logging, execute, quiet_native_output

log = logging.getLogger("braintumor")


# stage name -> (module, function); imported on use so that `braintumor --help` stays fast
STAGES = {
    "fetch": ("braintumor.data.fetch", "fetch"),
    "dedup": ("braintumor.data.dedup", "dedup"),
    "split": ("braintumor.data.split", "split"),
    "train": ("braintumor.model.train", "train"),
    "evaluate": ("braintumor.quality.evaluate", "evaluate"),
    "review": ("braintumor.quality.review", "review"),
    "explain": ("braintumor.quality.explain", "explain"),
    "register": ("braintumor.registry.register", "register"),
}


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text!r})")
    return int(text)


def add_predict(sub) -> None:
    predict = sub.add_parser(
        "predict",
        help="classify image files with a shipped or registered model",
        description="Print P(tumor) and the label at the model's threshold for each image.",
    )
    predict.add_argument(
        "paths",
        nargs="*",
        help="images, DICOM files, NIfTI volumes (.nii, .nii.gz), zipped studies, or folders of any of them; "
        "DICOM is answered per series",
    )
    predict.add_argument(
        "--dicomweb", metavar="URL", help="a DICOMweb server (QIDO-RS and WADO-RS) to pull --study from"
    )
    predict.add_argument("--study", metavar="UID", help="the StudyInstanceUID to pull from --dicomweb")
    add_model_arguments(
        predict,
        "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, an MLflow model folder, or a .keras file "
        "with model.json beside it",
    )
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument("--explain", metavar="DIR", help="write an evidence-map overlay PNG per image into DIR")
    predict.add_argument("--batch-size", type=positive_int, default=32, help="images per model call (default 32)")


def add_model_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--model, --runtime and --max-pixels, which `predict` and `serve` share."""
    parser.add_argument(
        "--model", default="models:/brain-tumor-classifier@champion", help=f"{what} (default: %(default)s)"
    )
    parser.add_argument(
        "--runtime",
        choices=["auto", "onnx", "keras"],
        default="auto",
        help="what computes the answers: ONNX Runtime on the model's ONNX export (no TensorFlow), Keras, or "
        "auto: ONNX where the model has an export (default); evidence maps always use Keras",
    )
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse larger images (width x height) before decoding them (default %(default)s)",
    )


def quiet_libraries() -> None:
    """Keep TensorFlow's start-up chatter and MLflow's download bars off the output."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def add_serve(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="the triage web page and REST API over a model",
        description="Serve a model over HTTP: the page at /, the API under /v1 (docs at /docs).",
    )
    add_model_arguments(serve, "any reference `predict --model` takes, fixed at start-up")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=positive_int, default=8000, help="port (default: %(default)s)")
    serve.add_argument(
        "--poll-seconds",
        type=float,
        default=30.0,
        help="how often to look whether a models:/NAME@ALIAS reference moved (0: never; default 30)",
    )
    serve.add_argument("--max-body-mb", type=positive_int, default=100, help="request body limit (default 100)")
    serve.add_argument("--max-file-mb", type=positive_int, default=20, help="limit per uploaded file (default 20)")
    serve.add_argument("--max-files", type=positive_int, default=64, help="files per request (default 64)")
    serve.add_argument(
        "--keys",
        metavar="FILE",
        help="API keys (from `braintumor keys add`); required to bind beyond loopback; without it, no key is asked",
    )
    serve.add_argument(
        "--rate-limit", type=positive_int, default=600, help="scans a minute per key, on average (default 600)"
    )
    serve.add_argument("--burst", type=positive_int, default=64, help="scans a key may send at once (default 64)")
    serve.add_argument(
        "--audit-log",
        metavar="PATH",
        default="audit.jsonl",
        help="append-only JSON lines, one per request, nothing identifying (default: %(default)s)",
    )
    serve.add_argument(
        "--feedback-db",
        metavar="URL",
        help="SQLAlchemy URL of the database that keeps answers and readers' verdicts (default: SQLite "
        "feedback.db beside the audit log; postgresql://... for a site's server, shared by replicas)",
    )
    serve.add_argument(
        "--no-metrics", action="store_true", help="no GET /metrics (Prometheus; behind the `metrics` key scope)"
    )
    serve.add_argument(
        "--keep-feedback-scans",
        metavar="DIR",
        help="keep the model input (pixels only) of each scan a reader calls tumor or no tumor, in DIR "
        "(default: no pixels are kept; the page says so)",
    )
    serve.add_argument(
        "--dicomweb", metavar="URL", help="a DICOMweb server that POST /v1/studies/{uid}/predict pulls studies from"
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=4.0,
        help="how long a request waits for concurrent ones to share its model call (0: none; default 4)",
    )


def add_keys(sub) -> None:
    keys = sub.add_parser(
        "keys",
        help="create, revoke and list the API keys of `braintumor serve`",
        description="Keys are stored as SHA-256 digests; a new key is printed once and kept nowhere else.",
    )
    keys.add_argument("action", choices=["add", "revoke", "list"])
    keys.add_argument("id", nargs="?", help="the key's id (add, revoke): names it in the audit log")
    keys.add_argument("--keys", metavar="FILE", default="keys.json", help="the keys file (default: %(default)s)")
    keys.add_argument(
        "--scope",
        action="append",
        choices=list(SCOPES),
        help="what the key may do (repeat; default: predict and explain)",
    )


def add_watch(sub) -> None:
    watch = sub.add_parser(
        "watch",
        help="per site and period: volume, refusals, drift and estimated performance, from the audit log",
        description="Exit status 1 when an alert fired (for cron or CI), 2 on an error.",
    )
    add_model_arguments(watch, "the served model, whose answers on its test split are the reference")
    watch.add_argument("--audit-log", default="audit.jsonl", help="the server's audit log (rotated copies too)")
    watch.add_argument(
        "--split",
        help="for a model that ships no reference (model.json `reference`): the split whose test scans are it",
    )
    watch.add_argument("--period", choices=["day", "week"], default="week")
    watch.add_argument("--feedback-db", metavar="URL", help="readers' verdicts (default: feedback.db beside the log)")
    watch.add_argument("--out", default="watch", help="folder for watch.json and one PNG per site")


def run_watch(args) -> int:
    quiet_libraries()
    from braintumor.atomic import write_json
    from braintumor.errors import ModelLoadError
    from braintumor.serve.feedback import FeedbackStore
    from braintumor.serve.predict import load
    from braintumor.serve.watch import plot_site, reference_of, watch

    audit = Path(args.audit_log)
    if not audit.is_file():
        print(f"braintumor watch: error: {audit}: no such audit log (give --audit-log)", file=sys.stderr)
        return 2
    try:
        reference = reference_of(load(args.model, args.runtime), Path(args.split) if args.split else None)
    except (ModelLoadError, FileNotFoundError) as err:
        print(f"braintumor watch: error: {err}", file=sys.stderr)
        return 2
    beside = audit.resolve().with_name("feedback.db")
    store = args.feedback_db or (f"sqlite:///{beside}" if beside.is_file() else None)
    verdicts = {}
    if store:
        for scan, said in FeedbackStore(store).latest_by_scan().items():  # a scan only where its readers agree
            codes = {v["verdict"] for v in said}
            if len(codes) == 1 and codes <= {"tumor", "no_tumor"}:
                verdicts[scan] = codes.pop()
    report = watch(audit, reference, args.period, verdicts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "watch.json", report)
    by_site: dict[str, list[dict]] = {}
    for entry in report["sites"]:
        by_site.setdefault(entry["site"], []).append(entry)
    for site, entries in by_site.items():
        plot_site(entries, reference, out / f"site-{re.sub(r'[^A-Za-z0-9_.-]', '_', site)}.png")
        last = entries[-1]
        estimated = last.get("estimated", {})
        figures = ""
        if estimated:
            recall, specificity = estimated["recall_ci95"], estimated["specificity_ci95"]
            basis = estimated.get("recalibrated_on")
            figures = (
                f", est. recall {estimated['recall']:.2f} ({recall[0]:.2f}-{recall[1]:.2f}), specificity "
                f"{estimated['specificity']:.2f} ({specificity[0]:.2f}-{specificity[1]:.2f})"
                + (f" recalibrated on {basis['verdicts']} verdicts" if basis else "")
            )
        print(
            f"watch: site {site}, {last['period']}: {last['scans']} scans, refused {last['refusal_rate']:.0%}, "
            f"uncertain {last['uncertain_rate']:.0%}{figures}; alerts: {', '.join(last['alerts']) or 'none'}"
        )
    print(
        f"watch: {len(by_site)} sites, {len(report['sites'])} site-periods, {report['alerts']} with alerts; "
        f"{report['unreadable_lines']} unreadable log lines skipped; {out / 'watch.json'}"
    )
    return 1 if report["alerts"] else 0


def add_feedback(sub) -> None:
    feedback = sub.add_parser(
        "feedback",
        help="readers' verdicts into reviewed data: export proposals, accept or reject them",
        description="export: the proposals the readers' verdicts support, into --proposals. accept / reject: a "
        "reviewer's decision on proposals (ids, or --all), recorded with the reviewer's name.",
    )
    feedback.add_argument("action", choices=["export", "accept", "reject"])
    feedback.add_argument("ids", nargs="*", help="proposal ids (accept, reject)")
    feedback.add_argument("--all", action="store_true", help="every standing proposal (accept, reject)")
    feedback.add_argument("--reviewer", default="", help="who decides (accept, reject): kept with each decision")
    feedback.add_argument("--feedback-db", metavar="URL", default="sqlite:///feedback.db", help="the verdict store")
    feedback.add_argument("--kept", metavar="DIR", help="the server's --keep-feedback-scans folder")
    feedback.add_argument("--manifest", default="artifacts/fetch/manifest.csv", help="the images already in the data")
    feedback.add_argument("--proposals", default="labels/proposals.csv")
    feedback.add_argument("--decisions", default="labels/feedback_decisions.csv")
    feedback.add_argument("--data", default="data", help="the local source, where accepted scans go")
    feedback.add_argument("--overrides", default="labels/overrides.csv", help="where accepted relabels go")


def run_feedback(args) -> int:
    from braintumor.errors import SourceError
    from braintumor.serve.feedback import FeedbackStore
    from braintumor.serve.feedback_review import decide, export

    kept = Path(args.kept) if args.kept else None
    try:
        if args.action == "export":
            counts = export(
                FeedbackStore(args.feedback_db), kept, Path(args.manifest), Path(args.proposals), Path(args.decisions)
            )
            print(
                f"feedback export: {counts['scans']} scans with verdicts: {counts['add']} to add, "
                f"{counts['relabel']} to relabel, {counts['exclude']} to exclude, proposed in {args.proposals}; "
                f"{counts['disagreements']} where readers disagree, {counts['cant_tell']} can't tell, "
                f"{counts['tumor_series']} series read as tumor (slices not said), {counts['not_kept']} not kept"
            )
            return 0
        if not args.ids and not args.all:
            print("braintumor feedback: error: name proposal ids, or --all", file=sys.stderr)
            return 2
        decision = "accepted" if args.action == "accept" else "rejected"
        done = decide(
            None if args.all else args.ids,
            decision,
            args.reviewer,
            Path(args.proposals),
            Path(args.decisions),
            kept,
            Path(args.data),
            Path(args.overrides),
        )
    except SourceError as err:
        print(f"braintumor feedback: error: {err}", file=sys.stderr)
        return 2
    print(f"feedback {args.action}: {len(done)} proposals {decision} by {args.reviewer}; recorded in {args.decisions}")
    if decision == "accepted" and done:
        print("next: `dvc add data` if scans were added, then `dvc repro`")
    return 0


def run_keys(args) -> int:
    from braintumor.errors import AccessError
    from braintumor.serve.access import add_key, read_keys, revoke_key

    try:
        if args.action == "list":
            for key in read_keys(Path(args.keys)):
                print(f"{key.id}\t{','.join(key.scopes)}")
        elif not args.id:
            print(f"braintumor keys {args.action}: error: give the key's id", file=sys.stderr)
            return 2
        elif args.action == "add":
            print(add_key(Path(args.keys), args.id, args.scope or ["predict", "explain"]))
            print(f"key {args.id!r} added to {args.keys}; it is shown once, keep it", file=sys.stderr)
        else:
            revoke_key(Path(args.keys), args.id)
    except AccessError as err:
        print(f"braintumor keys: error: {err}", file=sys.stderr)
        return 2
    return 0


def add_compare(sub) -> None:
    compare = sub.add_parser(
        "compare",
        help="is experiment B better than A? paired bootstrap intervals of the differences",
        description="Recall, specificity and ROC AUC of two revisions on the same test and out-of-fold images, "
        "with the paired bootstrap 95 % interval of B - A.",
    )
    compare.add_argument("a", help="a DVC experiment name, a git revision, or `workspace`")
    compare.add_argument("b", help="the same for the other one")
    compare.add_argument("--resamples", type=positive_int, default=2000, help="bootstrap resamples (default 2000)")
    compare.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    compare.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")


def run_compare(args) -> int:
    from braintumor.errors import CompareError
    from braintumor.quality.compare import compare, table

    try:
        result = compare(args.a, args.b, args.resamples, args.seed)
    except CompareError as err:
        print(f"braintumor compare: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


def run_serve(args) -> int:
    quiet_libraries()
    from braintumor.errors import AccessError, ModelLoadError
    from braintumor.serve.access import AuditLog, RateLimit, check_exposure, read_keys
    from braintumor.serve.feedback import FeedbackStore, KeptScans
    from braintumor.serve.service import Access, Limits, create_app, serve

    limits = Limits(
        max_body_bytes=args.max_body_mb << 20,
        max_file_bytes=args.max_file_mb << 20,
        max_files=args.max_files,
        max_pixels=args.max_pixels,
    )
    try:
        keys = read_keys(Path(args.keys)) if args.keys else None
        check_exposure(args.host, keys)
        access = Access(keys, RateLimit(args.rate_limit, args.burst), AuditLog(Path(args.audit_log)))
        beside_audit = Path(args.audit_log).resolve().with_name("feedback.db")
        feedback = FeedbackStore(args.feedback_db or f"sqlite:///{beside_audit}")
        kept_scans = KeptScans(Path(args.keep_feedback_scans)) if args.keep_feedback_scans else None
        started = time.perf_counter()
        app = create_app(
            args.model,
            limits,
            args.poll_seconds,
            access,
            dicomweb=args.dicomweb,
            runtime=args.runtime,
            batch_wait_ms=args.batch_wait_ms,
            feedback=feedback,
            kept_scans=kept_scans,
            with_metrics=not args.no_metrics,
        )
        serve(app, args.host, args.port, time.perf_counter() - started)
    except (ModelLoadError, AccessError) as err:
        print(f"braintumor serve: error: {err}", file=sys.stderr)
        return 2
    return 0


def result_line(result: dict) -> str:
    """A result of `braintumor predict` as one tab-separated line: path (or series, kind and slice count), P(tumor)
    (or -), verdict[, reason]."""
    if "series" in result:
        result = {**result, "path": f"{result['series']} ({result['kind']}, {result['slices']} slices)"}
    if "error" in result:
        return f"{result['path']}\terror: {result['error']}"
    probability = f"{result['probability']:.4f}" if "probability" in result else "-"
    if result["status"] == "read":
        return f"{result['path']}\t{probability}\t{'tumor' if result['label'] else 'no_tumor'}"
    verdict = "uncertain" if result["status"] == "uncertain" else "not_read"
    return f"{result['path']}\t{probability}\t{verdict}\t{result['reason']}"


def run_predict(args) -> int:
    """Exit status 0 when every file was classified, 1 when some could not be read (they are reported)."""
    quiet_libraries()
    from braintumor.data.scans import is_clinical
    from braintumor.errors import ModelLoadError, SourceError
    from braintumor.serve.predict import (
        clinical_entries,
        listed_files,
        load,
        predict_in_chunks,
        predict_series,
        write_evidence_maps,
    )

    if bool(args.dicomweb) != bool(args.study) or not (args.paths or args.dicomweb):
        print("braintumor predict: error: give files or folders, or --dicomweb URL with --study UID", file=sys.stderr)
        return 2
    listed = listed_files(args.paths)
    series_files = {file for _, file in listed if is_clinical(file)}  # each file's head read once
    files = [file for _, file in listed if file not in series_files]
    clinical = [(source, file) for source, file in listed if file in series_files]
    if not listed and not args.dicomweb:
        print(f"braintumor predict: error: no image files in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    try:
        loaded = load(args.model, args.runtime)
        entries = clinical_entries(clinical)
        if args.dicomweb:
            from braintumor.data.dicomweb import study_entries

            entries += study_entries(args.dicomweb, args.study)
    except (ModelLoadError, SourceError) as err:
        print(f"braintumor predict: error: {err}", file=sys.stderr)
        return 2
    failed = written = 0
    statuses = collections.Counter()

    def answered():
        yield from predict_in_chunks(loaded, files, args.batch_size, args.max_pixels)
        if entries:
            yield predict_series(loaded, entries, args.batch_size, args.max_pixels)

    for results, shown in answered():
        for result in results:
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print(result_line(result))
            statuses[result.get("status", "unreadable")] += 1
            statuses["tumor"] += result.get("label") == 1
            statuses["series" if "series" in result else "images"] += "status" in result
        if args.explain:
            written += len(write_evidence_maps(loaded, results, shown, Path(args.explain), first=written))
        failed += sum("error" in r for r in results)
    if args.explain:
        log.info("predict: %d evidence maps in %s", written, args.explain)
    log.info(
        "predict: %d images and %d series: %d tumor suspected, %d uncertain (read first), %d not brain MR (not "
        "read), %d unreadable (threshold: P(tumor) %.4f)",
        statuses["images"],
        statuses["series"],
        statuses["tumor"],
        statuses["uncertain"],
        statuses["out_of_distribution"],
        failed,
        loaded.threshold,
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="braintumor", description=__doc__)
    parser.add_argument(
        "--verbose", action="store_true", help="let TensorFlow and other native libraries write to the terminal"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, _) in STAGES.items():
        add_arguments(sub.add_parser(name, help=f"run the `{name}` stage ({module})"))
    add_predict(sub)
    add_serve(sub)
    add_keys(sub)
    add_feedback(sub)
    add_watch(sub)
    add_compare(sub)
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE] = "1"
    if argv is None:  # a process of its own (tests call main with arguments, under pytest's capture)
        quiet_native_output()
    configure_logging()
    if args.command == "predict":
        return run_predict(args)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "watch":
        return run_watch(args)
    if args.command == "feedback":
        return run_feedback(args)
    if args.command == "keys":
        return run_keys(args)
    if args.command == "compare":
        return run_compare(args)
    module, function = STAGES[args.command]
    return execute(args.command, getattr(importlib.import_module(module), function), args.params)


if __name__ == "__main__":
    sys.exit(main())
