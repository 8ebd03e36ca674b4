"""DICOM and NIfTI in: rendering, series grouping and order, refusals, the series verdict, and no patient data out.

DICOM files are written here with pydicom from nilearn's MNI152 brain (real anatomy) or taken from pydicom's
bundled samples; NIfTI from nibabel's bundled `anatomical.nii` and the MNI152 template.
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
import subprocess
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from braintumor import cli
from braintumor.data import scans
from braintumor.data.dicom import read_dicom
from braintumor.data.images import prepare, to_grayscale
from braintumor.data.scans import read_scans
from braintumor.model.series_verdict import series_answer

from fixtures import dicom
from fixtures.dicom import dicom_bytes

# Identifiers planted in every DICOM written here: none may reach an output, a log line or an answer.
PATIENT = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "PID-7731-XQ",
    "PatientBirthDate": "19580312",
    "AccessionNumber": "ACC99812",
    "InstitutionName": "St Elsewhere Clinic",
    "ReferringPhysicianName": "House^Gregory",
    "DeviceSerialNumber": "SN-42-ZZ",
    "StudyDate": "20240117",
}


@pytest.fixture(scope="module")
def mni() -> np.ndarray:
    """nilearn's MNI152 T1 template (2 mm), RAS, float32, scaled to 0-1000 as a 12-bit MR scanner stores it."""
    from nilearn import datasets

    template = nib.as_closest_canonical(datasets.load_mni152_template(resolution=2))
    return np.asarray(template.dataobj, np.float32) * 1000


def mr_dataset(pixels: np.ndarray, **elements) -> Dataset:
    """A DICOM MR image of `pixels` with the planted identifiers; `elements` override."""
    return dicom.mr_dataset(pixels, **{**PATIENT, **elements})


def axial_series(
    volume: np.ndarray, indices, orientation=(1, 0, 0, 0, 1, 0), study: str | None = None, **elements
) -> list[Dataset]:
    """One DICOM per axial slice of `volume`, positioned along the normal of `orientation` at 2 mm spacing, in a
    new series of `study` (a new one when None)."""
    normal = np.cross(orientation[:3], orientation[3:])
    series, study = generate_uid(), study or generate_uid()
    out = []
    for number, index in enumerate(indices, start=1):
        pixels = np.rot90(volume[:, :, index]).astype(np.uint16)
        ds = mr_dataset(pixels, **elements)
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [float(v) for v in 2.0 * index * normal + np.array([-90.0, -126.0, 0.0])]
        ds.InstanceNumber = number
        out.append(ds)
    return out


def test_window_is_the_one_rendering_and_a_png_export_reads_alike(mni):
    """Slope/intercept, then the window; a viewer's 8-bit PNG export of the DICOM gives the same model input."""
    stored = np.rot90(mni[:, :, 40]).astype(np.uint16)
    ds = mr_dataset(stored, RescaleSlope=0.5, RescaleIntercept=-20, WindowCenter=250, WindowWidth=400)
    frame = read_dicom("a.dcm", dicom_bytes(ds), None).frames[0]
    values = stored * 0.5 - 20
    expected = np.clip((values - (250 - 0.5 - 399 / 2)) / 399 * 255, 0, 255)
    assert frame.std() > 20 and (frame == 255).mean() < 0.2
    assert np.abs(frame.astype(int) - np.round(expected)).max() <= 1
    from pydicom.pixels import apply_voi_lut  # a viewer's own rendering (pydicom's), exported as an 8-bit PNG

    windowed = mr_dataset(stored, WindowCenter=520, WindowWidth=800)
    shown = apply_voi_lut(stored, windowed)  # onto the stored range, 0-65535
    png = io.BytesIO()
    Image.fromarray(np.round(shown / 65535 * 255).astype(np.uint8)).save(png, format="PNG")
    from_png = prepare(to_grayscale(Image.open(io.BytesIO(png.getvalue()))), 96)
    from_dicom = prepare(read_dicom("w.dcm", dicom_bytes(windowed), None).frames[0], 96)
    assert from_dicom.std() > 20 and np.abs(from_dicom.astype(int) - from_png.astype(int)).max() <= 1


def test_monochrome1_signed_and_12_bit_pixels_render_as_the_same_anatomy(mni):
    base = np.rot90(mni[:, :, 45]).astype(np.float64)
    top = base.max()
    for window_of in ({"WindowCenter": 520, "WindowWidth": 800}, {}):  # the header's window, and the fallback
        plain = read_dicom("a", dicom_bytes(mr_dataset(base.astype(np.uint16), **window_of)), None).frames[0]
        assert plain.std() > 20
        mirrored = {"WindowCenter": top - 519, "WindowWidth": 800} if window_of else {}
        inverted = mr_dataset((top - base).astype(np.uint16), PhotometricInterpretation="MONOCHROME1", **mirrored)
        signed = mr_dataset((base - 3000).astype(np.int16), RescaleIntercept=3000, RescaleSlope=1, **window_of)
        twelve = mr_dataset((base * 4).astype(np.uint16), BitsStored=12, HighBit=11, RescaleSlope=0.25, **window_of)
        for ds in (inverted, signed, twelve):
            frame = read_dicom("b", dicom_bytes(ds), None).frames[0]
            assert np.abs(frame.astype(int) - plain.astype(int)).max() <= 2, ds.PhotometricInterpretation


def test_compressed_syntaxes_decode_to_the_uncompressed_pixels_or_are_refused_by_name():
    plain = read_dicom("mr", Path(get_testdata_file("MR_small.dcm")).read_bytes(), None).frames[0]
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        frame = read_dicom(name, Path(get_testdata_file(name)).read_bytes(), None).frames[0]
        assert np.array_equal(frame, plain), name
    lossless_jpeg = Path(get_testdata_file("SC_rgb_jpeg_gdcm.dcm")).read_bytes()
    with pytest.raises(Exception) as err:
        read_dicom("sc.dcm", lossless_jpeg, None)
    assert err.value.reason == "unsupported_transfer_syntax" and "JPEG Lossless" in err.value.detail
    with pytest.raises(Exception) as err:
        read_dicom("sr.dcm", Path(get_testdata_file("reportsi.dcm")).read_bytes(), None)
    assert err.value.reason == "no_pixel_data" and "SR" in err.value.detail


def test_series_are_grouped_by_uid_not_folder_and_non_mr_is_refused():
    folder = Path(get_testdata_file("MR_small.dcm")).parent / "dicomdirtests/98892003/MR2"
    entries = [("MR2", f"MR2#{k}", p.read_bytes()) for k, p in enumerate(sorted(folder.iterdir()))]
    series, errors = read_scans(entries, None)
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in folder.iterdir()}
    assert not errors and len(series) == len(uids) > 1  # one folder, several series
    assert sum(s.files for s in series) == len(entries)
    ct, _ = read_scans([("ct", "ct.dcm", Path(get_testdata_file("CT_small.dcm")).read_bytes())], None)
    assert ct[0].refusal.text.startswith("a CT series") and not ct[0].slices == []


@pytest.mark.parametrize(
    "orientation",
    [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 0.8660254, -0.5)],
    ids=["axial", "sagittal", "oblique"],
)
def test_slices_come_back_in_anatomical_order_whatever_the_file_order(mni, orientation):
    indices = list(range(30, 40))
    datasets = axial_series(mni, indices, orientation)
    expected = [read_dicom("x", dicom_bytes(ds), None).frames[0] for ds in datasets]
    shuffled = list(zip(indices, datasets, strict=True))
    random.Random(3).shuffle(shuffled)
    for _, ds in shuffled:
        del ds.InstanceNumber  # the position alone must order them
    series, _ = read_scans([("s", f"s#{k}", dicom_bytes(ds)) for k, (_, ds) in enumerate(shuffled)], None)
    assert len(series) == 1
    assert all(np.array_equal(a, b) for a, b in zip(series[0].slices, expected, strict=True))


def test_instance_number_orders_a_series_without_positions_and_multi_frame_objects_split(mni):
    datasets = axial_series(mni, range(30, 36))
    for ds in datasets:
        del ds.ImagePositionPatient
    expected = [read_dicom("x", dicom_bytes(ds), None).frames[0] for ds in datasets]
    series, _ = read_scans([("s", f"s#{k}", dicom_bytes(ds)) for k, ds in reversed(list(enumerate(datasets)))], None)
    assert all(np.array_equal(a, b) for a, b in zip(series[0].slices, expected, strict=True))
    stack = np.stack([np.rot90(mni[:, :, k]).astype(np.uint16) for k in range(30, 36)])
    multi = read_dicom("m", dicom_bytes(mr_dataset(stack)), None)
    assert len(multi.frames) == 6 and not np.array_equal(multi.frames[0], multi.frames[-1])


def test_a_nifti_volume_is_one_series_of_its_axial_brain_slices_in_any_orientation(mni):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ras = nib.Nifti1Image(mni, affine)
    flipped = nib.Nifti1Image(mni[::-1, :, ::-1].copy(), np.diag([-2.0, 2.0, -2.0, 1.0]))  # LAI: same anatomy
    read = [read_scans([("v", "v.nii", img.to_bytes())], None)[0][0] for img in (ras, flipped)]
    assert read[0].kind == "nifti" and 10 < len(read[0].slices) < mni.shape[2]
    assert all(np.array_equal(a, b) for a, b in zip(read[0].slices, read[1].slices, strict=True))
    from nibabel.testing import data_path

    anatomical = Path(data_path) / "anatomical.nii"
    series, errors = read_scans([("a", "anatomical.nii", anatomical.read_bytes())], None)
    assert not errors and series[0].slices
    bad, errors = read_scans([("b", "broken.nii.gz", b"\x1f\x8b" + b"\x00" * 50)], None)
    assert not bad and errors[0][2].startswith("unreadable_volume")


def test_a_zipped_study_reads_as_its_files_and_a_bomb_is_refused_from_its_directory(mni, monkeypatch):
    datasets = axial_series(mni, range(30, 34))
    loose, _ = read_scans([("s", f"s#{k}", dicom_bytes(ds)) for k, ds in enumerate(datasets)], None)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for k, ds in enumerate(datasets):
            out.writestr(f"Doe_Jane/IM{k}", dicom_bytes(ds))
    zipped, errors = read_scans([("study.zip", "study.zip", archive.getvalue())], None)
    assert not errors and [s.name for s in zipped] == [s.name for s in loose]
    assert all(np.array_equal(a, b) for a, b in zip(zipped[0].slices, loose[0].slices, strict=True))
    monkeypatch.setattr(scans, "MAX_ZIP_BYTES", 1 << 20)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("zeros", bytes(4 << 20))  # 4 MB from a few KB
    _, errors = read_scans([("bomb.zip", "bomb.zip", bomb.getvalue())], None)
    assert errors[0][2].startswith("too_large") and "Doe" not in errors[0][2]


def answer(status: str, probability: float | None = None, label: int | None = None) -> dict:
    out = {"status": status, "label": label}
    if probability is not None:
        out["probability"] = probability
    return out


def test_the_series_rule_needs_two_adjacent_positive_slices():
    healthy = [answer("read", p, 0) for p in (0.1, 0.2, 0.05)]
    assert series_answer(healthy) == {"status": "read", "label": 0, "probability": 0.1, "driving_slices": [0, 1]}
    pair = healthy[:1] + [answer("read", 0.9, 1), answer("read", 0.8, 1)] + healthy[1:]
    assert series_answer(pair) | {} == {"status": "read", "label": 1, "probability": 0.8, "driving_slices": [1, 2]}
    lone = [answer("read", 0.9, 1), answer("read", 0.1, 0), answer("read", 0.95, 1)]
    verdict = series_answer(lone)
    assert verdict["status"] == "uncertain" and verdict["label"] is None and verdict["driving_slices"] == [0, 2]
    gap = [answer("read", 0.9, 1), answer("out_of_distribution"), answer("read", 0.9, 1)]
    assert series_answer(gap)["status"] == "uncertain"  # a slice not read breaks adjacency
    assert series_answer([answer("out_of_distribution")] * 3)["status"] == "out_of_distribution"


@pytest.fixture(scope="module")
def patient_study(mni, tmp_path_factory) -> Path:
    """The folder a user names on the command line, holding a hospital-style export: a folder named after the
    patient with two MR series (file names after the patient too) and a CT slice. Names the user typed may be
    echoed; names inside it, chosen by the export, never."""
    export = tmp_path_factory.mktemp("export")
    root = export / "Doe_Jane_PID-7731-XQ"
    study = generate_uid()
    for name, indices in (("T1_AX", range(28, 40)), ("T2_AX", range(30, 36))):
        for k, ds in enumerate(axial_series(mni, indices, study=study)):
            (root / name).mkdir(parents=True, exist_ok=True)
            ds.save_as(root / name / f"Doe_Jane_{k:03d}.dcm", enforce_file_format=True)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in PATIENT.items():
        setattr(ct, keyword, value)
    ct.save_as(root / "Doe_Jane_ct.dcm")
    return export


def planted_in(text: str | bytes, study: Path) -> list[str]:
    """The identifiers planted in `study` that `text` holds: header values, the names the export chose (its
    patient folder, series folders and files) and the DICOM UIDs."""
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in study.rglob("*.dcm")}
    values = [*PATIENT.values(), "Doe_Jane", "T1_AX", "T2_AX", *uids]
    if isinstance(text, bytes):
        return [v for v in values if v.encode() in text]
    return [v for v in values if v in text]


def test_the_leak_check_catches_a_planted_name_in_a_log_line(
    trained_states, patient_study, capsys, caplog, monkeypatch
):
    """A broken variant of predict that logs each DICOM file it reads: the check of the tests below fails on it."""
    from braintumor.serve import predict

    real = predict.clinical_entries

    def entries_logged(listed):
        for _, file in listed:
            logging.getLogger("braintumor.serve.predict").info("reading %s", file)
        return real(listed)

    monkeypatch.setattr(predict, "clinical_entries", entries_logged)
    model = str(trained_states["seed_cnn"][0] / "models/model.keras")
    assert cli.main(["predict", "--json", "--model", model, str(patient_study)]) == 0
    out = capsys.readouterr()
    assert planted_in(caplog.text, patient_study) and not planted_in(out.out, patient_study)


@pytest.fixture(scope="module")
def ungated_model(trained_states, tmp_path_factory) -> str:
    """A copy of the seed_cnn state's shipped model without its out-of-distribution gate: a model trained for
    seconds on synthetic images refuses the MNI152 slices, and a refused series has no evidence maps to check."""
    models = tmp_path_factory.mktemp("ungated") / "models"
    shutil.copytree(trained_states["seed_cnn"][0] / "models", models)
    info = json.loads((models / "model.json").read_text())
    del info["gate"]
    (models / "model.json").write_text(json.dumps(info))
    return str(models / "model.keras")


def test_predict_answers_per_series_and_leaks_no_patient_data(ungated_model, patient_study, capsys, caplog, tmp_path):
    model = ungated_model
    code = cli.main(["predict", "--json", "--model", model, "--explain", str(tmp_path), str(patient_study)])
    out = capsys.readouterr()
    records = [json.loads(line) for line in out.out.splitlines()]
    assert code == 0 and len(records) == 3
    ct = [r for r in records if r["slices"] == 1][0]
    assert ct["status"] == "out_of_distribution" and "CT" in ct["reason"] and ct["slice_results"] == []
    for record in (r for r in records if r["slices"] > 1):
        assert record["kind"] == "dicom" and record["series"].startswith("series-")
        assert len(record["slice_results"]) == record["slices"] == record["files"]
        assert record["status"] in ("read", "uncertain")  # no gate: the MR series are read
        assert record == {**record, **series_answer(record["slice_results"])}  # the verdict is the rule's
    maps = sorted(p.name for p in tmp_path.glob("*.png"))  # the evidence maps of the slices that drove each verdict
    driving = [f"{r['series']}-slice{k}" for r in records for k in r["driving_slices"]]
    assert driving and len(maps) == len(driving)
    assert all(any(name.endswith(f"-{slice_}.png") for name in maps) for slice_ in driving)
    assert "predict: 0 images and 3 series" in caplog.text  # the check below sees the INFO lines
    assert not planted_in(out.out + out.err + caplog.text + " ".join(maps), patient_study)
    assert not any(planted_in(path.read_bytes(), patient_study) for path in tmp_path.glob("*.png"))


def test_series_names_depend_on_the_local_salt(mni, monkeypatch):
    data = [("s", "s#0", dicom_bytes(axial_series(mni, [30])[0]))]
    monkeypatch.setenv(scans.SALT_ENV, "one")
    first = read_scans(data, None)[0][0].name
    assert read_scans(data, None)[0][0].name == first
    monkeypatch.setenv(scans.SALT_ENV, "two")
    assert read_scans(data, None)[0][0].name != first


def test_the_service_answers_a_zipped_study_and_loose_dicom_per_series_and_keeps_no_patient_data(
    trained_states, patient_study, tmp_path, caplog
):
    from fastapi.testclient import TestClient

    from braintumor.serve.access import AuditLog
    from braintumor.serve.service import Access, create_app

    patient = patient_study / "Doe_Jane_PID-7731-XQ"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted((patient / "T1_AX").iterdir()):
            out.write(path, f"{patient.name}/T1_AX/{path.name}")
    loose = sorted((patient / "T2_AX").iterdir())
    image = io.BytesIO()
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(image, format="PNG")
    uploads = [("files", ("study.zip", archive.getvalue()))]
    uploads += [("files", (f"t2-{k}.dcm", path.read_bytes())) for k, path in enumerate(loose)]
    uploads += [("files", ("scan.png", image.getvalue())), ("files", ("ct.dcm", b"DICM cut short"))]
    audit = tmp_path / "audit.jsonl"
    model = str(trained_states["seed_cnn"][0] / "models/model.keras")
    with TestClient(create_app(model, access=Access(audit=AuditLog(audit)))) as client:
        answer = client.post("/v1/predict", files=uploads)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r.get("kind", "image" if "error" not in r else "error") for r in results] == [
        "dicom",
        "dicom",
        "image",
        "error",
    ]
    assert [r["slices"] for r in results[:2]] == [12, 6] and results[2]["filename"] == "scan.png"
    logged = [json.loads(line) for line in audit.read_text().splitlines()][-1]["scans"]
    assert [len(s.get("inputs_sha256", [s.get("input_sha256")])) for s in logged] == [1, 6, 1, 1]
    assert not planted_in(answer.text + audit.read_text() + caplog.text, patient_study)


def test_real_processes_write_no_patient_data_anywhere(ungated_model, patient_study, tmp_path):
    """`braintumor predict` and `braintumor serve` as a user runs them, verbose: their terminal output, the audit
    log, the evidence maps and every other file they write (in their folder, home or temporary folder)."""
    import requests

    from fixtures.servers import BIN, free_port, serving, tool_env

    work, home, scratch = (tmp_path / name for name in ("work", "home", "tmp"))
    for folder in (work, home, scratch):
        folder.mkdir()
    env = tool_env(HOME=str(home), TMPDIR=str(scratch))
    model = ungated_model
    command = [str(BIN / "braintumor"), "--verbose", "predict", "--json", "--model", model, "--explain", "maps"]
    predicted = subprocess.run(
        [*command, str(patient_study)], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert predicted.returncode == 0 and len(predicted.stdout.splitlines()) == 3, predicted.stderr[-2000:]
    assert "predict: 0 images and 3 series" in predicted.stderr and list((work / "maps").glob("*.png"))

    patient = patient_study / "Doe_Jane_PID-7731-XQ"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:  # the export's own names inside the archive
        for path in sorted(patient.rglob("*.dcm")):
            out.write(path, path.relative_to(patient_study).as_posix())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [str(BIN / "braintumor"), "--verbose", "serve", "--model", model, "--port", str(port)]
    serve += ["--audit-log", "audit.jsonl", "--keep-feedback-scans", "kept"]
    with serving(serve, f"{url}/readyz", work / "serve.log", env, cwd=work):
        answer = requests.post(f"{url}/v1/predict", files=[("files", ("study.zip", archive.getvalue()))], timeout=300)
        assert answer.status_code == 200 and len(answer.json()["results"]) == 3, answer.text
        for result in answer.json()["results"]:  # a reader's verdict on each: the series' pixels are kept
            verdict = {"request_id": answer.json()["request_id"], "scan_sha256": result["scan_sha256"]}
            verdict["verdict"] = "not_brain_mr" if result["status"] == "out_of_distribution" else "tumor"
            assert requests.post(f"{url}/v1/feedback", json=verdict, timeout=60).status_code == 201
        one = next(patient.glob("T1_AX/*.dcm"))
        explained = requests.post(f"{url}/v1/explain", files={"file": ("slice.dcm", one.read_bytes())}, timeout=300)
        assert explained.status_code == 200
    assert "warmed up" in (work / "serve.log").read_text()  # the server's INFO lines were captured (no access log)

    assert not planted_in(predicted.stdout + predicted.stderr + answer.text, patient_study)
    written = [path for folder in (work, home, scratch) for path in folder.rglob("*") if path.is_file()]
    assert {"serve.log", "audit.jsonl", "feedback.db", "slice-000.png"} <= {path.name for path in written}
    for path in written:
        assert not planted_in(path.relative_to(tmp_path).as_posix(), patient_study), path
        assert not planted_in(path.read_bytes(), patient_study), path


def test_a_study_pulled_from_a_real_dicomweb_server_reads_as_the_files_do(
    trained_states, patient_study, tmp_path, capsys
):
    """Orthanc on loopback: STOW-RS stores the export, `predict --dicomweb` and the server's study endpoint pull
    it back over QIDO-RS and WADO-RS and answer exactly as the files on disk."""
    from dicomweb_client.api import DICOMwebClient
    from fastapi.testclient import TestClient

    from braintumor.serve.service import create_app

    from fixtures.servers import orthanc

    model = str(trained_states["seed_cnn"][0] / "models/model.keras")
    files = sorted((patient_study / "Doe_Jane_PID-7731-XQ").glob("T*/*.dcm"))
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    with orthanc(tmp_path) as url:
        DICOMwebClient(url).store_instances([pydicom.dcmread(p) for p in files])
        assert cli.main(["predict", "--json", "--model", model, "--dicomweb", url, "--study", study]) == 0
        pulled = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        with TestClient(create_app(model, dicomweb=url)) as client:
            answer = client.post(f"/v1/studies/{study}/predict")
            unknown = client.post("/v1/studies/1.2.3.4/predict")
        assert cli.main(["predict", "--model", model, "--dicomweb", url, "--study", "1.2.3.4"]) == 2
        assert "no such study" in capsys.readouterr().err
    assert cli.main(["predict", "--json", "--model", model, *map(str, files)]) == 0
    local = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # the service also names each scan by its digest, for readers' verdicts (the command line has none)
    strip = lambda records: sorted(  # noqa: E731
        ({k: v for k, v in r.items() if k not in ("source", "scan_sha256")} for r in records), key=str
    )
    assert len(pulled) == 2 and strip(pulled) == strip(local)
    assert answer.status_code == 200 and strip(answer.json()["results"]) == strip(local)
    assert unknown.status_code == 502 and "no such study" in unknown.json()["detail"]
    for value in PATIENT.values():
        assert value not in answer.text and value not in json.dumps(pulled)


def test_dicom_and_nifti_in_data_become_slices_grouped_by_patient_without_names(mni, in_tmp):
    """data/<class>/ takes a hospital export: each series' brain slices enter the manifest with the patient as
    their group (the split keeps it on one side), nothing identifying in the manifest or the skipped list."""
    import copy

    import pandas as pd

    from braintumor.data.fetch import fetch
    from braintumor.data.split import assign_splits
    from braintumor.params import load_params

    from conftest import REPO

    for patient in range(4):
        study = generate_uid()
        for series, indices in enumerate((range(26, 34), range(30, 36))):
            for k, ds in enumerate(axial_series(mni, indices, study=study)):
                ds.PatientID = f"PID-7731-X{patient}"
                folder = in_tmp / f"data/tumor/Doe_Jane_{patient}/S{series}"
                folder.mkdir(parents=True, exist_ok=True)
                ds.save_as(folder / f"Doe_Jane_{k}.dcm", enforce_file_format=True)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.PatientName = PATIENT["PatientName"]
    ct.save_as(in_tmp / "data/tumor/Doe_Jane_ct.dcm")
    (in_tmp / "data/no_tumor").mkdir(parents=True)
    (in_tmp / "data/no_tumor/Doe_Jane_t1.nii.gz").write_bytes(
        nib.Nifti1Image(mni, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes()
    )
    (in_tmp / "data/no_tumor/Doe_Jane_broken.dcm").write_bytes(bytes(128) + b"DICM" + b"\x00" * 20)
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["fetch"]["workers"] = 1
    for name, source in params["fetch"]["sources"].items():
        source["enabled"] = name == "local"
    metrics = fetch(params)
    manifest = pd.read_csv("artifacts/fetch/manifest.csv", keep_default_na=False)
    tumor, healthy = manifest[manifest.label == 1], manifest[manifest.label == 0]
    assert tumor.group.nunique() == 4 and all(g.startswith("patient-") for g in tumor.group)
    assert 4 * 2 <= len(tumor) <= 4 * 14 and healthy.group.nunique() == 1 and len(healthy) > 10
    skipped = pd.read_csv("artifacts/fetch/skipped.csv")
    assert sorted(skipped.reason) == ["no_pixel_data", "not_mr"]
    assert metrics["per_source"]["local"]["images"] == len(manifest)
    split = assign_splits(manifest, {"train": 0.5, "val": 0.25, "test": 0.25}, 7)
    assert (manifest.assign(split=split).groupby("group").split.nunique() == 1).all()
    written = "".join(p.read_text() for p in (in_tmp / "artifacts/fetch").glob("*.csv"))
    written += (in_tmp / "metrics/fetch.json").read_text()
    for value in ("Doe", "Jane", "PID-7731", "S0/", PATIENT["PatientName"]):
        assert value not in written, value
