"""convbn's Keras BN: `keras.layers.BatchNormalization` with three corrections the conv-BN mission needs.

It serves dense outputs, renorm, `impl: keras` and synchronized BN (the fused layer serves conv outputs
otherwise), with the same weights and names as Keras' layer; exports turn it back into Keras' own.

1. Moving statistics are averaged over replicas. Keras creates them with aggregation "none", so under
   tf.distribute without synchronized BN only replica 0's update survives; with aggregation "mean" every
   replica's update counts: the same rule as the fused layer (README, "Several devices and workers").
2. Synchronized BN computes the all-reduced variance in two passes (the global mean first, then the mean
   squared deviation from it). Keras computes E[x^2] - E[x]^2 in float32, which loses the variance when a
   channel's mean is large against its spread (-26% at mean 300, std 0.1).
3. `moving_variance="unbiased"` puts the Bessel-corrected batch variance (n / (n - 1) times the biased one,
   n = values per channel) into the moving average, as TF1's fused batch_norm did; normalization always uses
   the biased variance, as in every framework.

(2) overrides Keras' private `_moments` and reads `_reduction_axes`: see keras_private.py.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .batch_trace import add_batch_variables, record
from .variance import MOVING_VARIANCE, convert, values_per_channel


@keras.saving.register_keras_serializable(package="convbn")
class BatchNormalization(keras.layers.BatchNormalization):
    """A drop-in for keras.layers.BatchNormalization (same weights), plus `moving_variance`: "biased" (Keras 3,
    PyTorch's normalization) or "unbiased" (TF1's fused batch_norm, PyTorch's running_var). See the module
    docstring."""

    def __init__(self, *args, moving_variance="biased", **kwargs):
        super().__init__(*args, **kwargs)
        if moving_variance not in MOVING_VARIANCE:
            raise ValueError(f"moving_variance must be one of {MOVING_VARIANCE}, got {moving_variance!r}")
        if moving_variance == "unbiased" and self.renorm:
            raise ValueError("moving_variance='unbiased' is not available with renorm (Keras' own update rule)")
        self.moving_variance_rule = moving_variance

    def add_weight(self, *args, **kwargs):
        if kwargs.get("trainable") is False:
            kwargs["aggregation"] = "mean"  # (1) every replica's moving-statistics update is averaged in
        return super().add_weight(*args, **kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        add_batch_variables(self, input_shape[self.axis])  # what each step normalized with, for the BN trace

    def _moments(self, inputs, mask):
        # Keras calls this only in a training step, for the statistics it normalizes with (renorm: before its
        # correction): the BN trace keeps them (batch_trace.py)
        replica = tf.distribute.get_replica_context()
        if self.synchronized and mask is None and replica is not None:
            mean, variance = stable_sync_moments(inputs, self._reduction_axes, replica)  # (2)
        else:
            mean, variance = super()._moments(inputs, mask)
        record(self, mean, variance)
        return mean, variance

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or self.moving_variance_rule == "biased":
            return super().call(inputs, training=training, mask=mask)
        # (3) Keras' training branch without renorm, except for what goes into the moving variance
        x = tf.cast(inputs, tf.float32)  # statistics in float32 whatever the compute precision
        replica = tf.distribute.get_replica_context()
        if self.synchronized and mask is None and replica is not None:
            mean, variance, n = stable_sync_moments(x, self._reduction_axes, replica, with_count=True)
            record(self, mean, variance)
        else:
            mean, variance = self._moments(x, mask)
            n = values_per_channel(x, mean)
        unbiased = convert(variance, n, to="unbiased")
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + unbiased * (1.0 - self.momentum))
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else None
        beta = tf.cast(self.beta, tf.float32) if self.center else None
        out = keras.ops.batch_normalization(x, mean, variance, axis=self.axis, offset=beta, scale=gamma,
                                            epsilon=self.epsilon)
        return tf.cast(out, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "moving_variance": self.moving_variance_rule}


def stable_sync_moments(x, axes, replica, with_count=False):
    """Mean and biased variance over `axes` of every replica's `x` together, in two passes: all-reduce the sums
    for the global mean, then all-reduce the squared deviations from it (no E[x^2] - E[x]^2 cancellation).
    The all-reduces are issued in the same order on every replica, one tensor each (as Keras does)."""
    x = tf.cast(x, tf.float32)
    total = replica.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(x, axes, keepdims=True))
    count = replica.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(tf.ones_like(x), axes, keepdims=True))
    mean = tf.math.divide_no_nan(total, count)
    squares = replica.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(tf.square(x - mean), axes, keepdims=True))
    variance = tf.math.divide_no_nan(squares, count)
    out = (tf.squeeze(mean, axes), tf.squeeze(variance, axes))
    return (*out, tf.reshape(count, [-1])[0]) if with_count else out
