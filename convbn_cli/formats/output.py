"""Where a model file may be written: the checks that keep `convbn export --output PATH` and `convbn recalibrate
MODEL.onnx --output PATH` from ever deleting what a user did not ask to replace (no TensorFlow). Here, below
analysis/ and export/, so that both commands share them."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConvbnError
from .catalog import FORMAT_INFO, SUFFIXES, not_ours


def check_output(path: Path, fmt: str, force: bool) -> Path:
    """Refuse (exit 2, nothing touched) an output whose name does not fit the format, or one that exists, unless
    `force` and it is a previous export of the same kind: a file for .keras/.tflite; for savedmodel, a directory
    whose every file convbn wrote there, unchanged (its manifest says so).
    Never the working directory or above it, a run directory or anything holding one.
    """
    path = Path(path)
    want = FORMAT_INFO[fmt].suffix
    if want and path.suffix != want:
        raise ConvbnError(f"--output {path}: a {fmt} export must end in {want}")
    if not want and path.suffix in SUFFIXES:
        raise ConvbnError(f"--output {path}: a SavedModel is a directory; a name ending in {path.suffix} is for "
                          f"--format {SUFFIXES[path.suffix]}")
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
    if path.is_symlink() or not path.is_dir():
        raise ConvbnError(f"--output {path}: not a SavedModel directory; --force replaces only a previous export")
    problem = not_ours(path)
    if problem:
        raise ConvbnError(f"--output {path}: {problem}; --force replaces only a SavedModel directory convbn wrote, "
                          "exactly as it wrote it")
    return path
