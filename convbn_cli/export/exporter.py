"""`convbn export`: write a checkpoint as a .keras file, a TensorFlow SavedModel, a TFLite flatbuffer or an ONNX
model (tf2onnx, the `onnx` extra), each loadable with the ordinary tools alone (no convbn import), checked against
the original model, and each carrying its class names and input contract (export_metadata).

This module chooses the weights, folds BN, and checks; formats/runtime.py writes and reads each format. The
inference speed of a folded export against the unfolded model is bench/export_throughput.py's (it is not measured
here: seconds on every export for a number nobody asked for)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from ..data.registry import pixel_affine
from ..errors import ConvbnError, TargetError
from ..files import remove_stale_temporaries, staged
from ..formats import runtime
from ..formats.catalog import FORMATS, file_name
from ..model.fold import standard_model
from ..runs.target import onnx_file, opened
from .output import check_output

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
        return src.with_name(file_name(f"{src.stem}-{'folded' if fold_bn else 'standard'}", fmt))
    return t.run.export / file_name("model-folded" if fold_bn else "model", fmt)


def ways_to_run(fmt: str, path: Path) -> list:
    """Every way a user runs the exported file, each a function images -> logits (NumPy): for a .keras model a
    compiled call, an eager call and predict (they take different code paths in Keras); its reader's one way
    otherwise."""
    opened = runtime.read(fmt, path)
    if opened.model is None:
        return [opened.predict]
    model = opened.model
    return [opened.predict, lambda x: model(x, training=False).numpy(), lambda x: model.predict(x, verbose=0)]


def export(target, fmt="keras", *, fold_bn=False, output=None, which="best", data=None, check_images=256,
           force=False, data_source=None, scale=1 / 255, preprocessing=True, layout=None, log=lambda m: None) -> dict:
    """Write TARGET with standard Keras/TensorFlow layers only, checked against the original model.

    Args:
        target: a run directory or checkpoint prefix (or a convbn .keras export).
        fmt: one of FORMATS (formats/catalog.py): "keras", "savedmodel", "tflite" or "onnx".
        fold_bn: fold each BN into the conv/dense layer before it.
        output: where to write (default: RUN_DIR/export/model[-folded].<ext>).
        which: a run directory's checkpoint ("best", "latest", "recalibrated", "ema" or a training step).
        check_images: how many test images the exported logits are compared on.
        force: replace a previous export at `output` (never anything else; see export/output.py).
        data_source, scale: the check images for a .keras model from outside convbn (see data/external.py);
            its export goes beside it by default (NAME-folded.keras, ...).
        preprocessing: the export takes raw 0-255 pixels, (N, H, W, C) float32, and normalizes them itself as the
            run's `data.normalize` did (per channel for the user's own dataset under standardize); False: it takes
            normalized images, as the network inside convbn does. A model from outside convbn keeps its own input
            contract either way.
        layout: an ONNX TARGET's input layout where its graph does not say (export/onnx_fold.py folds its BN).

    Returns:
        source, path, format, fold_bn, folded/kept BN names, input ("pixels 0-255" or "normalized"),
        max_abs_logit_diff and checked_images.
    """
    if fmt not in FORMATS:
        raise ConvbnError(f"unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    if onnx_file(target) is not None:
        from .onnx_fold import export_onnx

        return export_onnx(onnx_file(target), fmt, fold_bn=fold_bn, output=output, force=force, data=data_source,
                           scale=scale, layout=layout, check_images=check_images, log=log)
    path = check_output(Path(output), fmt, force) if output else None  # before any work: a bad --output costs nothing
    t = opened(target, which)
    path = path or check_output(default_path(t, fmt, fold_bn), fmt, force)
    if path.exists() and Path(t.source).exists() and path.resolve() == Path(t.source).resolve():
        raise ConvbnError(f"--output {path}: is the model being exported; write the export to another path "
                          "(--force replaces a previous export, never the source)")
    model = t.model
    pixels, x = _check_images(t, data, data_source, scale, check_images, log)
    affine = pixel_affine(t.config.dataset, t.config.data.normalize) if preprocessing and t.config else None
    new, folded, kept = standard_model(model, fold_bn, affine)
    fed = pixels if affine else x  # what the exported model takes
    original = tf.function(lambda a: model(a, training=False))
    reference = original(tf.constant(x)).numpy()
    remove_stale_temporaries(path.parent, path.name)  # staging that a killed export left behind
    about = export_metadata(t, affine)
    with staged(path, before_replace=lambda: check_output(path, fmt, force)) as tmp:
        runtime.write(new, fmt, tmp, about)
        try:
            diff = max(float(np.abs(run(fed) - reference).max()) for run in ways_to_run(fmt, tmp))
        except TargetError as e:  # convbn's own reader refuses what was written (an operation off its list, ...)
            cause = str(e).removeprefix(f"{tmp}: ").replace(str(tmp), str(path))
            raise ExportError(f"{path}: the {fmt} export does not open again in convbn's own reader ({cause}); "
                              "nothing was written") from None
        if not diff < MAX_LOGIT_DIFF:
            raise ExportError(f"{path}: exported logits differ from the original by {diff:.3g} "
                              f"(at most {MAX_LOGIT_DIFF:g} allowed); nothing was written")
    return {"source": t.source, "path": str(path), "format": fmt, "fold_bn": fold_bn, "folded": folded,
            "kept": kept, "input": input_contract(new, affine, t), "max_abs_logit_diff": diff,
            "checked_images": len(x)}


def export_metadata(t, affine) -> dict:
    """What an export says about itself, so that it can be used away from its run: the class names (by number
    for a model from elsewhere), whether it takes raw pixels or normalized images, and for a run's model its input
    contract: the image shape, normalized = pixels * pixel_scale + pixel_offset (one of each per channel for the
    user's own dataset under standardize; applied inside the model when input is "pixels"), whether its classes
    are digits drawn light on dark (predict's MNIST preparation) and the resize rule of the user's own dataset."""
    names = list(t.config.dataset.class_names) if t.config is not None else None
    about = {"written_by": "convbn", "dataset": t.config.dataset_name if t.config is not None else None,
             "class_names": names, "input": "pixels" if affine else "normalized"}
    if t.config is None:
        return about
    cfg = t.config
    scale, offset = pixel_affine(cfg.dataset, cfg.data.normalize)
    return {**about, "image_shape": list(cfg.model.input_shape), "normalize": cfg.data.normalize,
            "pixel_scale": _numbers(scale), "pixel_offset": _numbers(offset), "digits": bool(cfg.dataset.digits),
            "resize": cfg.data.resize if cfg.own is not None else None}


def _numbers(v):
    """A scale or offset as JSON: a number, or a list of one per channel."""
    return [float(x) for x in v] if isinstance(v, (tuple, list)) else float(v)


def input_contract(model, affine, t) -> str:
    """What the exported model takes, in words (printed by export, and the README's contract)."""
    shape = "(N, " + ", ".join(str(d) for d in model.input_shape[1:]) + ") float32"
    if t.config is None:
        return f"{shape}, as the original model takes them"
    scale, offset = pixel_affine(t.config.dataset, t.config.data.normalize)
    how = t.config.data.normalize + (", per channel" if isinstance(scale, tuple) else "")
    if affine:
        return f"raw pixels 0-255, {shape}; normalized inside the model ({how})"
    return (f"normalized images ({how}: pixels x {_short(scale)} + {_short(offset)}), {shape}: "
            "--no-preprocessing")


def _short(v) -> str:
    return "(" + ", ".join(f"{x:.6g}" for x in v) + ")" if isinstance(v, (tuple, list)) else f"{v:.6g}"
