"""The scoring model's ONNX export, run by ONNX Runtime: `braintumor predict` and the web service without
TensorFlow or Keras.

Evaluate writes `model.onnx` beside `model.keras` (`scoring.export_onnx`) and its SHA-256 into `model.json`; this
loads it only when the digest matches, refuses any operator outside the standard ONNX domains (no custom ops: a
graph of built-in operators computes and nothing else), checks its input against the description's image size,
and offers the two calls the answers need, with the Keras model's signatures.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from braintumor.errors import ModelLoadError

ONNX_FILE = "model.onnx"
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


class OnnxScorer:
    """`scoring.scoring_model` as an ONNX Runtime session: `predict` and `predict_on_batch` return the same list
    of arrays the Keras scoring model does."""

    def __init__(self, path: Path, sha256: str, image_size: int, threads: int | None = None):
        import onnx
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"{path}: the model's ONNX export is missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ModelLoadError(f"{path}: its SHA-256 differs from the one in the model's description")
        graph = onnx.load_model_from_string(data).graph
        foreign = sorted({node.domain for node in graph.node if node.domain not in STANDARD_DOMAINS})
        if foreign:
            raise ModelLoadError(f"{path}: operators from outside the standard ONNX domains ({', '.join(foreign)})")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: its warnings are for the model's author
        # no busy-waiting between calls: in a server the spinning threads took the cores that decoding and the
        # next request needed (8 concurrent clients: see benchmarks/RESULTS.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        (image,) = self.session.get_inputs()
        if list(image.shape[1:]) != [image_size, image_size, 3]:
            raise ModelLoadError(
                f"{path}: the graph takes inputs of shape {image.shape}, but `image_size` {image_size} means "
                f"(batch, {image_size}, {image_size}, 3)"
            )
        self.input = image.name
        self.outputs = [output.name for output in self.session.get_outputs()]
        self.output_shape = [tuple(output.shape) for output in self.session.get_outputs()]

    def feature_widths(self) -> list[int]:
        return [int(shape[-1]) for shape in self.output_shape[2:]]

    def predict_on_batch(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {self.input: np.asarray(x, dtype=np.float32)})

    def predict(self, x: np.ndarray, batch_size: int = 32, verbose: int = 0) -> list[np.ndarray]:
        parts = [self.predict_on_batch(x[start : start + batch_size]) for start in range(0, len(x), batch_size)]
        return [np.concatenate([part[k] for part in parts]) for k in range(len(self.outputs))]
