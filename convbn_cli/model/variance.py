"""The two conventions for a batch variance over n values per channel, and the one conversion between them.

"biased" divides the summed squared deviations by n (what BN normalizes with in every framework, and what Keras 3
averages into the moving variance); "unbiased" (Bessel-corrected) divides by n - 1 (TF1's fused batch_norm,
PyTorch's running_var, and what TensorFlow's fused kernel reports). `model.bn.moving_variance` says which one the
moving average collects; every BN layer and precise BN convert here.
"""

from __future__ import annotations

import tensorflow as tf

MOVING_VARIANCE = ("biased", "unbiased")


def convert(variance, n, to: str):
    """`variance` over `n` values per channel, in the other convention, turned into `to` ("biased"/"unbiased")."""
    n = tf.cast(n, tf.float32)
    if to == "unbiased":
        return variance * n / tf.maximum(n - 1.0, 1.0)
    return variance * (n - 1.0) / tf.maximum(n, 1.0)


def values_per_channel(x, mean):
    """n: the values of `x` each channel's statistics are over (its size over the number of channels)."""
    return tf.cast(tf.size(x), tf.float32) / tf.cast(tf.size(mean), tf.float32)
