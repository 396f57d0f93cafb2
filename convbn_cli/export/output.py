"""Where an export may be written: the checks that keep `convbn export --output PATH` from ever deleting what a
user did not ask to replace (no TensorFlow)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import ConvbnError
from ..files import write_json_atomic
from ..readers import read_json
from ..runs.exported import MANIFEST

FORMATS = ("keras", "savedmodel", "tflite", "onnx")

SUFFIX = {"keras": ".keras", "tflite": ".tflite", "onnx": ".onnx"}  # a SavedModel is a directory: any other name


def check_output(path: Path, fmt: str, force: bool) -> Path:
    """Refuse (exit 2, nothing touched) an output whose name does not fit the format, or one that exists, unless
    `force` and it is a previous export of the same kind: a file for .keras/.tflite; for savedmodel, a directory
    whose every file convbn wrote there, unchanged (its manifest, MANIFEST, says so). Never the working directory or above it, a run directory or anything holding one.
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
    if path.is_symlink() or not path.is_dir():
        raise ConvbnError(f"--output {path}: not a SavedModel directory; --force replaces only a previous export")
    problem = _not_ours(path)
    if problem:
        raise ConvbnError(f"--output {path}: {problem}; --force replaces only a SavedModel directory convbn wrote, "
                          "exactly as it wrote it")
    return path


MAX_MANIFEST_BYTES = 1 << 20


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, about: dict | None = None) -> None:
    """Record every file and directory under `folder` (just written by convbn, still in its staging directory),
    so that a later `--force` can tell the tree is still exactly what convbn wrote; `about`: what the model is
    (class names, input), kept beside the list as "model"."""
    folder = Path(folder)
    files, dirs = {}, []
    for here, subdirs, names in os.walk(folder):
        rel = Path(here).relative_to(folder)
        dirs += [str(rel / d) for d in subdirs]
        for n in names:
            files[str(rel / n)] = {"size": (Path(here) / n).stat().st_size, "sha256": _hash(Path(here) / n)}
    write_json_atomic(folder / MANIFEST, {"written_by": "convbn", "dirs": sorted(dirs), "files": files,
                                          **({"model": about} if about else {})})


def _not_ours(folder: Path):
    """Why the tree at `folder` is not exactly an export convbn wrote (None if it is): every file must be in its
    manifest with the same size and hash, every directory too, and nothing may be a link or a special file."""
    try:
        manifest = read_json(folder / MANIFEST, MAX_MANIFEST_BYTES, "an export manifest")
        files, dirs = manifest["files"], set(manifest["dirs"])
        assert manifest.get("written_by") == "convbn" and isinstance(files, dict)
    except ConvbnError:
        return f"holds no readable {MANIFEST} (not an export convbn wrote, or one from before it kept one)"
    except (KeyError, TypeError, AssertionError):
        return f"its {MANIFEST} is not one convbn wrote"
    for here, subdirs, names in os.walk(folder):
        rel = Path(here).relative_to(folder)
        for d in subdirs:
            if (Path(here) / d).is_symlink() or str(rel / d) not in dirs:
                return f"{rel / d} is not a directory convbn wrote"
        for n in names:
            p, key = Path(here) / n, str(rel / n)
            if key == MANIFEST and rel == Path("."):
                continue
            entry = files.get(key)
            if p.is_symlink() or not p.is_file() or not isinstance(entry, dict):
                return f"{key} is not a file convbn wrote"
            if p.stat().st_size != entry.get("size") or _hash(p) != entry.get("sha256"):
                return f"{key} was changed after convbn wrote it"
    return None
