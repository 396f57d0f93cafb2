"""Where a TARGET is and what kind of thing it is, decided without TensorFlow (no TensorFlow).

Every command that opens a target (`open_target`) asks here first, and the CLI asks before it imports TensorFlow,
so that a mistyped path is one line in well under a second rather than after TensorFlow's start-up.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import TargetError
from ..readers import check_zip
from .rundir import RunDir, RunDirError


@dataclass(frozen=True)
class Located:
    kind: str  # "run" (a run directory), "prefix" (a checkpoint prefix), "keras", "tflite", "onnx" (a model file)
    # or "savedmodel" (a directory)
    path: Path


def locate(target, *, tflite: bool = False) -> Located:
    """What TARGET is; raise TargetError (one line) for anything that cannot be one. `tflite`: whether the command
    can run the inference-only formats (.tflite, .onnx, a SavedModel directory)."""
    path = Path(target)
    if path.suffix in (".keras", ".tflite", ".onnx"):
        if path.suffix in (".tflite", ".onnx") and not tflite:
            raise TargetError(f"{path}: this command needs a Keras model or a checkpoint, not a {path.suffix} file "
                              "(those run in eval and predict)")
        if not path.is_file():
            raise TargetError(f"{path}: no such file")
        if path.suffix == ".keras" and not zipfile.is_zipfile(path):
            raise TargetError(f"{path}: not a Keras model file (a .keras file is a zip archive; this one is "
                              f"{'empty' if path.stat().st_size == 0 else 'something else'})")
        if path.suffix == ".keras":
            check_keras_archive(path)  # bounded: an archive whose members inflate to gigabytes is refused unread
        return Located(path.suffix[1:], path)
    if path.is_dir() and (path / "saved_model.pb").is_file() and not (path / "config.yaml").exists():
        if not tflite:
            raise TargetError(f"{path}: a SavedModel runs in eval and predict; this command needs a Keras model or a "
                              "checkpoint (export with --format keras)")
        return Located("savedmodel", path)
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


# What a .keras archive of an MNIST-like conv net may declare, member by member, checked before Keras reads any:
# its config and metadata are a few KB to a few MB, its weights tens of MB for the largest nets convbn builds.
KERAS_MEMBER_LIMITS = {"config.json": 16 << 20, "metadata.json": 1 << 20, "model.weights.h5": 512 << 20}
KERAS_OTHER_MEMBER_BYTES = 64 << 20  # assets
KERAS_TOTAL_BYTES = 600 << 20


def check_keras_archive(path) -> None:
    check_zip(path, KERAS_MEMBER_LIMITS, KERAS_OTHER_MEMBER_BYTES, total_limit=KERAS_TOTAL_BYTES,
              what="a .keras model of an MNIST-like conv net", error=TargetError)
