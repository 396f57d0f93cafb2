"""Data-parallel training on TensorFlow's own engine (tf.distribute): devices, the strategy, who is chief.
(The `--workers K` launcher, which needs no TensorFlow, is convbn_cli/launcher.py.)

With data parallelism each replica sees only its part of the global batch. Without synchronized BN each
replica normalizes with the statistics of its own slice (noisier than the batch size the user configured);
with `distribute.sync_bn` (default) the per-channel sums are all-reduced across replicas, so every replica
normalizes with the statistics of the whole global batch, exactly as one device would. That all-reduce is
Keras' `BatchNormalization(synchronized=True)`; the fused kernel cannot all-reduce, so under a strategy
with sync BN every BN layer uses the Keras layer.
"""

from __future__ import annotations

import os
import tempfile

from ..errors import ConvbnError
from ..launcher import READY_FD_ENV, check_tf_config

COLLECTIVE_TIMEOUT_S = float(os.environ.get("CONVBN_COLLECTIVE_TIMEOUT", "120"))


def setup_devices(cfg) -> None:
    """Split the host CPU into `cpu_replicas` logical devices (must happen before TensorFlow starts its runtime)."""
    import tensorflow as tf

    k = cfg.distribute.cpu_replicas
    if not k:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * k)
    except RuntimeError:  # the runtime already started in this process (e.g. a second run in one session)
        if len(tf.config.list_logical_devices("CPU")) != k:
            raise ConvbnError(f"distribute.cpu_replicas: TensorFlow already started in this process with "
                              f"{len(tf.config.list_logical_devices('CPU'))} CPU device(s); run in a fresh "
                              f"process to get {k}") from None


def make_strategy(cfg):
    """The tf.distribute strategy the config asks for (the default, no-op strategy for `none`)."""
    import tensorflow as tf

    d = cfg.distribute
    if d.strategy == "none":
        return tf.distribute.get_strategy()
    if d.strategy == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy()  # all GPUs, NCCL all-reduce
        cpus = [c.name for c in tf.config.list_logical_devices("CPU")]
        # NCCL is GPU-only; on CPU devices reduce through one device
        return tf.distribute.MirroredStrategy(cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())
    check_tf_config(os.environ.get("TF_CONFIG"))
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_S)
    # Blocks inside TensorFlow (holding the GIL, deaf to signals) until every worker has joined; the CLI runs
    # this in a supervised child process that gets a deadline (launcher.supervise).
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except tf.errors.OpError as e:  # e.g. this worker's port is taken
        raise ConvbnError(f"TF_CONFIG: cannot start this worker ({' '.join(e.message.split())[:200]})") from None
    signal_ready()
    return strategy


def signal_ready() -> None:
    """Tell a supervising parent (launcher.supervise) that the cluster has started: every worker has joined."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd:
        try:
            os.write(int(fd), b"ready\n")
            os.close(int(fd))
        except (OSError, ValueError):
            pass


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    spec = resolver.cluster_spec().as_dict()
    if "chief" in spec:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def temporary_run_root() -> str:
    """Where a non-chief worker writes what the strategy makes every worker write (removed at the end)."""
    return tempfile.mkdtemp(prefix="convbn-worker-")
