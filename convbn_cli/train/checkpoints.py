"""Find and restore a checkpoint given what a user types: a run directory or a checkpoint prefix.

The run directory's resolved config.yaml rebuilds the model, so no config argument is needed.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from ..errors import ConvbnError
from ..model import build_model
from .rundir import RunDir, RunDirError


class CheckpointError(ConvbnError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


def resolve(target, which: str = "best"):
    """(RunDir, checkpoint prefix) for a run directory (its best or latest checkpoint) or a checkpoint prefix."""
    path = Path(target)
    if path.is_dir():
        run = RunDir.open(path)
        prefix = None
        if which == "best":
            prefix = tf.train.latest_checkpoint(str(run.best))
        if prefix is None:  # no best yet (or latest asked for)
            prefix = tf.train.latest_checkpoint(str(run.checkpoints))
        if prefix is None:
            raise CheckpointError(f"{path}: the run has no checkpoint yet")
        return run, prefix
    if Path(str(path) + ".index").is_file():
        # runs/<name>/<n>/checkpoints/ckpt-K or .../checkpoints/best/ckpt-K
        for parent in (path.parent.parent, path.parent.parent.parent):
            if (parent / "config.yaml").is_file():
                return RunDir.open(parent), str(path)
        raise CheckpointError(f"{path}: no config.yaml in the run directory above this checkpoint")
    if path.suffix in (".index",) or ".data-" in path.name:
        raise CheckpointError(f"{path}: give the checkpoint prefix without its extension, e.g. "
                              f"{str(path).split('.index')[0].split('.data-')[0]}")
    raise CheckpointError(f"{path}: no such run directory or checkpoint")


def restore(model, prefix, extra: dict | None = None):
    """Restore the model's weights and BN moving statistics from `prefix`, insisting that every one is there."""
    ckpt = tf.train.Checkpoint(model=model, **(extra or {}))
    try:
        status = ckpt.restore(str(prefix))
        status.assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001  a damaged file fails in many ways (OpError, IndexError, ...)
        first = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{prefix}: cannot restore this model from it ({type(e).__name__}: {first})") from None
    status.expect_partial()  # optimizer slots and training counters are not needed here
    return status


def load(target, which: str = "best"):
    """(cfg, model, prefix, run) for a run directory or checkpoint prefix: the model rebuilt and restored."""
    try:
        run, prefix = resolve(target, which)
        cfg = run.load_config()
    except RunDirError as e:
        raise CheckpointError(str(e)) from None
    model = build_model(cfg)
    restore(model, prefix)
    return cfg, model, prefix, run
