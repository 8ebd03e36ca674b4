"""The model `braintumor serve` answers with: loaded from a reference (a registry alias pinned to the version it
names), warmed up, run by worker threads that batch concurrent requests together, and swapped whole for a new
version when the alias moves."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from braintumor.registry.pull import REFERENCE, current_version, pull
from braintumor.serve.predict import LoadedModel, from_mlflow_folder, load

log = logging.getLogger(__name__)

TEST_METRICS = ("recall", "specificity", "accuracy", "roc_auc")
BATCH = 32  # images per model call
SHARED_BATCH = 8  # images per call of one of several model workers (`ModelRunner`)


@dataclass
class ServedModel:
    """A loaded model and what the answers say about it."""

    loaded: LoadedModel
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    metrics: dict = field(default_factory=dict)
    card: str = ""
    run_id: str | None = None

    def describe(self) -> dict:
        """The model's provenance, as every answer carries it."""
        info = self.loaded.info
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "model_sha256": info.get("model_sha256"),
            "threshold": self.loaded.threshold,
            "score_threshold": float(info["threshold"]),
            "calibration": info.get("calibration"),
            "uncertain_band": info.get("uncertain_band"),
            "gate": {k: info["gate"][k] for k in ("method", "refuse_above")} if "gate" in info else None,
            "image_size": int(info["image_size"]),
            "runtime": self.loaded.runtime,
        }


def resolve(reference: str, runtime: str = "auto") -> ServedModel:
    """Load `reference` (on `runtime`: see `predict.load`; ONNX Runtime one thread a call, as `ModelRunner`
    runs a call a core). A registry reference is pinned to the version it names now (an alias is looked up
    first), so that the version reported is the one loaded; its files come from the local verified cache."""
    match = REFERENCE.match(reference)
    if not match:
        loaded = load(reference, runtime, onnx_threads=1)
        return ServedModel(loaded, metrics=dict(loaded.info.get("test_metrics", {})))
    pulled = pull(reference)
    version = pulled.version
    return ServedModel(
        from_mlflow_folder(pulled.folder, runtime, onnx_threads=1),
        version.name,
        version.version,
        match["alias"],
        {key: version.metrics.get(key) for key in TEST_METRICS},
        version.description,
        version.run_id,
    )


class MicroBatcher:
    """Concurrent requests share a model call: the first waiting request opens a batch, which closes after
    `max_wait_s` or at `max_images` images, whichever comes first, and at once when no other request is on its
    way (in flight, `request`, but not yet handing images in), so a lone request waits for nobody. `workers`
    threads run the model, each its own batch (ONNX Runtime: single-threaded calls side by side, one a core, ran
    1.7x the images/s of one two-threaded call; Keras: one worker, calls serialised); each request gets its
    own rows back."""

    def __init__(self, run, max_images: int = BATCH, max_wait_s: float = 0.004, workers: int = 1):
        self.run, self.max_images, self.max_wait_s = run, max_images, max_wait_s
        self.waiting: queue.Queue = queue.Queue()
        self.in_flight, self.handed_in, self.counting = 0, 0, threading.Lock()
        for worker in range(workers):
            threading.Thread(target=self.loop, name=f"micro-batcher-{worker}", daemon=True).start()

    @contextlib.contextmanager
    def request(self):
        """Around a request's whole handling (decoding included): while it runs, a batch may wait for it."""
        with self.counting:
            self.in_flight += 1
        try:
            yield
        finally:
            with self.counting:
                self.in_flight -= 1

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        """The model's outputs for `images` (a request's), computed in batches with whatever else is waiting; a
        request of more than `max_images` goes in several slots, which the workers share."""
        slots = [
            {"images": images[start : start + self.max_images], "done": threading.Event()}
            for start in range(0, max(len(images), 1), self.max_images)
        ]
        with self.counting:
            self.handed_in += 1
        try:
            for slot in slots:
                self.waiting.put(slot)
            for slot in slots:
                slot["done"].wait()
        finally:
            with self.counting:
                self.handed_in -= 1
        for slot in slots:
            if "error" in slot:
                raise slot["error"]
        return [np.concatenate([slot["outputs"][k] for slot in slots]) for k in range(len(slots[0]["outputs"]))]

    def on_the_way(self) -> bool:
        with self.counting:
            return self.in_flight > self.handed_in

    def loop(self) -> None:
        while True:
            batch = [self.waiting.get()]
            count, closes = len(batch[0]["images"]), time.perf_counter() + self.max_wait_s
            while count < self.max_images and (left := closes - time.perf_counter()) > 0:
                try:  # what is queued joins at once; the window is kept open only for requests on their way
                    batch.append(self.waiting.get(timeout=left) if self.on_the_way() else self.waiting.get_nowait())
                except queue.Empty:
                    break
                count += len(batch[-1]["images"])
            try:
                outputs = self.run(np.concatenate([slot["images"] for slot in batch]))
                start = 0
                for slot in batch:
                    end = start + len(slot["images"])
                    slot["outputs"] = [output[start:end] for output in outputs]
                    start = end
            except Exception as err:  # noqa: BLE001 - every request of the batch gets the error, the loop lives on
                for slot in batch:
                    slot["error"] = err
            for slot in batch:
                slot["done"].set()


class ModelRunner:
    """Runs the model: answers for prepared images (concurrent requests batched by `MicroBatcher`), and
    evidence maps."""

    def __init__(self, served: ServedModel, batch_wait_s: float = 0.004):
        self.served = served
        self.names = served.loaded.info["class_names"]
        concurrent = served.loaded.runtime == "onnx"  # ONNX Runtime sessions take concurrent calls
        self.scoring = contextlib.nullcontext() if concurrent else threading.Lock()
        # evidence maps run the Keras model one at a time (and, on the Keras runtime, never beside a scoring call)
        self.explaining = threading.Lock() if concurrent else self.scoring
        # ONNX Runtime on one thread gains little past 8 images a call (115 images/s against 108 at 4, this
        # machine), so larger requests are spread over the workers
        workers, most = (len(os.sched_getaffinity(0)), SHARED_BATCH) if concurrent else (1, BATCH)
        self.batcher = MicroBatcher(self.outputs, max_images=most, max_wait_s=batch_wait_s, workers=workers)

    def outputs(self, images: np.ndarray) -> list[np.ndarray]:
        """The scoring model's outputs for `images`, BATCH at a time."""
        scorer = self.served.loaded.scorer
        parts = []
        with self.scoring:
            for start in range(0, len(images), BATCH):
                batch = images[start : start + BATCH].astype("float32")
                parts.append([np.asarray(output) for output in scorer.predict_on_batch(batch)])
        return [np.concatenate([part[k] for part in parts]) for k in range(len(parts[0]))]

    def answers(self, images: np.ndarray) -> list[dict]:
        """`Assessor.answers` for prepared images: status, calibrated P(tumor), label, gate distance."""
        from braintumor.model.assessment import scores_of

        return self.served.loaded.assessor.answers(scores_of(self.batcher(images), self.names))

    def evidence_map(self, image: np.ndarray) -> np.ndarray:
        from braintumor.model.saliency import evidence_map

        with self.explaining:
            return evidence_map(self.served.loaded.model, image[None], self.names)[0]

    def warm_up(self) -> None:
        size = int(self.served.loaded.info["image_size"])
        for count in (1, 2):
            self.answers(np.zeros((count, size, size, 3), dtype=np.uint8))


class FollowedAlias:
    """The model a reference names, swapped whole when its alias moves; readers take `current` once per request."""

    def __init__(self, reference: str, poll_seconds: float, runtime: str = "auto", batch_wait_s: float = 0.004):
        self.reference = reference
        self.poll_seconds = poll_seconds
        self.runtime, self.batch_wait_s = runtime, batch_wait_s
        self.current = self._ready(resolve(reference, runtime))
        self.swap_lock = threading.Lock()
        self.stop = threading.Event()
        self.last_error: str | None = None

    def _ready(self, served: ServedModel) -> ModelRunner:
        runner = ModelRunner(served, self.batch_wait_s)
        runner.warm_up()
        return runner

    def reload(self) -> bool:
        """Load the version the alias names now, if it is not the one served; True when swapped."""
        with self.swap_lock:
            wanted = current_version(self.reference)
            if wanted is None or wanted == self.current.served.version:
                return False
            fresh = self._ready(resolve(self.reference, self.runtime))
            previous, self.current = self.current.served.version, fresh
        log.info("serve: %s moved from version %s to %s", self.reference, previous, fresh.served.version)
        return True

    def poll(self) -> None:
        while not self.stop.wait(self.poll_seconds):
            try:
                self.reload()
                self.last_error = None
            except Exception as err:  # noqa: BLE001 - a failed poll keeps the current model and says why
                self.last_error = f"{type(err).__name__}: {err}"
                log.warning(
                    "serve: could not check %s (%s); still serving version %s",
                    self.reference,
                    self.last_error,
                    self.current.served.version,
                )

    def start_polling(self) -> None:
        match = REFERENCE.match(self.reference)
        if self.poll_seconds > 0 and match and match["alias"]:
            threading.Thread(target=self.poll, name="alias-poll", daemon=True).start()
