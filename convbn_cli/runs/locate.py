"""Where a TARGET is and what kind of thing it is, decided without TensorFlow (no TensorFlow).

Every command that opens a target (`open_target`) asks here first, and the CLI asks before it imports TensorFlow,
so that a mistyped path is one line in well under a second rather than after TensorFlow's start-up.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, TargetError
from ..formats.catalog import FORMAT_INFO, check_keras_archive, format_of
from .rundir import RunDir, RunDirError


@dataclass(frozen=True)
class Located:
    kind: str  # "run" (a run directory), "prefix" (a checkpoint prefix), or a model file's format (formats/catalog.py)
    path: Path
    note: str | None = None  # what was chosen for the user, to tell them (a checkpoint folder: its newest checkpoint)


CHECKPOINT = re.compile(r"ckpt-(\d+)\.index")


def locate(target, *, runnable_only: bool = False) -> Located:
    """What TARGET is; raise TargetError (one line) for anything that cannot be one. `runnable_only`: whether the
    command can take the formats that only run (.tflite, .onnx, a SavedModel directory: eval and predict)."""
    path = Path(target)
    fmt = format_of(path)
    if fmt is not None:
        if not FORMAT_INFO[fmt].keras and not runnable_only:
            what = "a SavedModel" if FORMAT_INFO[fmt].suffix is None else f"a {path.suffix} file"
            raise TargetError(f"{path}: this command needs a Keras model or a checkpoint, not {what} (those run in "
                              "eval and predict; export with --format keras)")
        if fmt == "savedmodel":
            return Located(fmt, path)
        if not path.is_file():
            raise TargetError(f"{path}: no such file")
        if fmt == "keras":
            if not zipfile.is_zipfile(path):
                raise TargetError(f"{path}: not a Keras model file (a .keras file is a zip archive; this one is "
                                  f"{'empty' if path.stat().st_size == 0 else 'something else'})")
            check_keras_archive(path)  # bounded: an archive whose members inflate to gigabytes is refused unread
        return Located(fmt, path)
    if path.is_dir():
        run = _run_of_folder(path)
        if run is not None:
            return _checkpoint_folder(path, run)
        try:
            RunDir.open(path)
        except RunDirError as e:
            raise TargetError(str(e)) from None
        return Located("run", path)
    if Path(f"{path}.index").is_file():
        return Located("prefix", path)
    if path.suffix == ".index" or ".data-" in path.name:
        raise TargetError(f"{path}: give the checkpoint prefix without its extension, e.g. "
                          f"{str(path).split('.index')[0].split('.data-')[0]}")
    if path.exists():  # a file, but of no kind convbn opens: say which kinds it does, not "no such run directory"
        raise TargetError(f"{path}: {_unknown_file(path)}; TARGET is {accepted(runnable_only)}")
    raise TargetError(f"{path}: no such run directory or checkpoint")


def accepted(runnable_only: bool) -> str:
    """The kinds of TARGET a command takes, in words."""
    kinds = ["a run directory", "a checkpoint prefix (runs/x/1/checkpoints/ckpt-420)"] + [
        f"a {f.suffix} file" if f.suffix else "a SavedModel directory" for f in FORMAT_INFO.values()
        if f.keras or runnable_only]
    return ", ".join(kinds[:-1]) + " or " + kinds[-1]


def _unknown_file(path: Path) -> str:
    if path.suffix.lower() in (".h5", ".hdf5"):
        return ("a Keras HDF5 model, a format convbn does not open (load it in Keras and save it again as "
                "NAME.keras, Keras 3's format)")
    return f"not a model file convbn opens ({f'a {path.suffix} file' if path.suffix else 'no known file ending'})"


def _run_of_folder(path: Path) -> Path | None:
    """The run directory whose checkpoints/ (or a folder of it: best/, recalibrated/, ema/) `path` is, else None."""
    full = path.resolve()
    for run, folder in ((full.parent, full), (full.parent.parent, full.parent)):
        if folder.name == "checkpoints" and (run / "config.yaml").is_file():
            return run
    return None


def _checkpoint_folder(path: Path, run: Path) -> Located:
    """A folder inside a run directory (checkpoints/, checkpoints/recalibrated/, ...), as `convbn recalibrate`
    prints one: its newest checkpoint (the numbers are training steps, or recalibrate's count), said aloud; a folder
    without checkpoints is refused with what to pass instead."""
    numbers = sorted(int(m.group(1)) for p in path.iterdir() if (m := CHECKPOINT.fullmatch(p.name)))
    if not numbers:
        run = Path(os.path.relpath(run)) if not path.is_absolute() else run  # as the user wrote the path
        raise TargetError(f"{path}: holds no checkpoint; pass the run directory {run} (with --checkpoint best, latest, "
                          "recalibrated, ema or a step), or a checkpoint prefix such as "
                          f"{run / 'checkpoints' / 'ckpt-STEP'}")
    prefix = path / f"ckpt-{numbers[-1]}"
    more = f" (of {len(numbers)}: name another as {path / 'ckpt-N'})" if len(numbers) > 1 else ""
    return Located("prefix", prefix, f"{path}: using its newest checkpoint, {prefix}{more}")


def run_of(where: Located) -> Path | None:
    """The run directory a located target belongs to (its config says which data the model takes), or None for a
    model from outside convbn."""
    if where.kind == "run":
        return where.path
    above = where.path.resolve().parents
    if where.kind == "prefix":  # checkpoints/ckpt-K or checkpoints/FOLDER/ckpt-K
        above = above[1:3]
    return next((p for p in above if (p / "config.yaml").is_file()), None)


def check_data_for(where: Located, target, data) -> None:
    """--data names the images for a model from outside convbn; a convbn run's model takes its own config's dataset,
    so another there would be silently ignored: refused in one line (its own dataset's name is harmless)."""
    if data is None:
        return
    run = run_of(where)
    if run is None:
        return
    try:
        dataset = RunDir(run).load_config().dataset_name
    except RunDirError as e:
        raise TargetError(str(e)) from None
    check_data_of_run(target, dataset, data)


def check_data_of_run(target, dataset: str, data) -> None:
    if str(data) != dataset:
        raise DataError(f"--data {data}: {target} is a convbn run's model, trained on {dataset} (its config.yaml "
                        "says so), and is measured on that; --data is for models from outside convbn: leave it out")
