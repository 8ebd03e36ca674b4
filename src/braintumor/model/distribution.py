"""Training on several accelerators, and several hosts, through Keras 3's distribution API (JAX backend).

`train.distribution: data_parallel` replicates the model on every device and splits each batch across them;
the gradients of the parts are averaged, so a step is the single-device step on the whole batch (up to the
order of float additions). A job over several hosts runs one process per host, each given the host list in
the environment that `keras.distribution.initialize` reads (`jax.distributed` underneath):
KERAS_DISTRIBUTION_JOB_ADDRESSES (comma-separated host:port, the first is the coordinator),
KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID. Each process then feeds its own share of
every batch. TensorFlow and PyTorch train on one device here; TensorFlow's own route is `tf.distribute`.
"""

from __future__ import annotations

import os

import keras
import numpy as np

from braintumor.errors import ParamError

HOSTS_ENV = "KERAS_DISTRIBUTION_JOB_ADDRESSES"


def join_hosts() -> None:
    """Join the multi-host job the environment names, once per process and before JAX computes anything."""
    import jax

    if os.environ.get(HOSTS_ENV) and not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs use NCCL anyway
        keras.distribution.initialize()


def data_parallel(mode: str, batch_size: int) -> keras.distribution.DataParallel | None:
    """The distribution `train.distribution` asks for: None for one device, else data parallelism over every
    device of the job. Refuses, naming the param, a backend without the API or a batch the devices cannot
    split evenly."""
    if mode == "none":
        return None
    if keras.backend.backend() != "jax":
        raise ParamError(
            f"params.yaml: `train.distribution: {mode}` needs KERAS_BACKEND=jax (Keras 3's distribution API); "
            f"the {keras.backend.backend()} backend trains on one device here (TensorFlow: tf.distribute)"
        )
    join_hosts()
    devices = keras.distribution.list_devices()
    if batch_size % len(devices):
        raise ParamError(
            f"params.yaml: `train.batch_size` {batch_size} does not split evenly over {len(devices)} devices; "
            f"make it a multiple of {len(devices)}"
        )
    # each process already feeds only its own rows (process_share), so Keras must not shard them again
    return keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)


def batches_per_epoch(rows: int, batch_size: int) -> int:
    """Steps of a data-parallel epoch over `rows` images, `batch_size` of them a process a step. Every process
    must take the same number of steps (each step is a collective), so the count follows the largest share."""
    import jax

    largest_share = -(-rows // jax.process_count())
    return -(-largest_share // batch_size)


def full_batches(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray | None, batch_size: int, batches: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`x`, `y` and per-sample weights padded with zero-weight repeats of their first rows to `batches` whole
    batches: a sharded batch must divide evenly over the devices, the last partial one too, and every process
    must feed as many batches as the others. The padding adds nothing to the gradients or the weighted metrics.

    Args:
        x: images.
        y: targets.
        weights: per-sample weights; None = all 1.
        batch_size: global batch size.
        batches: whole batches to fill.
    """
    weights = np.ones(len(x), dtype="float32") if weights is None else weights.astype("float32")
    extra = batches * batch_size - len(x)
    if not extra:
        return x, y, weights
    rows = np.arange(extra) % len(x)
    return (
        np.concatenate([x, x[rows]]),
        np.concatenate([y, y[rows]]),
        np.concatenate([weights, np.zeros(extra, dtype="float32")]),
    )


def process_share(data: dict) -> dict:
    """This process's rows of `data` when the job spans several processes (each feeds its own part of every
    batch); all of it otherwise."""
    import jax

    if jax.process_count() == 1:
        return data
    return {key: value[jax.process_index() :: jax.process_count()] for key, value in data.items()}
