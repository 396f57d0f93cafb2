"""Where an export may be written: the checks that keep `convbn export --output PATH` from ever deleting what a
user did not ask to replace (no TensorFlow)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConvbnError

FORMATS = ("keras", "savedmodel", "tflite")

SUFFIX = {"keras": ".keras", "tflite": ".tflite"}  # a SavedModel is a directory: any name without these
SAVEDMODEL_ENTRIES = {"saved_model.pb", "variables", "assets", "fingerprint.pb", "keras_metadata.pb"}


def check_output(path: Path, fmt: str, force: bool) -> Path:
    """Refuse (exit 2, nothing touched) an output whose name does not fit the format, or one that exists, unless
    `force` and it is a previous export of the same kind: a file for .keras/.tflite, a directory holding exactly
    a SavedModel for savedmodel. Never the working directory or above it, a run directory or anything holding one.
    """
    path = Path(path)
    want = SUFFIX.get(fmt)
    if want and path.suffix != want:
        raise ConvbnError(f"--output {path}: a {fmt} export must end in {want}")
    if not want and path.suffix in SUFFIX.values():
        raise ConvbnError(f"--output {path}: a SavedModel is a directory; a name ending in {path.suffix} is for "
                          f"--format {next(k for k, v in SUFFIX.items() if v == path.suffix)}")
    if not (path.exists() or path.is_symlink()):
        return path
    if not force:
        raise ConvbnError(f"--output {path}: already exists; add --force to replace a previous export there")
    resolved = path.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise ConvbnError(f"--output {path}: is the working directory or above it; never replaced")
    if want:
        if path.is_symlink() or not path.is_file():
            raise ConvbnError(f"--output {path}: not a {want} file; --force replaces only a previous export")
        return path
    if path.is_symlink() or not path.is_dir() or not _is_savedmodel(path):
        raise ConvbnError(f"--output {path}: not a SavedModel directory (or it holds other files); --force replaces "
                          "only a previous export")
    return path


def _is_savedmodel(folder: Path) -> bool:
    """Exactly a SavedModel: saved_model.pb and nothing but SavedModel entries (so no run directory, no config.yaml,
    no user's files)."""
    names = set(os.listdir(folder))
    return "saved_model.pb" in names and names <= SAVEDMODEL_ENTRIES
