"""Where a TARGET is and what kind of thing it is, decided without TensorFlow (no TensorFlow).

Every command that opens a target (`open_target`) asks here first, and the CLI asks before it imports TensorFlow,
so that a mistyped path is one line in well under a second rather than after TensorFlow's start-up.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import TargetError
from ..formats.catalog import FORMAT_INFO, check_keras_archive, format_of
from .rundir import RunDir, RunDirError


@dataclass(frozen=True)
class Located:
    kind: str  # "run" (a run directory), "prefix" (a checkpoint prefix), or a model file's format (formats/catalog.py)
    path: Path


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
    raise TargetError(f"{path}: no such run directory or checkpoint")
