"""Data for a model from outside convbn (a `.keras` file trained anywhere), which has no config to say what it
was trained on: `--data` names a dataset or an .npz with x (N, H, W[, C]) and y, and `--scale` the factor its
pixels are multiplied by (1/255 by default: pixels in [0, 1])."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError
from .formats import npz_header

MAX_DATA_BYTES = 2 << 30  # an --data array larger than this (by its header) is refused before it is loaded


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


def external_data(model, data, batches: int, scale: float, log=lambda m: None, batch_size: int = 128):
    """Up to `batches` batches of evaluation images and of calibration images for `model`."""
    if data is None:
        raise DataError("a model from outside convbn needs --data (mnist, fashion_mnist or an .npz with x and y)")
    x_eval, y_eval, x_train = _arrays(data, log)
    shape = tuple(model.input_shape[1:])

    def prepare(x):
        x = np.asarray(x, np.float32) * scale
        return x.reshape((len(x), *shape)) if x.size == len(x) * int(np.prod(shape)) else x

    n = min(len(x_eval), batches * batch_size)
    x, y = prepare(x_eval[:n]), np.asarray(y_eval[:n]).astype(np.int32)
    if x.shape[1:] != shape:
        raise DataError(f"--data: images of shape {x.shape[1:]} do not fit the model's input {shape}")
    calib = [prepare(x_train[i:i + batch_size])
             for i in range(0, min(len(x_train), batches * batch_size) - batch_size + 1, batch_size)]
    return EvalData(x, y, calib or [x[:batch_size]], min(batch_size, len(x)), int(model.output_shape[-1]),
                    f"--data {data}")


def _arrays(data, log):
    """(evaluation images, labels, training images) from a dataset name or an .npz with x and y."""
    from .registry import DATASETS
    from .sources import fetch

    if data in DATASETS:
        arrays = fetch(data, log=log, progress=False)
        return arrays["x_test"], arrays["y_test"], arrays["x_train"]
    path = Path(data)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files or "y" not in f.files:
                raise DataError(f"{path}: an .npz for --data needs arrays x (N, H, W[, C]) and y (N)")
            for key in ("x", "y"):
                shape, dtype = npz_header(f, key)
                if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > MAX_DATA_BYTES:
                    raise DataError(f"{path}: {key} declares shape {shape} ({dtype}), more than "
                                    f"{MAX_DATA_BYTES >> 30} GiB; use a smaller sample")
            x, y = f["x"], f["y"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not a readable .npz ({' '.join(str(e).split())[:200]})") from None
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"{path}: x has {len(x)} images and y {len(y)} labels")
    return x, y, x
