"""The checkpoints of a run directory: the managers that write them (latest, best, recalibrated), choosing one
(`--checkpoint best|latest|recalibrated|STEP`) and restoring a model from it."""

from __future__ import annotations

import contextlib
import glob
import os
import re
from pathlib import Path

import tensorflow as tf

from ..errors import TargetError
from ..files import remove_entry, write_text_atomic, writing
from ..readers import check_files
from . import CHECKPOINT_CHOICES as CHOICES
from .rundir import RunDir, RunDirError, checkpoint_step, next_number


def training_managers(ckpt, run: RunDir, keep: int):
    """(latest, best) CheckpointManagers for a run; checkpoints are numbered by the training step."""
    _record_checked(run.checkpoints)  # a manager reads its folder's record when it is made
    _record_checked(run.best)
    try:
        latest = tf.train.CheckpointManager(ckpt, run.checkpoints, max_to_keep=keep, checkpoint_name="ckpt")
        best = tf.train.CheckpointManager(ckpt, run.best, max_to_keep=1, checkpoint_name="ckpt")
    except ValueError as e:  # TensorFlow's "Invalid checkpoint state": an empty or half-written record
        raise RunDirError(f"{run.path}: a damaged checkpoint record ({' '.join(str(e).split())[:120]}); remove "
                          "that folder's `checkpoint` file to resume from the newest checkpoint file") from None
    return latest, best


def save(manager, number: int) -> str:
    """manager.save(checkpoint_number=number); a write the machine refuses (a full disk, a read-only place) is a
    WriteError naming the checkpoint, and leaves no part of it behind."""
    prefix = Path(manager.directory) / f"ckpt-{number}"
    with _all_or_nothing(prefix):
        return manager.save(checkpoint_number=number)


@contextlib.contextmanager
def _all_or_nothing(prefix: Path, extra=()):
    """Write the checkpoint `prefix` (and the `extra` files beside it) in the block; if the block fails, remove
    what it made of them (TensorFlow's `ckpt-N_temp/` staging too) and its folder if the block made it and left it
    empty: never a file that was there before. A refused write is a WriteError naming `prefix`."""
    folder, name = prefix.parent, prefix.name
    had_folder = folder.is_dir()
    before = set(os.listdir(folder)) if had_folder else set()
    try:
        with writing(prefix, relabel=True):
            yield
    except BaseException:
        # TensorFlow's: the checkpoint's files, its staging, the record's temporary (`checkpoint.tmp<hex>`)
        ours = re.compile(rf"{re.escape(name)}(\..*|_temp)|checkpoint\.tmp[0-9a-f]+")
        made = [folder / n for n in (os.listdir(folder) if folder.is_dir() else ()) if n not in before
                and (ours.fullmatch(n) or n in extra)]
        for p in made:
            with contextlib.suppress(OSError):  # a read-only place: nothing could be made there anyway
                remove_entry(p)
        if not had_folder:
            with contextlib.suppress(OSError):  # not empty: something else is in it
                folder.rmdir()
        raise


MAX_CHECKPOINT_BYTES = 4 << 30  # one checkpoint's files together: far above an MNIST-like net's (a few MB)


def checked(prefix) -> str:
    """`prefix`, once its files are shown to be regular (never opened: a FIFO would block TensorFlow's reader
    forever) and bounded (readers.check_files)."""
    prefix = Path(prefix)
    files = [Path(f"{prefix}.index"), *prefix.parent.glob(f"{glob.escape(prefix.name)}.data-*")]
    check_files([f for f in files if os.path.lexists(f)], MAX_CHECKPOINT_BYTES, f"the checkpoint {prefix}",
                TargetError)
    return str(prefix)


def _record_checked(folder):
    record = Path(folder) / "checkpoint"  # TensorFlow's record of a folder's checkpoints, which it reads itself
    if os.path.lexists(record):
        check_files([record], 1 << 20, f"the checkpoint record {record}", TargetError)


def _state(folder):
    _record_checked(folder)
    return tf.train.get_checkpoint_state(str(folder))


def _latest(folder):
    _record_checked(folder)
    return tf.train.latest_checkpoint(str(folder))


def find(run: RunDir, which="best") -> str:
    """The prefix of a run's checkpoint: "best" (the run's final model, which results.json names once training has
    finished: the best epoch's weights, or the EMA, with precise-BN statistics when they ran; before that, the
    best validation accuracy so far, falling back to the latest while there is no best), "latest",
    "recalibrated" (the newest precise-BN one), "ema", or a training step (an int or digits)."""
    if str(which).isdigit():
        step = int(which)
        for folder in (run.checkpoints, run.best):
            state = _state(folder)
            for prefix in (state.all_model_checkpoint_paths if state else []):
                if checkpoint_step(prefix) == step:
                    return prefix
        raise TargetError(f"{run.path}: no checkpoint of step {step} (the run keeps: "
                              f"{', '.join(str(checkpoint_step(p)) for p in all_training(run)) or 'none'})")
    if which == "recalibrated":
        prefix = _latest(run.recalibrated)
        if prefix is None:
            raise TargetError(f"{run.path}: no recalibrated checkpoint (convbn recalibrate {run.path})")
        return prefix
    final = run.final_checkpoint() if which == "best" else None
    if final is not None:  # a finished run: exactly the model its summary and results.json measured
        return final
    ema = _latest(run.ema)
    if which == "ema" and ema is None:
        raise TargetError(f"{run.path}: no EMA checkpoint (train.ema was off, or training has not finished)")
    if which in ("ema", "best") and ema is not None:
        return ema
    if which not in CHOICES:
        raise TargetError(f"--checkpoint: expected one of {', '.join(CHOICES)} or a training step, got {which!r}")
    prefix = _latest(run.best) if which == "best" else None
    prefix = prefix or _latest(run.checkpoints)  # no best yet, or latest asked for
    if prefix is None:
        raise TargetError(f"{run.path}: the run has no checkpoint yet")
    return prefix


def all_training(run: RunDir) -> list[str]:
    state = _state(run.checkpoints)
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
    checked(prefix)
    try:
        status = ckpt.restore(str(prefix))
        status.assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001  a damaged file fails in many ways (OpError, IndexError, ...)
        first = " ".join(str(e).split())[:300]
        raise TargetError(f"{prefix}: cannot restore this model from it ({type(e).__name__}: {first})") from None
    status.expect_partial()  # optimizer slots and training counters are not needed here
    return status


# What the machine says when a checkpoint cannot be read now, rather than that it is damaged
NOT_NOW = (PermissionError, tf.errors.PermissionDeniedError, tf.errors.UnavailableError,
           tf.errors.ResourceExhaustedError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)


def restore_latest(ckpt, manager, log, warn=None):
    """Restore the newest checkpoint that loads, of those the run records (or, when its record is lost, of the
    `ckpt-N` files in the folder). Each damaged newer one (a kill mid-write, a truncated, empty or unreadable file)
    is reported in one line (`warn`) once an older one has loaded; when none loads, one RunDirError says so."""
    warn = warn or log
    damaged = []
    for path in _resume_candidates(manager):
        try:
            ckpt.restore(checked(path)).assert_existing_objects_matched()
        except NOT_NOW as e:  # not the file's fault: falling back would retrain, and the newer one could be pruned
            raise RunDirError(f"{path}: cannot be read now ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                              "nothing was changed: resume again once it can") from None
        except Exception as e:  # noqa: BLE001  a damaged file fails in many ways (OpError, IndexError, ...)
            damaged.append((path, " ".join(f"{type(e).__name__}: {e}".split())[:160]))
            continue
        for bad, why in damaged:
            warn(f"warning: {bad}: damaged, cannot resume from it ({why}); resuming from the older {Path(path).name}")
        log(f"resumed from {path} (step {checkpoint_step(path)})")
        return path
    if damaged:
        names = ", ".join(Path(bad).name for bad, _ in damaged)
        raise RunDirError(f"{manager.directory}: no intact checkpoint to resume from ({names}: damaged; the newest: "
                          f"{damaged[0][1]}); nothing was changed")
    return None


def _resume_candidates(manager) -> list:
    """The checkpoints a resume may start from, newest first: those the manager's record keeps, or, where the
    record is unreadable or lost (TensorFlow then reads it as none), every `ckpt-N` with its index in the folder.
    Files the record does not name are not taken while it names some: a kill between a checkpoint and its record
    leaves the epoch's best checkpoint unsaved, and the epoch is run again."""
    paths = list(manager.checkpoints)
    if not paths:
        folder = Path(manager.directory)
        paths = [str(folder / p.name[:-len(".index")]) for p in folder.glob("ckpt-*.index")]
    return sorted(paths, key=checkpoint_step, reverse=True)


def save_recalibrated(model, run: RunDir, source_prefix) -> str:
    """Save the model as `checkpoints/recalibrated/ckpt-<n>`, n the next free number: never over anything.
    Beside it, `ckpt-<n>.source` names the checkpoint it was recalibrated from."""
    return _save_model(model, run.recalibrated, next_number(run.recalibrated, r"ckpt-(\d+)\.index"), source_prefix)


def save_ema(model, run: RunDir, source_prefix) -> str:
    """Save the model (holding the averaged weights) as `checkpoints/ema/ckpt-<step>`, step that of
    `source_prefix`, the raw checkpoint saved at the same step (named in `ckpt-<step>.source`)."""
    return _save_model(model, run.ema, checkpoint_step(source_prefix), source_prefix)


def _save_model(model, folder, number, source_prefix) -> str:
    """The model as `folder/ckpt-<number>` with its `.source`, written first: a checkpoint here is never without
    it. A refused write leaves neither (nor `folder`, if this made it) and is a WriteError naming the checkpoint."""
    prefix = Path(folder) / f"ckpt-{number}"
    with _all_or_nothing(prefix, extra=(f"{prefix.name}.source", "checkpoint")):
        write_text_atomic(f"{prefix}.source", f"{source_prefix}\n")
        _record_checked(folder)
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), folder, max_to_keep=None,
                                             checkpoint_name="ckpt")
        return manager.save(checkpoint_number=number)
