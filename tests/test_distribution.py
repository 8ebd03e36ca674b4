"""`train.distribution: data_parallel` on JAX, tested on this CPU split into two virtual devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from braintumor.errors import ParamError

from conftest import REPO
from fixtures.split import tiny_params

TWO_DEVICES = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    sys.path.insert(0, sys.argv[2])
    from pathlib import Path
    from braintumor.data.datasets import load_split
    from braintumor.model.distribution import data_parallel
    from braintumor.model.train import fit
    from fixtures.split import make_split, tiny_params

    class Losses(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = []
        def on_train_batch_end(self, batch, logs=None):
            self.seen.append(float(logs["loss"]))

    split = make_split(Path(sys.argv[1]), counts=(("train", 96), ("val", 32), ("test", 33)))
    train, val = (load_split(split, name, "binary") for name in ("train", "val"))
    test = load_split(split, "test", "binary")
    # No randomness inside the step (no dropout, no augmentation): the two runs then do the same arithmetic.
    params = tiny_params("small_xception", epochs=3, batch_size=16, dropout=0.0, mirror_average=False)
    params["train"]["augment"] = dict.fromkeys(params["train"]["augment"], 0) | {"horizontal_flip": False}
    report = {"devices": len(keras.distribution.list_devices())}
    lazy = {name: load_split(split, name, "binary", lazy=True) for name in ("train", "val")}
    for loader, (fit_train, fit_val) in (("arrays", (train, val)), ("stream", (lazy["train"], lazy["val"]))):
        for mode in ("none", "data_parallel"):
            params["train"].update(distribution=mode, loader=loader)
            losses = Losses()
            model, summary = fit(params, fit_train, fit_val, callbacks=[losses], verbose=0)
            report[f"{loader} {mode}"] = {
                "losses": losses.seen, "epochs": summary["epochs_run"],
                "weights_on": len(model.trainable_variables[0].value.sharding.device_set),
                "test": model.predict(test["x"].astype("float32"), verbose=0)[:, 0].tolist()}
    layout = data_parallel("data_parallel", 16).get_data_layout((16, 48, 48, 3))
    batch = keras.distribution.distribute_tensor(np.zeros((16, 48, 48, 3), "float32"), layout)
    report["batch_axes"] = list(layout.axes)
    report["shards"] = sorted({tuple(shard.data.shape) for shard in batch.addressable_shards})
    # an odd number of images: the last batches are padded with zero-weight rows, not refused
    for loader, (fit_train, fit_val) in (("arrays", (train, val)), ("stream", (lazy["train"], lazy["val"]))):
        params["train"].update(distribution="data_parallel", loader=loader, epochs=1)
        odd = {key: value[:91] for key, value in fit_train.items()}
        odd_val = {key: value[:29] for key, value in fit_val.items()}
        report[f"odd {loader}"] = fit(params, odd, odd_val, verbose=0)[1]["epochs_run"]
    print(json.dumps(report))
""")


@pytest.mark.slow
def test_data_parallel_splits_each_batch_and_learns_as_one_device(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES, str(tmp_path / "split"), str(REPO / "tests")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2
    assert report["batch_axes"][0] == "batch" and report["shards"] == [[8, 48, 48, 3]]  # 16 rows, 8 a device
    for loader in ("arrays", "stream"):  # both loaders: in-memory arrays, and batches read from the split's files
        one, two = report[f"{loader} none"], report[f"{loader} data_parallel"]
        assert (one["weights_on"], two["weights_on"]) == (1, 2)  # the fit itself ran on both devices
        # The same steps, with each batch's gradient summed in two halves: only float32 rounding differs, and
        # each step starts from the weights the last one left, so a rounding difference is carried on and may be
        # amplified by the optimizer. The bound on step k's loss follows that: at step 0 (the same weights and
        # batch, only the order of additions in one mean differs; measured 2e-7) it is 1e-5, and it may grow
        # 1.5-fold a step, which is how fast it grew on the CPU where a flat 1e-4 failed (1.3e-4 at step 16 from
        # about 1e-7, issue 30), up to 2e-3. The faults this test exists for show at the first steps, where the
        # bound is tight: injected into the data-parallel runs, another batch order (8e-3 at step 0) and a batch
        # with half its rows weighing nothing (0.6) each fail this check at every one of the 18 steps.
        assert len(one["losses"]) == len(two["losses"]) == 3 * 96 // 16
        for step, (single, split) in enumerate(zip(one["losses"], two["losses"], strict=True)):
            assert split == pytest.approx(single, rel=min(1e-5 * 1.5**step, 2e-3)), (loader, step)
        # The fitted models' answers carry the same rounding: the bound is the last steps' (2e-3). On an AMD EPYC
        # of family 26 the arrays loader's losses drew apart from step 13 (1.3e-4 relative at step 16, inside
        # their bound) and the 33 test answers by up to 1.03e-3 (mean 3.4e-4), over the 1e-3 this check had; the
        # stream loader stayed at 1e-7 on the same CPU (91855f9's code gave the same figures: no code change).
        assert two["test"] == pytest.approx(one["test"], abs=2e-3)
        assert report[f"odd {loader}"] == 1


ONE_HOST_OF_TWO = textwrap.dedent("""
    import hashlib, json, sys
    import jax, keras, numpy as np
    sys.path.insert(0, sys.argv[2])
    from pathlib import Path
    from braintumor.data.datasets import load_split
    from braintumor.model.train import fit
    from fixtures.split import tiny_params

    split = Path(sys.argv[1])
    params = tiny_params("small_xception", epochs=3, batch_size=16, dropout=0.0, mirror_average=False,
                         distribution="data_parallel")
    params["train"]["augment"] = dict.fromkeys(params["train"]["augment"], 0) | {"horizontal_flip": False}
    report = {}
    for loader in ("arrays", "stream"):
        train, val = (load_split(split, name, "binary", lazy=loader == "stream") for name in ("train", "val"))
        # 81 images: shares of 41 and 40, 6 and 5 batches of 8 if each process counted its own
        train = {key: value[:81] for key, value in train.items()}
        params["train"]["loader"] = loader
        history = keras.callbacks.History()
        model, _ = fit(params, train, val, callbacks=[history], verbose=0)
        weights = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()
        report[loader] = {"weights": weights, "loss": history.history["loss"]}
    # a small site's update after the fit (train.sites): 87 images, shares of 44 and 43
    params["train"]["sites"]["update_epochs"] = 2
    history = keras.callbacks.History()
    model, summary = fit(params, train, val, callbacks=[history], verbose=0,
                         update_on={key: value[:87] for key, value in load_split(split, "train", "binary").items()})
    weights = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()
    report["update"] = {"weights": weights, "loss": history.history["loss"], "images": summary["update_images"]}
    report.update(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
                  local_devices=jax.local_device_count())
    print(json.dumps(report))
""")


@pytest.mark.slow
def test_two_processes_train_one_model_as_two_hosts_would(tmp_path):
    """Two processes joined through jax.distributed (the multi-host path, here both on this machine), one CPU
    device each: every batch is split between them and both end with the very same weights, with either
    loader, also when the images do not share out evenly, and after a small site's update."""
    from fixtures.servers import free_port
    from fixtures.split import make_split

    make_split(tmp_path / "split")
    hosts = f"localhost:{free_port()}"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", ONE_HOST_OF_TWO, str(tmp_path / "split"), str(REPO / "tests")],
            env={
                **os.environ,
                "KERAS_BACKEND": "jax",
                "KERAS_DISTRIBUTION_JOB_ADDRESSES": hosts,
                "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
                "KERAS_DISTRIBUTION_PROCESS_ID": str(rank),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-3000:]
    first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert (first["process"], second["process"]) == (0, 1)
    assert first["processes"] == 2 and first["devices"] == 2 and first["local_devices"] == 1
    for loader in ("arrays", "stream", "update"):
        one, other = first[loader], second[loader]
        assert one["weights"] == other["weights"] and one["loss"] == other["loss"]  # one model, not two
        assert one["loss"][-1] < one["loss"][0]
    assert len(first["update"]["loss"]) == 3 + 2 and first["update"]["weights"] != first["stream"]["weights"]
    assert first["update"]["images"] + second["update"]["images"] == 87  # each process its share of the update


def test_data_parallel_needs_the_jax_backend():
    """This process runs Keras on TensorFlow (the default): the param is refused with what to do instead."""
    import keras

    from braintumor.model.distribution import data_parallel

    if keras.backend.backend() == "jax":
        pytest.skip("this test process runs the JAX backend")
    params = tiny_params(distribution="data_parallel")
    with pytest.raises(ParamError, match="train.distribution: data_parallel` needs KERAS_BACKEND=jax"):
        data_parallel(params["train"]["distribution"], params["train"]["batch_size"])
