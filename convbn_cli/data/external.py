"""Data for a model from outside convbn (a `.keras` file trained anywhere), which has no config to say what it
was trained on: `--data` names a dataset or an .npz with x (N, H, W[, C]) and y, and `--scale` the factor its
pixels are multiplied by (1/255 by default: pixels in [0, 1])."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError
from ..readers import array_bytes, check_zip, open_regular, size_text
from .formats import npz_header
from .registry import DATASETS
from .sources import fetch

MAX_DATA_BYTES = 256 << 20  # an --data array larger than this (by its header) is refused before it is loaded


@dataclass
class EvalData:
    """The images a model is measured on and calibrated with, as it takes them: a run's evaluation split and
    training batches (runs/target.py, Target.eval_data), or --data's for a model from outside convbn."""

    images: np.ndarray  # scaled and shaped as the model takes them
    labels: np.ndarray
    calibration: object  # batches of (training) images for precise BN: a list, or a tf.data.Dataset of (x, y)
    batch_size: int  # the batch size BN's batch statistics are taken over (the training batch size)
    num_classes: int
    split: str = "--data"  # where the images come from
    pixels: Optional[np.ndarray] = None  # the same images as pixels 0-255, when the model's normalization is known
    # a run's training batches as training made them (augmented), where `calibration` holds them otherwise: what
    # the moving statistics averaged (findings.Context.training_calibration); None: `calibration` is that
    as_trained: object = None


def external_data(model, data, batches: int, scale: float, log=lambda m: None, batch_size: int = 128):
    """Up to `batches` batches of evaluation images and of calibration images for `model`."""
    if data is None:
        raise DataError("a model from outside convbn needs --data (mnist, fashion_mnist or an .npz with x and y)")
    if not (np.isfinite(scale) and scale > 0):
        raise DataError(f"--scale: must be a positive finite number, got {scale}")
    x_eval, y_eval, x_train = _arrays(data, log)
    shape = tuple(model.input_shape[1:])
    classes = int(model.output_shape[-1])

    def prepare(x):
        x = np.asarray(x, np.float32) * scale
        x = x.reshape((len(x), *shape)) if x.size == len(x) * int(np.prod(shape)) else x
        if not np.isfinite(x).all():
            raise DataError(f"--data {data}: images are not finite numbers after --scale {scale:g} (NaN or "
                            "infinity)")
        return x

    n = min(len(x_eval), batches * batch_size)
    x, y = prepare(x_eval[:n]), _labels(y_eval[:n], classes, data)
    if x.shape[1:] != shape:
        raise DataError(f"--data: images of shape {x.shape[1:]} do not fit the model's input {shape}")
    calib = [prepare(x_train[i:i + batch_size])
             for i in range(0, min(len(x_train), batches * batch_size) - batch_size + 1, batch_size)]
    return EvalData(x, y, calib or [x[:batch_size]], min(batch_size, len(x)), classes, f"--data {data}")


def _labels(y, classes: int, data) -> np.ndarray:
    """Class numbers: a 1-D array of integers in [0, classes), as the model's output counts them."""
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(f"--data {data}: y must be a 1-D array of integer class numbers, got shape {y.shape} of "
                        f"{y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"--data {data}: labels run from {y.min()} to {y.max()}, but the model gives {classes} "
                        f"classes (0..{classes - 1})")
    return y.astype(np.int32)


def _arrays(data, log):
    """(evaluation images, labels, training images) from a dataset name or an .npz with x and y."""
    if data in DATASETS:
        arrays = fetch(data, log=log, progress=False)
        return arrays["x_test"], arrays["y_test"], arrays["x_train"]
    path = Path(data)
    x, y = load_npz_arrays(path, ("x", "y"), MAX_DATA_BYTES, "an .npz for --data needs arrays x (N, H, W[, C]) and y "
                                                              "(N)")
    if x.ndim < 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{path}: x must be images (N, H, W[, C]) of numbers, got shape {x.shape} of {x.dtype}")
    if y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise DataError(f"{path}: x has {len(x)} images and y shape {y.shape}; expected one label per image")
    return x, y, x


def load_npz_arrays(path, keys, limit: int, missing: str, check=None):
    """The arrays `keys` of an .npz, bounded: the file must be a regular file, its archive directory small, and
    every array's header must declare at most `limit` bytes (and pass `check(key, shape, dtype)`, which raises)
    before anything is loaded; no pickles."""
    members = check_zip(path, {}, limit, max_members=64, what="an .npz of arrays", error=DataError)
    names = {m.filename for m in members}
    absent = [k for k in keys if f"{k}.npy" not in names]
    if absent:
        raise DataError(f"{path}: {missing} (it holds {', '.join(sorted(n[:-4] for n in names)) or 'nothing'})")
    out = []
    try:
        with open_regular(path, DataError) as raw, np.load(raw, allow_pickle=False) as f:
            for key in keys:
                shape, dtype = npz_header(f, key)
                if check is not None:
                    check(key, shape, dtype)
                if array_bytes(shape, dtype) > limit:
                    raise DataError(f"{path}: {key} declares shape {shape} ({dtype}), more than {size_text(limit)}; "
                                    "use a smaller sample")
                out.append(f[key])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
            RuntimeError) as e:
        # a damaged archive fails in zipfile, zlib or NumPy: each is one line (RuntimeError: a member flagged as
        # encrypted)
        raise DataError(f"{path}: not a readable .npz ({' '.join(str(e).split())[:200]})") from None
    return out
