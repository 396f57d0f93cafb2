"""Precise BN: recompute every BN layer's moving statistics with the weights frozen (after fvcore's PreciseBN).

Why: the moving averages are an exponential average over the *changing* weights of training. They lag
behind the final weights, worst with a high decay (TF1's default 0.999) and short training, and they
begin at mean 0 / variance 1, which takes ~1/(1 - decay) steps to forget. Averaging the batch statistics
of N batches under the final weights gives the statistics the final model actually sees.

Convention (the one training uses): each batch contributes its mean and its biased variance (divided by
n = N*H*W); the new moving mean is the plain average of the batch means and the new moving variance the
plain average of the batch variances.

Order: layer by layer. Layer k is recalibrated with layers 1..k-1 already recalibrated and in inference
mode, so each layer's statistics describe the inputs it will see at inference. (fvcore instead runs all
layers at once in training mode, so that later layers see earlier ones normalized by *batch* statistics;
that is not the same distribution as at inference, so the results differ slightly. The layer-by-layer
way costs one pass over the N batches per BN layer, which is cheap for these networks.)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from ..data.pipeline import train_dataset
from ..model import bn_layers


def _reduction_axes(layer, ndim):
    axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
    axis = axis % ndim
    return [i for i in range(ndim) if i != axis]


def recalibrate_model(model, batches, progress=False) -> dict:
    """Set each BN layer's moving mean/variance to the average of per-batch statistics over `batches`.

    `batches`: a re-iterable of input batches (e.g. a list of tensors, or a tf.data.Dataset of (x, y)).
    Returns {layer name: (old mean, old var, new mean, new var)} as NumPy arrays.
    """
    changes = {}
    layers = model.layers[1:]  # the models convbn builds are chains: layer i feeds layer i+1
    for bn in bn_layers(model):
        stop = layers.index(bn)

        @tf.function(reduce_retracing=True)
        def moments(x, stop=stop, bn=bn):
            for layer in layers[:stop]:
                x = layer(x, training=False)  # earlier BN layers: already recalibrated, inference mode
            axes = _reduction_axes(bn, len(x.shape))
            mean, var = tf.nn.moments(x, axes)  # biased variance, as in training
            return mean, var

        means, variances = [], []
        for item in tqdm(batches, desc=f"precise BN {bn.name}", leave=False, disable=None if progress else True):
            x = item[0] if isinstance(item, (tuple, list)) else item
            m, v = moments(x)
            means.append(m.numpy().astype(np.float64))
            variances.append(v.numpy().astype(np.float64))
        if not means:
            raise ValueError("no batches to recalibrate with")
        old = (bn.moving_mean.numpy(), bn.moving_variance.numpy())
        new_mean, new_var = np.mean(means, axis=0), np.mean(variances, axis=0)
        bn.moving_mean.assign(new_mean.astype(np.float32))
        bn.moving_variance.assign(new_var.astype(np.float32))
        changes[bn.name] = (*old, new_mean, new_var)
    return changes


def calibration_batches(splits, cfg, batches: int | None):
    """N training batches (None: one pass over the training split), in a fixed order of their own.

    The order is the one the training pipeline would give in epoch `train.epochs` (one past the last), so it
    is reproducible and its augmentation, if any, is the training one.
    """
    ds = train_dataset(splits, cfg, epoch=cfg.train.epochs)
    return ds if batches is None else ds.take(batches)


def save_recalibrated(model, run, source_prefix) -> str:
    """Save the model as `checkpoints/recalibrated/ckpt-<n>`, n the next free number: never over anything."""
    folder = run.checkpoints / "recalibrated"
    taken = [int(m.group(1)) for p in folder.glob("ckpt-*.index") if (m := re.match(r"ckpt-(\d+)\.index$", p.name))]
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), folder, max_to_keep=None,
                                         checkpoint_name="ckpt")
    path = manager.save(checkpoint_number=max(taken, default=0) + 1)
    (Path(path + ".source")).write_text(f"{source_prefix}\n")  # which checkpoint this was recalibrated from
    return path
