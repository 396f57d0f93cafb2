"""Models convbn exported, used away from their run directory: what each says about itself (its class names and
whether it takes raw pixels, written by `convbn export`), and running the formats that are inference only (ONNX
through onnxruntime, a SavedModel's serving function). No TensorFlow at import.

Where each export keeps what it says about itself:
    .keras      the archive member convbn.json (Keras reads only its own members)
    SavedModel  the "model" entry of convbn_export.json, the manifest of the files convbn wrote there
    .onnx       the model's metadata property "convbn"
    .tflite     nothing (the run directory above it, if any, says it)
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from ..errors import TargetError
from ..readers import parse_json, read_bytes, read_json

METADATA_KEY = "convbn"
KERAS_MEMBER = "convbn.json"
MANIFEST = "convbn_export.json"  # in every SavedModel export: each file convbn wrote there, with size and hash
MAX_METADATA_BYTES = 1 << 20


def write_keras_metadata(path, about: dict) -> None:
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(KERAS_MEMBER, json.dumps(about))


def read_metadata(path, session=None) -> dict:
    """What an export says about itself ({} when it says nothing or is not convbn's); never raises for a model
    from elsewhere. `session`: an ONNX model's session, when one is open already (no second load)."""
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
        elif path.suffix == ".onnx":
            meta = (session or onnx_session(path)).get_modelmeta().custom_metadata_map
            about = parse_json(meta.get(METADATA_KEY, "{}"), path, TargetError)
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


MAX_ONNX_BYTES = 512 << 20


def onnx_session(path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise TargetError(f"{path}: running an ONNX model needs onnxruntime: pip install 'convbn[onnx]'") from None
    data = read_bytes(path, MAX_ONNX_BYTES, "an ONNX model of an MNIST-like conv net", TargetError)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph optimizations
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  onnxruntime fails on a damaged model in its own exception types
        raise TargetError(f"{path}: not a readable ONNX model ({' '.join(str(e).split())[:200]})") from None


def onnx_predict(session):
    """images -> logits through an onnxruntime session (onnx_session)."""
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def onnx_signature(session, path) -> tuple:
    """((H, W, C) of its one input, number of classes, input name) of an ONNX model's session."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise TargetError(f"{path}: has {len(inputs)} inputs and {len(outputs)} outputs; convbn runs image "
                          "classifiers with one input and one output")
    shape, out = inputs[0].shape, outputs[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]) or len(out) != 2 or not isinstance(out[1], int):
        raise TargetError(f"{path}: takes {shape} and gives {out}; convbn needs (N, H, W, C) images and (N, classes)")
    return tuple(shape[1:]), out[1], inputs[0].name
