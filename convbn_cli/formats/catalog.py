"""What each model file format is called and what it says about itself (no TensorFlow).

The formats convbn writes and reads, their file names, where each keeps convbn's metadata (class names, whether it
takes raw pixels), the manifest of a SavedModel directory, and the bounds a .keras archive is checked against
before Keras reads it. The CLI lists the formats in --help and `locate` names a TARGET's kind from here, before
TensorFlow loads; formats/runtime.py writes, opens and runs them.

Adding a format: an entry in FORMAT_INFO (and its metadata below, if it has room for any) here, and its writer and
reader in formats/runtime.py. Nothing else names a format's suffix.

Where each export keeps what it says about itself:
    .keras      the archive member convbn.json (Keras reads only its own members)
    SavedModel  the "model" entry of convbn_export.json, the manifest of the files convbn wrote there
    .onnx       the model's metadata property "convbn"
    .tflite     the model's metadata entry "convbn" (a named buffer of the flatbuffer's Model table)
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConvbnError, TargetError
from ..files import write_json_atomic
from ..readers import check_zip, parse_json, read_json


@dataclass(frozen=True)
class Format:
    name: str  # what --format takes
    suffix: str | None  # the file's ending; None: a directory (any name)
    keras: bool  # a Keras model: every command can open it; the others only run (eval, predict)


FORMAT_INFO = {f.name: f for f in (Format("keras", ".keras", True), Format("savedmodel", None, False),
                                   Format("tflite", ".tflite", False), Format("onnx", ".onnx", False))}
FORMATS = tuple(FORMAT_INFO)  # what --format takes
SUFFIXES = {f.suffix: f.name for f in FORMAT_INFO.values() if f.suffix}

METADATA_KEY = "convbn"  # an ONNX model's metadata property
KERAS_MEMBER = "convbn.json"  # the member of a .keras archive
MANIFEST = "convbn_export.json"  # in every SavedModel export: each file convbn wrote there, with size and hash
SAVED_MODEL_FILE = "saved_model.pb"  # what makes a directory a SavedModel
MAX_METADATA_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 1 << 20


def format_of(path) -> str | None:
    """The format a path names by its ending ("keras", "tflite", "onnx"), "savedmodel" for a directory holding a
    SavedModel (and no run's config.yaml), or None."""
    path = Path(path)
    if path.suffix in SUFFIXES:
        return SUFFIXES[path.suffix]
    if path.is_dir() and (path / SAVED_MODEL_FILE).is_file() and not (path / "config.yaml").exists():
        return "savedmodel"
    return None


def file_name(stem: str, fmt: str) -> str:
    """`stem` named as a `fmt` file (a SavedModel directory: STEM_savedmodel)."""
    return stem + (FORMAT_INFO[fmt].suffix or "_savedmodel")


# --------------------------------------------------------------------------- what an export says about itself

def metadata_text(about: dict) -> str:
    return json.dumps(about)


def write_keras_metadata(path, about: dict) -> None:
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(KERAS_MEMBER, metadata_text(about))


def read_metadata(path, onnx_meta: dict | None = None) -> dict:
    """What an export says about itself ({} when it says nothing or is not convbn's); never raises for a model
    from elsewhere. `onnx_meta`: an ONNX model's metadata properties (its session's custom_metadata_map), or a
    TFLite model's metadata entry (formats/runtime.tflite_metadata)."""
    path = Path(path)
    try:
        if path.is_dir():
            about = read_json(path / MANIFEST, MAX_METADATA_BYTES, "an export manifest", TargetError).get("model")
        elif path.suffix == ".keras":
            with zipfile.ZipFile(path) as z:
                info = z.getinfo(KERAS_MEMBER)
                if info.file_size > MAX_METADATA_BYTES:
                    return {}
                about = parse_json(z.read(info), path, TargetError)
        elif path.suffix in (".onnx", ".tflite") and onnx_meta is not None:
            about = parse_json(onnx_meta.get(METADATA_KEY, "{}"), path, TargetError)
        else:
            return {}
    except (TargetError, KeyError, OSError, zipfile.BadZipFile, AttributeError):
        return {}
    if not isinstance(about, dict) or about.get("written_by") != "convbn":
        return {}
    names = about.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        return {}
    return about


# --------------------------------------------------------------------------- a SavedModel directory's manifest

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


def not_ours(folder: Path):
    """Why the tree at `folder` is not exactly an export convbn wrote (None if it is): every file must be in its
    manifest with the same size and hash, every directory too, and nothing may be a link or a special file."""
    try:
        manifest = read_json(folder / MANIFEST, MAX_MANIFEST_BYTES, "an export manifest")
        files, dirs = manifest["files"], set(manifest["dirs"])
        assert manifest.get("written_by") == "convbn" and isinstance(files, dict)
    except ConvbnError:  # unreadable, too large, not JSON
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


# --------------------------------------------------------------------------- a .keras archive's bounds

# What a .keras archive of an MNIST-like conv net may declare, member by member, checked before Keras reads any:
# its config and metadata are a few KB to a few MB, its weights tens of MB for the largest nets convbn builds.
KERAS_MEMBER_LIMITS = {"config.json": 16 << 20, "metadata.json": 1 << 20, "model.weights.h5": 512 << 20}
KERAS_OTHER_MEMBER_BYTES = 64 << 20  # assets
KERAS_TOTAL_BYTES = 600 << 20


def check_keras_archive(path) -> None:
    """A .keras file must be a zip archive whose members stay within the bounds above (read before Keras reads)."""
    check_zip(path, KERAS_MEMBER_LIMITS, KERAS_OTHER_MEMBER_BYTES, total_limit=KERAS_TOTAL_BYTES,
              what="a .keras model of an MNIST-like conv net", error=TargetError)
