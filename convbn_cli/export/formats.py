"""`convbn export`: write a checkpoint as a .keras file, a TensorFlow SavedModel or a TFLite flatbuffer, each
loadable with the ordinary tools alone (no convbn import), checked against the original model."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from ..data import fetch
from ..data.pipeline import make_splits, normalizer
from ..errors import ConvbnError
from ..train.checkpoints import load
from .fold import standard_model

FORMATS = ("keras", "savedmodel", "tflite")
MAX_LOGIT_DIFF = 1e-4


class ExportError(ConvbnError):
    exit_code = 1  # not the user's input: the exported model does not reproduce the original


def default_path(run, fmt: str, fold_bn: bool) -> Path:
    stem = "model-folded" if fold_bn else "model"
    return run.path / "export" / {"keras": f"{stem}.keras", "savedmodel": f"{stem}_savedmodel",
                                  "tflite": f"{stem}.tflite"}[fmt]


@contextlib.contextmanager
def staged(path: Path):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    A failed write or a failed check then leaves no half-written or untrusted export, and an earlier export at
    `path` is replaced only by a checked one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp / path.name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        (tmp / path.name).rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write(model, fmt: str, path: Path) -> None:
    if fmt == "keras":
        model.save(path)
    elif fmt == "savedmodel":
        model.export(str(path), format="tf_saved_model", verbose=False)
    else:
        saved = path.parent / "savedmodel"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert())


def loader(fmt: str, path: Path):
    """A function images -> logits (NumPy) for the exported file, using only Keras/TensorFlow's own loaders."""
    if fmt == "keras":
        import keras

        model = keras.saving.load_model(path, safe_mode=True)
        fn = tf.function(lambda x: model(x, training=False))
        return lambda x: fn(tf.constant(x)).numpy()
    if fmt == "savedmodel":
        loaded = tf.saved_model.load(str(path))
        return lambda x: loaded.serve(tf.constant(x)).numpy()
    interpreter = tf.lite.Interpreter(model_path=str(path))

    def run(x):
        inp = interpreter.get_input_details()[0]
        if tuple(inp["shape"]) != x.shape:
            interpreter.resize_tensor_input(inp["index"], x.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    interpreter.allocate_tensors()
    return run


def throughput(fn, x, seconds=1.0) -> float:
    fn(x)  # warm-up (tracing)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def export(target, fmt="keras", *, fold_bn=False, output=None, which="best", data=None, check_images=256,
           log=lambda m: None) -> dict:
    if fmt not in FORMATS:
        raise ConvbnError(f"unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    cfg, model, prefix, run = load(target, which)
    new, folded, kept = standard_model(model, fold_bn)
    path = Path(output) if output else default_path(run, fmt, fold_bn)
    if data is None:
        data = fetch(cfg.data.dataset, log=log, progress=False)
    splits = make_splits(data, cfg)
    x = normalizer(cfg)(splits.x_test[:check_images]).numpy()
    original = tf.function(lambda t: model(t, training=False))
    reference = original(tf.constant(x)).numpy()
    with staged(path) as tmp:
        write(new, fmt, tmp)
        exported = loader(fmt, tmp)
        diff = float(np.abs(exported(x) - reference).max())
        if not diff < MAX_LOGIT_DIFF:
            raise ExportError(f"{path}: exported logits differ from the original by {diff:.3g} "
                              f"(at most {MAX_LOGIT_DIFF:g} allowed); nothing was written")
    return {"source": prefix, "path": str(path), "format": fmt, "fold_bn": fold_bn, "folded": folded,
            "kept": kept, "max_abs_logit_diff": diff, "checked_images": len(x),
            "throughput_original": throughput(lambda a: original(tf.constant(a)).numpy(), x),
            "throughput_exported": throughput(exported, x)}
