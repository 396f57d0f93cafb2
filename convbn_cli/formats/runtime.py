"""Writing, opening and running each model file format: one writer and one reader per format, one check of what
a model takes and gives, and one wrapper for models that take raw pixels.

Readers turn every failure of the file into one TargetError line naming it. A reader gives an `Opened`: the Keras
model (for .keras) or nothing, a predict function (images -> logits, NumPy), what it takes and gives, and what the
file says about itself (formats/catalog.py). Which formats exist, their names and suffixes: formats/catalog.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from ..errors import ConvbnError, TargetError
from ..model.fold import PIXELS_INPUT, takes_pixels
from ..readers import read_bytes
from ..tf_setup import quiet_native
from .catalog import (
    METADATA_KEY,
    check_keras_archive,
    metadata_text,
    read_metadata,
    write_keras_metadata,
    write_manifest,
)

ONNX_OPSET = 17  # onnxruntime has run it since 1.11 (2022)
MAX_ONNX_BYTES = 512 << 20


@dataclass
class Opened:
    """A model file, opened.

    fmt: its format (formats/catalog.py). model: the Keras model (a .keras file), else None.
    predict: images (NumPy float32, as the file's input takes them) -> logits (NumPy).
    shape: (H, W, C) of its input; classes: scores per image. takes_pixels: its input is raw 0-255 pixels (an
    export with its preprocessing inside). about: what the file says about itself ({} when nothing).
    """

    fmt: str
    predict: Callable
    shape: tuple
    classes: int
    takes_pixels: bool = False
    about: dict = field(default_factory=dict)
    model: Optional[object] = None


def _cut(e: Exception, n: int = 300) -> str:
    return " ".join(str(e).split())[:n]


def check_signature(path, inputs: list, outputs: list) -> tuple:
    """((H, W, C), classes) of a model with one input of images of a known size (N, H, W, C) and one output of
    one score per class (N, classes): what every command here measures. `inputs`, `outputs`: their shapes."""
    if len(inputs) != 1 or len(outputs) != 1:
        raise TargetError(f"{path}: has {len(inputs)} inputs and {len(outputs)} outputs; convbn measures image "
                          "classifiers with one input (N, H, W, C) and one output (N, classes)")
    shape, out = tuple(inputs[0]), tuple(outputs[0])
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise TargetError(f"{path}: takes inputs of shape {shape}; convbn needs images of a known size, "
                          "(N, H, W, C)")
    if len(out) != 2 or not isinstance(out[1], int) or out[1] < 2:
        raise TargetError(f"{path}: gives outputs of shape {out}; convbn needs one score per class, "
                          "(N, classes) with at least 2 classes")
    return shape[1:], out[1]


def _shape(dims) -> tuple:
    """A shape with unknown dimensions as None, whatever the runtime calls them (-1, a name, None)."""
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in dims)


def from_pixels(predict: Callable, to_pixels: Callable) -> Callable:
    """normalized images -> logits for a model that takes raw pixels (`predict`), given the run's inverse of its
    normalization (`to_pixels`): every command hands a target normalized images."""
    return lambda x: predict(np.asarray(to_pixels(x)))


# --------------------------------------------------------------------------- readers, one per format

def read_keras(path) -> Opened:
    """A .keras archive, bounded before Keras reads it (catalog.check_keras_archive) and loaded with safe_mode:
    no code from the file runs."""
    path = Path(path)
    check_keras_archive(path)
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as e:  # noqa: BLE001  a damaged archive fails in many ways (ValueError, KeyError, OSError, ...)
        raise TargetError(f"{path}: cannot load ({type(e).__name__}: {_cut(e)})") from None
    inputs = [tuple(t.shape) for t in (getattr(model, "inputs", None) or [])]
    outputs = [tuple(t.shape) for t in (getattr(model, "outputs", None) or [])]
    shape, classes = check_signature(path, inputs, outputs)
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return Opened("keras", lambda x: fn(tf.constant(x)).numpy(), shape, classes, takes_pixels(model),
                  read_metadata(path), model)


def open_interpreter(path):
    """A TFLite interpreter with its tensors allocated, without the deprecation warning and the XNNPACK notice
    it prints (shown with --verbose)."""
    with quiet_native():
        interpreter = tf.lite.Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
    return interpreter


def read_tflite(path) -> Opened:
    try:
        interpreter = open_interpreter(path)
    except (ValueError, RuntimeError, OSError) as e:
        raise TargetError(f"{path}: not a readable TFLite model ({_cut(e)})") from None
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    shape, classes = check_signature(path, [_shape(d["shape"]) for d in inputs], [_shape(d["shape"]) for d in outputs])

    def run(x):  # the interpreter's input resized to each batch
        inp = interpreter.get_input_details()[0]
        if tuple(inp["shape"]) != x.shape:
            interpreter.resize_tensor_input(inp["index"], x.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    return Opened("tflite", run, shape, classes, PIXELS_INPUT in inputs[0]["name"], read_metadata(path))


def read_onnx(path) -> Opened:
    """An ONNX model through onnxruntime (the `onnx` extra), loaded once: its signature, metadata and predictions."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise TargetError(f"{path}: running an ONNX model needs onnxruntime: pip install 'convbn[onnx]'") from None
    data = read_bytes(path, MAX_ONNX_BYTES, "an ONNX model of an MNIST-like conv net", TargetError)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph optimizations
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  onnxruntime fails on a damaged model in its own exception types
        raise TargetError(f"{path}: not a readable ONNX model ({_cut(e, 200)})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape, classes = check_signature(path, [_shape(i.shape) for i in inputs], [_shape(o.shape) for o in outputs])
    name = inputs[0].name
    about = read_metadata(path, session.get_modelmeta().custom_metadata_map)
    return Opened("onnx", lambda x: session.run(None, {name: x})[0], shape, classes, PIXELS_INPUT in name, about)


def read_savedmodel(path) -> Opened:
    """A SavedModel directory's serving function."""
    try:
        loaded = tf.saved_model.load(str(path))
        serve = loaded.signatures["serving_default"]
    except Exception as e:  # noqa: BLE001  a damaged SavedModel fails in many ways
        raise TargetError(f"{path}: not a readable SavedModel ({_cut(e, 200)})") from None
    specs, outs = list(serve.structured_input_signature[1].values()), list(serve.structured_outputs.values())
    shape, classes = check_signature(path, [_shape(s.shape) for s in specs], [_shape(o.shape) for o in outs])
    return Opened("savedmodel", lambda x: loaded.serve(tf.constant(x)).numpy(), shape, classes,
                  PIXELS_INPUT in (specs[0].name or ""), read_metadata(path))


READERS = {"keras": read_keras, "tflite": read_tflite, "onnx": read_onnx, "savedmodel": read_savedmodel}


def read(fmt: str, path) -> Opened:
    """The model file at `path`, opened by its format's reader; what it says about its input (metadata) wins over
    its input's name."""
    opened = READERS[fmt](path)
    if opened.about.get("input"):
        opened.takes_pixels = opened.about["input"] == "pixels"
    return opened


# --------------------------------------------------------------------------- writers, one per format

def _onnx_converter():
    try:
        import tf2onnx
    except ImportError:
        raise ConvbnError("--format onnx needs tf2onnx and onnxruntime: pip install 'convbn[onnx]'") from None
    return tf2onnx


def write(model, fmt: str, path: Path, about: dict) -> None:
    """`model` as `fmt` at `path`, with `about` (class names, what the input is) inside it where the format has
    room: a member of the .keras archive, the SavedModel's manifest, the ONNX model's metadata."""
    if fmt == "keras":
        model.save(path)
        if about:
            write_keras_metadata(path, about)
    elif fmt == "savedmodel":
        model.export(str(path), format="tf_saved_model", verbose=False)
        write_manifest(path, about)  # also what --force may replace later: exactly these files
    elif fmt == "onnx":
        tf2onnx = _onnx_converter()
        spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=model.inputs[0].name),)
        fn = tf.function(lambda x: model(x, training=False))
        with quiet_native():
            proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=ONNX_OPSET)
        if about:
            proto.metadata_props.add(key=METADATA_KEY, value=metadata_text(about))
        path.write_bytes(proto.SerializeToString())
    else:  # TFLite converts from a SavedModel, written beside the output (inside the staging directory)
        saved = path.parent / "savedmodel"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        with quiet_native():  # the converter's MLIR passes print to fd 2
            path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert())
