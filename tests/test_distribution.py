"""`train.distribution: data_parallel` on JAX, tested on this CPU split into two virtual devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from braintumor.params import ParamError

from conftest import REPO
from fixtures.split import tiny_params

TWO_DEVICES = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    sys.path.insert(0, sys.argv[2])
    from pathlib import Path
    from braintumor.datasets import load_split
    from braintumor.distribution import data_parallel
    from braintumor.training import fit
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
    for mode in ("none", "data_parallel"):
        params["train"]["distribution"] = mode
        losses = Losses()
        model, summary = fit(params, train, val, callbacks=[losses], verbose=0)
        report[mode] = {"losses": losses.seen, "epochs": summary["epochs_run"],
                        "weights_on": len(model.trainable_variables[0].value.sharding.device_set),
                        "test": model.predict(test["x"].astype("float32"), verbose=0)[:, 0].tolist()}
    layout = data_parallel("data_parallel", 16).get_data_layout((16, 48, 48, 3))
    batch = keras.distribution.distribute_tensor(np.zeros((16, 48, 48, 3), "float32"), layout)
    report["batch_axes"] = list(layout.axes)
    report["shards"] = sorted({tuple(shard.data.shape) for shard in batch.addressable_shards})
    # an odd number of images: the last batches are padded with zero-weight rows, not refused
    params["train"].update(distribution="data_parallel", epochs=1)
    odd = {key: value[:91] for key, value in train.items()}
    report["odd"] = fit(params, odd, {key: value[:29] for key, value in val.items()}, verbose=0)[1]["epochs_run"]
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
    one, two = report["none"], report["data_parallel"]
    assert (one["weights_on"], two["weights_on"]) == (1, 2)  # the fit itself ran on both devices
    assert len(one["losses"]) == len(two["losses"]) == 3 * 96 // 16
    # The same steps, with each batch's gradient summed in two halves: only float32 rounding differs. Measured
    # here: at most 1.0e-6 relative over the 18 losses, 5e-5 on the test predictions. The bounds are 100 and 20
    # times that, far below what a real difference (another batch order, a gradient not averaged over both
    # halves) moves them by: over 1e-2.
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert two["test"] == pytest.approx(one["test"], abs=1e-3)
    assert report["odd"] == 1


def test_data_parallel_needs_the_jax_backend():
    """This process runs Keras on TensorFlow (the default): the param is refused with what to do instead."""
    import keras

    from braintumor.distribution import data_parallel

    if keras.backend.backend() == "jax":
        pytest.skip("this test process runs the JAX backend")
    params = tiny_params(distribution="data_parallel")
    with pytest.raises(ParamError, match="train.distribution: data_parallel` needs KERAS_BACKEND=jax"):
        data_parallel(params["train"]["distribution"], params["train"]["batch_size"])
