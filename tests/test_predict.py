"""`braintumor predict` and `mlflow models serve` on the registered champion, each in a fresh process."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest
import requests

from braintumor import cli
from braintumor.data.images import model_input
from braintumor.errors import ModelLoadError
from braintumor.model.calibration import calibrated
from braintumor.registry.register import register
from braintumor.serve.predict import image_files, load, predict

from conftest import brain_image, save
from fixtures.servers import BIN, free_port, serving, tool_env
from fixtures.split import synthetic_scan

MODEL = "models:/predict-model@champion"


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """New scans in every form a user may have, plus files that are not images. The scans are tumors like those
    the test models learnt from (`synthetic_scan`): their gate lets these through, so they are scored."""
    root = tmp_path_factory.mktemp("scans")
    save(root / "gray.png", synthetic_scan(1, True, 120)[..., 0])
    save(root / "nested/rgba.png", synthetic_scan(3, True, 90)[..., 0], mode="RGBA")
    save(root / "sixteen_bit.png", synthetic_scan(4, True, 64)[..., 0], mode="I;16")
    save(root / "odd_size.jpg", synthetic_scan(3, True, 200)[:173, 20:151, 0], mode="RGB")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image: listed with an error, never passed over")
    return root


@pytest.fixture(scope="module")
def registered(mlflow_server, trained_states, tmp_path_factory):
    """The seed_cnn state registered as champion of `predict-model` on the session's tracking server."""
    workspace, params = trained_states["seed_cnn"]
    params = copy.deepcopy(params)
    params["register"].update(experiment="predict", model_name="predict-model")
    with pytest.MonkeyPatch.context() as patch, contextlib.chdir(workspace):
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        patch.setenv("DVC_ROOT", str(tmp_path_factory.mktemp("predict-root")))
        assert register(params)["champion_version"] == 1
    return workspace


def expected(workspace: Path, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(raw score, calibrated P(tumor)) straight from the workspace's Keras model and the calibration in its
    model.json, on the shared preprocessing."""
    model = keras.saving.load_model(workspace / "models/model.keras")
    info = json.loads((workspace / "models/model.json").read_text())
    size = info["image_size"]
    raw = model.predict(np.stack([model_input(f, size) for f in files]).astype("float32"), verbose=0)[:, 0]
    return raw, calibrated(raw, info["calibration"])


def test_folders_expand_to_their_images(scans):
    names = {p.relative_to(scans).as_posix() for p in image_files([str(scans)])}
    assert names == {
        "gray.png",
        "nested/rgba.png",
        "sixteen_bit.png",
        "odd_size.jpg",
        "corrupt.jpg",
        "empty.png",
        "notes.txt",
    }


@pytest.mark.parametrize("runtime", ["onnx", "keras"])
def test_local_model_predicts_every_readable_image_and_reports_the_rest(trained_states, scans, runtime):
    workspace = trained_states["seed_cnn"][0]
    loaded = load(str(workspace / "models/model.keras"), runtime)
    assert loaded.runtime == runtime
    files = image_files([str(scans)])
    results, _ = predict(loaded, files)
    assert [r["path"] for r in results] == [str(f) for f in files]
    assert predict(loaded, [str(f) for f in files])[0] == results  # paths as text work the same
    bad = {Path(r["path"]).name: r["error"] for r in results if "error" in r}
    assert set(bad) == {"corrupt.jpg", "empty.png", "notes.txt"} and "empty_file" in bad["empty.png"]
    assert bad["notes.txt"].startswith("not_an_image")
    good = [r for r in results if "error" not in r]
    raw, want = expected(workspace, [Path(r["path"]) for r in good])
    assert all(r["status"] in ("read", "uncertain", "out_of_distribution") for r in good)
    assert all(("probability" in r) == (r["status"] != "out_of_distribution") for r in good)
    scored = [(r["probability"], p) for r, p in zip(good, want, strict=True) if "probability" in r]
    assert len(scored) >= 2  # the comparison below is about real scores, not refusals
    assert [got for got, _ in scored] == pytest.approx([p for _, p in scored], abs=1e-5)
    threshold = json.loads((workspace / "models/model.json").read_text())["threshold"]
    assert [r["label"] for r in good] == [
        int(s >= threshold) if r["status"] == "read" else None for r, s in zip(good, raw, strict=True)
    ]


def test_predict_command_works_a_chunk_at_a_time_with_the_same_results(
    trained_states, scans, tmp_path, monkeypatch, capsys
):
    model = str(trained_states["seed_cnn"][0] / "models/model.keras")
    files = image_files([str(scans)])
    whole, _ = predict(load(model), files, batch_size=1)
    monkeypatch.setattr("braintumor.serve.predict.FILES_AT_A_TIME", 2)  # 7 files: 4 chunks, one with 2 bad files
    assert (
        cli.main(["predict", "--model", model, "--json", "--batch-size", "1", "--explain", str(tmp_path), str(scans)])
        == 1
    )
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == whole
    overlays = sorted(p.name for p in tmp_path.glob("*.png"))
    assert [name[:4] for name in overlays] == ["0000", "0001", "0002", "0003"]  # one per readable file, numbered on


def test_a_keras_file_without_its_model_json_is_refused_with_a_hint(trained_states, tmp_path):
    lone = tmp_path / "model.keras"
    lone.write_bytes((trained_states["seed_cnn"][0] / "models/model.keras").read_bytes())
    with pytest.raises(ModelLoadError, match="no model.json beside it"):
        load(str(lone))
    with pytest.raises(ModelLoadError, match="not a models:/ or runs:/ URI"):
        load(str(tmp_path / "missing.keras"))


def test_predict_command_pulls_the_champion_in_a_fresh_process(mlflow_server, registered, scans, tmp_path):
    env = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": mlflow_server}
    result = subprocess.run(
        [
            str(BIN / "braintumor"),
            "predict",
            "--model",
            MODEL,
            "--json",
            str(scans),
            "--explain",
            str(tmp_path / "cams"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr  # some files could not be read; the rest are predicted
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 7
    errors = {Path(line["path"]).name for line in lines if "error" in line}
    assert errors == {"corrupt.jpg", "empty.png", "notes.txt"}
    good = [line for line in lines if "error" not in line]
    # the gate and the calibration came with the registered model
    assert all({"path", "status", "label", "member_spread", "gate_distance"} <= set(line) for line in good)
    _, want = expected(registered, [Path(line["path"]) for line in good])
    scored = [(line["probability"], p) for line, p in zip(good, want, strict=True) if "probability" in line]
    assert len(scored) >= 2  # the comparison below is about real scores, not refusals
    assert [got for got, _ in scored] == pytest.approx([p for _, p in scored], abs=1e-5)
    assert len(list((tmp_path / "cams").glob("*.png"))) == len(good)
    assert "4 images" in result.stderr
    # TensorFlow's native start-up lines (absl, the CUDA probe, Grappler) stay off a user's terminal
    assert not [
        line for line in result.stderr.splitlines() if line.startswith(("I0000", "E0000", "W0000", "WARNING: All"))
    ]


@pytest.mark.slow  # a Python process
def test_predict_command_without_a_reachable_model_says_what_to_set(scans, tmp_path):
    env = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [str(BIN / "braintumor"), "predict", "--model", MODEL, str(scans / "gray.png")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "MLFLOW_TRACKING_URI" in result.stderr


def test_mlflow_models_serve_answers_with_the_same_probabilities(mlflow_server, registered, scans, tmp_path):
    port = free_port()
    args = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        MODEL,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    files = [scans / "gray.png", scans / "odd_size.jpg"]
    images = np.stack([model_input(f, 48) for f in files])
    with serving(
        args, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", env=tool_env(MLFLOW_TRACKING_URI=mlflow_server)
    ):
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": images.tolist()}, timeout=60)
    assert answer.status_code == 200, answer.text
    served = np.array(answer.json()["predictions"])[:, 0]
    assert served == pytest.approx(expected(registered, files)[0], abs=1e-5)  # MLflow serves the raw score


def test_the_onnx_and_keras_runtimes_answer_alike_and_onnx_needs_no_tensorflow(trained_states, scans):
    """Evaluate ships an ONNX export beside the Keras model; `--runtime auto` takes it. Both runtimes give the
    same statuses and labels and P(tumor) to 1e-4, and the ONNX path never imports TensorFlow or Keras."""
    model = str(trained_states["seed_cnn"][0] / "models/model.keras")
    files = image_files([str(scans)])
    on_onnx, on_keras = load(model), load(model, "keras")
    assert (on_onnx.runtime, on_keras.runtime) == ("onnx", "keras")
    a, _ = predict(on_onnx, files)
    b, _ = predict(on_keras, files)
    assert [r.get("status") for r in a] == [r.get("status") for r in b]
    assert [r.get("label") for r in a] == [r.get("label") for r in b]
    assert [r.get("probability", 0) for r in a] == pytest.approx([r.get("probability", 0) for r in b], abs=1e-4)
    probe = (
        "import sys; from braintumor.serve.predict import load, predict; "
        f"results, _ = predict(load({model!r}, 'onnx'), {[str(f) for f in files]!r}); "
        "print(sum('status' in r for r in results), 'tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run([str(BIN / "python"), "-c", probe], capture_output=True, text=True, env=tool_env())
    assert out.stdout.split() == [str(sum("status" in r for r in a)), "False", "False"], out.stderr[-2000:]


def test_what_is_no_brain_mr_slice_is_answered_not_read_and_never_scored(trained_states, tmp_path, monkeypatch):
    from skimage.data import astronaut, shepp_logan_phantom

    from braintumor.data.images import window
    from braintumor.data.scans import read_scans
    from braintumor.model import assessment

    files = {
        "photo.png": save(tmp_path / "photo.png", astronaut(), mode="RGB"),
        "head_ct.png": save(tmp_path / "head_ct.png", window(shepp_logan_phantom(), 0, 1)),
        "mr.png": save(tmp_path / "mr.png", brain_image(7, 160)),
    }
    scored = []
    real_score = assessment.score
    monkeypatch.setattr(
        assessment,
        "score",
        lambda scorer, images, *a, **k: scored.append(len(images)) or real_score(scorer, images, *a, **k),
    )
    loaded = load(str(trained_states["seed_cnn"][0] / "models/model.keras"), "onnx")
    results = {Path(r["path"]).name: r for r in predict(loaded, list(files.values()))[0]}
    assert scored == [1]  # only the MR slice reached the model
    assert results["photo.png"]["status"] == "out_of_distribution" and "colour" in results["photo.png"]["reason"]
    assert results["head_ct.png"]["status"] == "out_of_distribution" and "head CT" in results["head_ct.png"]["reason"]
    assert "probability" not in results["photo.png"] and "probability" not in results["head_ct.png"]
    assert "head CT" not in results["mr.png"].get("reason", "") and "colour" not in results["mr.png"].get("reason", "")
    series, errors = read_scans([("upload", name, path.read_bytes()) for name, path in files.items()], None)
    refusals = {one.name: one.refusal for one in series}
    assert not errors and refusals["mr.png"] is None  # the server's path refuses alike
    assert refusals["photo.png"].code == "colour" and refusals["head_ct.png"].code == "head_ct"
    assert (results["photo.png"]["refusal"], results["head_ct.png"]["refusal"]) == ("colour", "head_ct")


def test_blank_noise_and_text_are_answered_not_read(trained_states, tmp_path):
    """Images with no head in them: the gate (or the reader, for a picture with no content) refuses each; none
    gets a probability. (A tiny model's gate, fitted on synthetic scans: the shipped one is measured by
    benchmarks/ood_gate.py.)"""
    from PIL import Image, ImageDraw

    text = Image.new("L", (160, 160))
    ImageDraw.Draw(text).multiline_text((8, 40), "PATIENT REPORT\nslice 12 of 40\nnot for diagnosis", fill=255)
    files = {
        "blank.png": save(tmp_path / "blank.png", np.zeros((128, 128), np.uint8)),
        "gray.png": save(tmp_path / "gray.png", np.full((128, 128), 128, np.uint8)),
        "noise.png": save(
            tmp_path / "noise.png", np.random.default_rng(1).integers(0, 256, (128, 128)).astype(np.uint8)
        ),
        "text.png": save(tmp_path / "text.png", np.asarray(text)),
    }
    results = predict(load(str(trained_states["seed_cnn"][0] / "models/model.keras")), list(files.values()))[0]
    for result in results:
        name = Path(result["path"]).name
        assert "probability" not in result, name
        assert result.get("status") == "out_of_distribution" or "error" in result, name
