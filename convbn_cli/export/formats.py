"""`convbn export`: write a checkpoint as a .keras file, a TensorFlow SavedModel, a TFLite flatbuffer or an ONNX
model (tf2onnx, the `onnx` extra), each loadable with the ordinary tools alone (no convbn import), checked against
the original model, and each carrying its class names and input contract (export_metadata)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from ..data.registry import pixel_affine
from ..errors import ConvbnError
from ..files import remove_stale_temporaries, staged
from ..model.fold import standard_model
from ..runs.exported import METADATA_KEY, onnx_predict, onnx_session, write_keras_metadata
from ..runs.target import open_interpreter, open_target, tflite_predict
from ..tf_setup import quiet_native
from .output import FORMATS, SUFFIX, check_output, write_manifest
MAX_LOGIT_DIFF = 1e-4


class ExportError(ConvbnError):
    exit_code = 1  # not the user's input: the exported model does not reproduce the original


def _check_images(t, data, data_source, scale, n, log):
    """(pixels 0-255, normalized images) the exported model is checked on: the run's test images, or --data's
    for a model from elsewhere (pixels None: its export keeps its own input contract)."""
    d = t.eval_data(max(1, -(-n // 128)), split="test", data=data, data_source=data_source, scale=scale, log=log)
    return (None if d.pixels is None else d.pixels[:n]), d.images[:n]


def default_path(t, fmt: str, fold_bn: bool) -> Path:
    """RUN_DIR/export/model[-folded].<ext>, or beside a .keras file from elsewhere: NAME-folded / NAME-standard."""
    if t.run is None:
        src = Path(t.source)
        return src.with_name(f"{src.stem}-{'folded' if fold_bn else 'standard'}" + SUFFIX.get(fmt, "_savedmodel"))
    return t.run.export / (("model-folded" if fold_bn else "model") + SUFFIX.get(fmt, "_savedmodel"))


ONNX_OPSET = 17  # onnxruntime has run it since 1.11 (2022)


def _onnx_converter():
    try:
        import tf2onnx
    except ImportError:
        raise ConvbnError("--format onnx needs tf2onnx and onnxruntime: pip install 'convbn[onnx]'") from None
    return tf2onnx


def write(model, fmt: str, path: Path, about: dict) -> None:
    """`model` as `fmt` at `path`, with `about` (class names, what the input is: export_metadata) inside it where
    the format has room: a member of the .keras archive, the SavedModel's manifest, the ONNX model's metadata."""
    if fmt == "keras":
        model.save(path)
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
        proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(about))
        path.write_bytes(proto.SerializeToString())
    else:  # TFLite converts from a SavedModel, written beside the output (inside the staging directory)
        saved = path.parent / "savedmodel"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        with quiet_native():  # the converter's MLIR passes print to fd 2
            path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert())


def ways_to_run(fmt: str, path: Path) -> list:
    """Every way a user runs the exported file, each a function images -> logits (NumPy): for a .keras model a
    compiled call, an eager call and predict (they take different code paths in Keras); one way otherwise."""
    if fmt == "keras":
        import keras

        model = keras.saving.load_model(path, safe_mode=True)
        fn = tf.function(lambda x: model(x, training=False))
        return [lambda x: fn(tf.constant(x)).numpy(), lambda x: model(x, training=False).numpy(),
                lambda x: model.predict(x, verbose=0)]
    if fmt == "savedmodel":
        loaded = tf.saved_model.load(str(path))
        return [lambda x: loaded.serve(tf.constant(x)).numpy()]
    if fmt == "onnx":
        return [onnx_predict(onnx_session(path))]
    return [tflite_predict(open_interpreter(path))]


def throughput(fn, x, seconds=1.0) -> float:
    fn(x)  # warm-up (tracing)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def export(target, fmt="keras", *, fold_bn=False, output=None, which="best", data=None, check_images=256,
           force=False, data_source=None, scale=1 / 255, preprocessing=True, log=lambda m: None) -> dict:
    """Write TARGET with standard Keras/TensorFlow layers only, checked against the original model.

    Args:
        target: a run directory or checkpoint prefix (or a convbn .keras export).
        fmt: "keras", "savedmodel" or "tflite".
        fold_bn: fold each BN into the conv/dense layer before it.
        output: where to write (default: RUN_DIR/export/model[-folded].<ext>).
        which: a run directory's checkpoint ("best", "latest", "recalibrated", "ema" or a training step).
        check_images: how many test images the exported logits are compared on.
        force: replace a previous export at `output` (never anything else; see export/output.py).
        data_source, scale: the check images for a .keras model from outside convbn (see data/external.py);
            its export goes beside it by default (NAME-folded.keras, ...).
        preprocessing: the export takes raw 0-255 pixels, (N, H, W, 1) float32, and normalizes them itself as the
            run's `data.normalize` did; False: it takes normalized images, as the network inside convbn does.
            A model from outside convbn keeps its own input contract either way.

    Returns:
        source, path, format, fold_bn, folded/kept BN names, input ("pixels 0-255" or "normalized"),
        max_abs_logit_diff, checked_images, and the inference throughput (img/s) of the original and the export.
    """
    if fmt not in FORMATS:
        raise ConvbnError(f"unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    path = check_output(Path(output), fmt, force) if output else None  # before any work: a bad --output costs nothing
    t = open_target(target, which)
    path = path or check_output(default_path(t, fmt, fold_bn), fmt, force)
    model = t.model
    pixels, x = _check_images(t, data, data_source, scale, check_images, log)
    affine = pixel_affine(t.config.data.dataset, t.config.data.normalize) if preprocessing and t.config else None
    new, folded, kept = standard_model(model, fold_bn, affine)
    fed = pixels if affine else x  # what the exported model takes
    original = tf.function(lambda a: model(a, training=False))
    reference = original(tf.constant(x)).numpy()
    remove_stale_temporaries(path.parent, path.name)  # staging that a killed export left behind
    about = export_metadata(t, affine)
    with staged(path, before_replace=lambda: check_output(path, fmt, force)) as tmp:
        write(new, fmt, tmp, about)
        ways = ways_to_run(fmt, tmp)
        exported = ways[0]
        diff = max(float(np.abs(run(fed) - reference).max()) for run in ways)
        if not diff < MAX_LOGIT_DIFF:
            raise ExportError(f"{path}: exported logits differ from the original by {diff:.3g} "
                              f"(at most {MAX_LOGIT_DIFF:g} allowed); nothing was written")
    return {"source": t.source, "path": str(path), "format": fmt, "fold_bn": fold_bn, "folded": folded,
            "kept": kept, "input": input_contract(new, affine, t), "max_abs_logit_diff": diff,
            "checked_images": len(x), "throughput_original": throughput(lambda a: original(tf.constant(a)).numpy(), x),
            "throughput_exported": throughput(exported, fed)}


def export_metadata(t, affine) -> dict:
    """What an export says about itself, so that it can be used away from its run: the class names (by number
    for a model from elsewhere) and whether it takes raw pixels or normalized images."""
    names = list(t.config.dataset.class_names) if t.config is not None else None
    return {"written_by": "convbn", "dataset": t.config.data.dataset if t.config is not None else None,
            "class_names": names, "input": "pixels" if affine else "normalized"}


def input_contract(model, affine, t) -> str:
    """What the exported model takes, in words (printed by export, and the README's contract)."""
    shape = "(N, " + ", ".join(str(d) for d in model.input_shape[1:]) + ") float32"
    if affine:
        return f"raw pixels 0-255, {shape}; normalized inside the model ({t.config.data.normalize})"
    if t.config is None:
        return f"{shape}, as the original model takes them"
    return f"normalized images ({t.config.data.normalize}), {shape}: --no-preprocessing"
