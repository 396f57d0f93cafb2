"""The checkpoints of a run directory: the managers that write them (latest, best, recalibrated), choosing one
(`--checkpoint best|latest|recalibrated|STEP`) and restoring a model from it."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from ..errors import TargetError
from ..files import write_text_atomic
from . import CHECKPOINT_CHOICES as CHOICES
from .rundir import RunDir, RunDirError, checkpoint_step, next_number


def training_managers(ckpt, run: RunDir, keep: int):
    """(latest, best) CheckpointManagers for a run; checkpoints are numbered by the training step."""
    latest = tf.train.CheckpointManager(ckpt, run.checkpoints, max_to_keep=keep, checkpoint_name="ckpt")
    best = tf.train.CheckpointManager(ckpt, run.best, max_to_keep=1, checkpoint_name="ckpt")
    return latest, best


def find(run: RunDir, which="best") -> str:
    """The prefix of a run's checkpoint: "best" (the run's final model, which results.json names once training has
    finished: the best epoch's weights, or the EMA, with precise-BN statistics when they ran; before that, the
    best validation accuracy so far, falling back to the latest while there is no best), "latest",
    "recalibrated" (the newest precise-BN one), "ema", or a training step (an int or digits)."""
    if str(which).isdigit():
        step = int(which)
        for folder in (run.checkpoints, run.best):
            state = tf.train.get_checkpoint_state(str(folder))
            for prefix in (state.all_model_checkpoint_paths if state else []):
                if checkpoint_step(prefix) == step:
                    return prefix
        raise TargetError(f"{run.path}: no checkpoint of step {step} (the run keeps: "
                              f"{', '.join(str(checkpoint_step(p)) for p in all_training(run)) or 'none'})")
    if which == "recalibrated":
        prefix = tf.train.latest_checkpoint(str(run.recalibrated))
        if prefix is None:
            raise TargetError(f"{run.path}: no recalibrated checkpoint (convbn recalibrate {run.path})")
        return prefix
    final = run.final_checkpoint() if which == "best" else None
    if final is not None:  # a finished run: exactly the model its summary and results.json measured
        return final
    ema = tf.train.latest_checkpoint(str(run.ema))
    if which == "ema" and ema is None:
        raise TargetError(f"{run.path}: no EMA checkpoint (train.ema was off, or training has not finished)")
    if which in ("ema", "best") and ema is not None:
        return ema
    if which not in CHOICES:
        raise TargetError(f"--checkpoint: expected one of {', '.join(CHOICES)} or a training step, got {which!r}")
    prefix = tf.train.latest_checkpoint(str(run.best)) if which == "best" else None
    prefix = prefix or tf.train.latest_checkpoint(str(run.checkpoints))  # no best yet, or latest asked for
    if prefix is None:
        raise TargetError(f"{run.path}: the run has no checkpoint yet")
    return prefix


def all_training(run: RunDir) -> list[str]:
    state = tf.train.get_checkpoint_state(str(run.checkpoints))
    return list(state.all_model_checkpoint_paths) if state else []


def run_of_prefix(path: Path) -> RunDir:
    """The run directory above a checkpoint prefix (checkpoints/ckpt-K, checkpoints/best/ckpt-K, ...)."""
    for parent in (path.parent.parent, path.parent.parent.parent):
        if (parent / "config.yaml").is_file():
            return RunDir.open(parent)
    raise TargetError(f"{path}: no config.yaml in the run directory above this checkpoint")


def restore(model, prefix):
    """Restore the model's weights and BN moving statistics from `prefix`, insisting that every one is there."""
    ckpt = tf.train.Checkpoint(model=model)
    try:
        status = ckpt.restore(str(prefix))
        status.assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001  a damaged file fails in many ways (OpError, IndexError, ...)
        first = " ".join(str(e).split())[:300]
        raise TargetError(f"{prefix}: cannot restore this model from it ({type(e).__name__}: {first})") from None
    status.expect_partial()  # optimizer slots and training counters are not needed here
    return status


def restore_latest(ckpt, manager, log):
    """Restore the newest checkpoint that loads; an unreadable newest one (a kill mid-write) falls back."""
    for path in reversed(manager.checkpoints):
        try:
            ckpt.restore(path).assert_existing_objects_matched()
        except (tf.errors.OpError, AssertionError, ValueError) as e:
            log(f"cannot restore {path} ({type(e).__name__}); trying an older checkpoint")
            continue
        log(f"resumed from {path} (step {checkpoint_step(path)})")
        return path
    if manager.checkpoints:
        raise RunDirError(f"{manager.directory}: no checkpoint could be restored")
    return None


def save_recalibrated(model, run: RunDir, source_prefix) -> str:
    """Save the model as `checkpoints/recalibrated/ckpt-<n>`, n the next free number: never over anything.
    Beside it, `ckpt-<n>.source` names the checkpoint it was recalibrated from."""
    return _save_model(model, run.recalibrated, next_number(run.recalibrated, r"ckpt-(\d+)\.index"), source_prefix)


def save_ema(model, run: RunDir, source_prefix) -> str:
    """Save the model (holding the averaged weights) as `checkpoints/ema/ckpt-<step>`, step that of
    `source_prefix`, the raw checkpoint saved at the same step (named in `ckpt-<step>.source`)."""
    return _save_model(model, run.ema, checkpoint_step(source_prefix), source_prefix)


def _save_model(model, folder, number, source_prefix) -> str:
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), folder, max_to_keep=None,
                                         checkpoint_name="ckpt")
    path = manager.save(checkpoint_number=number)
    write_text_atomic(path + ".source", f"{source_prefix}\n")
    return path
