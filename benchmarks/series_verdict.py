"""The series verdict (issue 29): its false alarms on healthy volumes, its recall, and its time on 150 slices.

No labelled volumes exist here, so the rule of `model/series_verdict.py` (two adjacent slices read as tumor) is
measured three ways, on the shipped model:

1. Healthy volumes that ship in packages: nilearn's MNI152 brain at 1 and 2 mm and nibabel's `anatomical.nii`,
   read as NIfTI (their axial brain slices), and the MNI152 1 mm volume written as a DICOM series.
2. Series built from the test split's scans: `--series` series of `--slices` healthy test scans each (drawn at
   random), and the same with a run of 2 or 3 tumor test scans put in at a random place. The share called tumor
   is the rule's false-positive rate and recall; beside it, the rule "any slice read as tumor" on the same series.
   Tumor slices drawn from different patients are less alike than a real lesion's neighbours, so recall here is a
   floor. Intervals: 95 % bootstrap over the test scans (the series are redrawn from resampled scans).
3. Time: one 150-slice axial DICOM series of the MNI152 brain through `braintumor predict`'s series path (read,
   group, order, render, prepare, score, verdict), median of `--repeats`, model already loaded.

    python benchmarks/series_verdict.py [--model models/model.keras] [--out metrics/series_verdict.json]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time

import nibabel as nib
import numpy as np

from braintumor.atomic import write_json
from braintumor.data.datasets import load_split
from braintumor.stage import configure_logging, quiet_native_output

log = logging.getLogger("series_verdict")


def mni152(resolution: int) -> nib.Nifti1Image:
    from nilearn.datasets import load_mni152_template

    return load_mni152_template(resolution=resolution)


def dicom_series(image: nib.Nifti1Image, slices: int) -> list[tuple[str, str, bytes]]:
    """`slices` axial slices from the middle of a volume, as the files of one MR series (12-bit, positioned)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    volume = np.asarray(nib.as_closest_canonical(image).dataobj, dtype=np.float64)
    volume = np.round(volume / volume.max() * 4000).astype(np.uint16)
    start = (volume.shape[2] - slices) // 2
    series, study, entries = generate_uid(), generate_uid(), []
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "MR", series, study
        pixels = np.ascontiguousarray(np.rot90(volume[:, :, start + k]))
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(start + k)]
        ds.InstanceNumber = k + 1
        ds.PixelData = pixels.tobytes()
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        entries.append(("mni152", f"mni152#{k}", out.getvalue()))
    return entries


def simulated(answers: list[dict], labels: np.ndarray, series: int, slices: int, seed: int) -> dict[str, float]:
    """Share of random healthy series called tumor (the rule, and any-slice), and recall with 2 or 3 adjacent
    tumor scans put in."""
    from braintumor.model.series_verdict import series_answer

    rng = np.random.default_rng(seed)
    healthy, tumor = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    called = {"fp_rule": 0, "fp_any_slice": 0, "recall_rule_run2": 0, "recall_rule_run3": 0}
    for _ in range(series):
        rows = list(rng.choice(healthy, slices))
        members = [answers[r] for r in rows]
        called["fp_rule"] += series_answer(members)["label"] == 1
        called["fp_any_slice"] += any(a.get("label") == 1 for a in members)
        for run in (2, 3):
            at = int(rng.integers(0, slices - run + 1))
            mixed = rows[:at] + list(rng.choice(tumor, run)) + rows[at + run :]
            called[f"recall_rule_run{run}"] += series_answer([answers[r] for r in mixed])["label"] == 1
    return {key: value / series for key, value in called.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model.keras")
    parser.add_argument("--split", default="artifacts/split")
    parser.add_argument("--series", type=int, default=2000, help="simulated series per draw")
    parser.add_argument("--slices", type=int, default=20, help="healthy slices in a simulated series")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples of the test scans")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the 150-slice series")
    parser.add_argument("--out", default="metrics/series_verdict.json")
    args = parser.parse_args(argv)
    quiet_native_output()
    configure_logging()
    from braintumor.data.scans import read_scans
    from braintumor.model.assessment import score
    from braintumor.serve.predict import load, predict_series

    loaded = load(args.model)
    names = loaded.info["class_names"]
    result = {"model": args.model, "rule": "two adjacent slices read as tumor", "volumes": {}}
    volumes = {"MNI152 1 mm (NIfTI)": mni152(1), "MNI152 2 mm (NIfTI)": mni152(2)}
    from nibabel.testing import data_path

    volumes["nibabel anatomical.nii"] = nib.load(f"{data_path}/anatomical.nii")
    entries = {name: [(name, "volume.nii", image.to_bytes())] for name, image in volumes.items()}
    entries["MNI152 1 mm as a 150-slice DICOM series"] = dicom_series(volumes["MNI152 1 mm (NIfTI)"], 150)
    for name, files in entries.items():
        (record,), _ = predict_series(loaded, files)
        statuses = [s["status"] for s in record["slice_results"]]
        result["volumes"][name] = {
            "slices": record["slices"],
            "status": record["status"],
            "label": record["label"],
            "probability": record.get("probability"),
            "slices_read_as_tumor": sum(s.get("label") == 1 for s in record["slice_results"]),
            "slices_uncertain": statuses.count("uncertain"),
            "slices_not_read": statuses.count("out_of_distribution"),
        }
        log.info("%s: %s", name, result["volumes"][name])

    test = load_split(args.split, "test", loaded.info["task"])
    answers = loaded.assessor.answers(score(loaded.scorer, test["x"], names))
    labels = np.asarray(test["y"])
    point = simulated(answers, labels, args.series, args.slices, seed=0)
    rng = np.random.default_rng(1)
    draws = []
    for k in range(args.resamples):
        rows = rng.integers(0, len(labels), len(labels))
        draws.append(simulated([answers[r] for r in rows], labels[rows], args.series // 10, args.slices, seed=k + 2))
    result["simulated"] = {
        "series": args.series,
        "healthy_slices_per_series": args.slices,
        "test_scans": {"healthy": int((labels == 0).sum()), "tumor": int((labels == 1).sum())},
        **{
            key: {
                "value": round(value, 4),
                "ci95": [round(float(np.percentile([d[key] for d in draws], q)), 4) for q in (2.5, 97.5)],
            }
            for key, value in point.items()
        },
    }
    log.info("simulated series: %s", result["simulated"])

    files = entries["MNI152 1 mm as a 150-slice DICOM series"]
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        predict_series(loaded, files)
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    read_scans(files, None)
    reading = time.perf_counter() - started
    result["time_150_slices_s"] = {"median": round(float(np.median(times)), 3), "read_and_render": round(reading, 3)}
    log.info("150-slice DICOM series: median %.2f s (reading and rendering %.2f s)", np.median(times), reading)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
