"""Precise BN: recompute every BN layer's moving statistics with the weights frozen (after fvcore's PreciseBN).

Why: the moving averages are an exponential average over the *changing* weights of training. They lag
behind the final weights, worst with a high decay (TF1's default 0.999) and short training, and they
begin at mean 0 / variance 1, which takes ~1/(1 - decay) steps to forget. Averaging the batch statistics
of N batches under the final weights gives the statistics the final model actually sees.

Convention (the one training uses): each batch contributes its mean and its variance, biased (divided by
n = N*H*W) or unbiased (n - 1) as the layer's `moving_variance` says; the new moving mean is the plain average
of the batch means and the new moving variance the plain average of the batch variances.

Order: layer by layer. Layer k is recalibrated with layers 1..k-1 already recalibrated and in inference
mode, so each layer's statistics describe the inputs it will see at inference. (fvcore instead runs all
layers at once in training mode, so that later layers see earlier ones normalized by *batch* statistics;
that is not the same distribution as at inference, so the results differ slightly. The layer-by-layer
way costs one pass over the N batches per BN layer, which is cheap for these networks.)
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from .bn import bn_layers, moving_variance_rule, reduction_axes
from .graph import input_model
from .variance import convert, values_per_channel


class Recalibrated(dict):
    """{layer name: (old mean, old var, new mean, new var)}, and `batches`: how many batches were averaged (a
    dataset may hold fewer than were asked for)."""

    batches = 0


def recalibrate_model(model, batches, progress=False) -> Recalibrated:
    """Set each BN layer's moving mean/variance to the average of per-batch statistics over `batches`.

    Args:
        model: a Keras model (functional, Sequential, or convbn's own); its BN layers are changed in place.
        batches: a re-iterable of input batches (a list of tensors, or a tf.data.Dataset of (x, y)).
        progress: show a progress bar per layer.

    Returns:
        Recalibrated: {layer name: (old mean, old var, new mean, new var)} as NumPy arrays, and `.batches`.
    """
    changes = Recalibrated()
    for bn in bn_layers(model):
        upstream = input_model(model, bn)  # the model up to this BN's input: works on any functional graph

        unbiased = moving_variance_rule(bn) == "unbiased"

        @tf.function(reduce_retracing=True)
        def moments(x, upstream=upstream, bn=bn, unbiased=unbiased):
            h = upstream(x, training=False)  # earlier BN layers: already recalibrated, inference mode
            # statistics in float32 whatever the compute precision (tf.nn.moments would keep bfloat16)
            mean, var = tf.nn.moments(tf.cast(h, tf.float32), reduction_axes(bn, len(h.shape)))  # biased
            if unbiased:  # the layer's own convention (bn.moving_variance: unbiased, as TF1)
                var = convert(var, values_per_channel(h, mean), to="unbiased")
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
        changes.batches = len(means)
    return changes
