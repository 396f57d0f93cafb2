"""Per-channel batch normalization for conv outputs on TensorFlow's fused kernel (FusedBatchNormV3).

Keras 3's `BatchNormalization` computes moments and the normalization with separate ops; on CPU that
measured clearly slower for 4-D conv outputs than TensorFlow's single fused kernel, which is why this
layer exists. It is a drop-in for `keras.layers.BatchNormalization(axis=channel_axis)` on 4-D inputs:
same weights (gamma, beta, moving_mean, moving_variance, each of shape (channels,)), same forward
result, same gradients, and the same moving-statistics update:

    moving_mean     = decay * moving_mean     + (1 - decay) * batch_mean
    moving_variance = decay * moving_variance + (1 - decay) * batch_variance

where batch_variance is the *biased* variance over (batch, height, width), i.e. divided by n = N*H*W,
exactly as Keras 3 does. The fused kernel reports the Bessel-corrected variance (divided by n - 1), so
it is scaled back by (n - 1)/n before the update. With `moving_variance="unbiased"` (TF1's fused batch_norm,
PyTorch's running_var) the Bessel-corrected one goes into the moving average as it is; normalization always
uses the biased variance.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .batch_trace import add_batch_variables, record
from .variance import MOVING_VARIANCE, convert, values_per_channel


@keras.saving.register_keras_serializable(package="convbn")
class FusedBatchNorm(keras.layers.Layer):
    """Batch normalization of a 4-D tensor, per channel, on the fused kernel. Channel axis 3 or 1."""

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True, moving_variance="biased",
                 **kwargs):
        super().__init__(**kwargs)
        if moving_variance not in MOVING_VARIANCE:
            raise ValueError(f"moving_variance must be one of {MOVING_VARIANCE}, got {moving_variance!r}")
        self.moving_variance_rule = moving_variance
        if axis not in (-1, 3, 1):
            raise ValueError(f"FusedBatchNorm normalizes channels on axis -1/3 (NHWC) or 1 (NCHW), got {axis}")
        self.axis = 1 if axis == 1 else -1
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.supports_masking = False

    @property
    def data_format(self):
        return "NCHW" if self.axis == 1 else "NHWC"

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"FusedBatchNorm needs a 4-D input, got shape {input_shape}")
        channels = input_shape[self.axis]
        shape = (channels,)
        # Same names and initializers as keras.layers.BatchNormalization, so weights move between the two.
        # autocast=False: under a mixed-precision policy the fused kernel takes bfloat16/float16 inputs but wants
        # float32 scale, offset and statistics (Keras' own BN keeps its variables float32 the same way).
        # aggregation="mean": under tf.distribute without synchronized BN, each replica's moving-statistics update
        # is averaged into the mirrored variable.
        def weight(name, init, trainable=True):
            return self.add_weight(shape=shape, name=name, initializer=init, trainable=trainable, autocast=False,
                                   aggregation="mean")

        self.gamma = weight("gamma", "ones") if self.scale else None
        self.beta = weight("beta", "zeros") if self.center else None
        self.moving_mean = weight("moving_mean", "zeros", trainable=False)
        self.moving_variance = weight("moving_variance", "ones", trainable=False)
        self.channels = channels
        add_batch_variables(self, channels)  # what the step normalized with, for the BN trace (batch_trace.py)

    def call(self, inputs, training=None):
        x = tf.convert_to_tensor(inputs)
        # The fused kernel wants float32 scale/offset; with float16 inputs it computes in float32 inside.
        gamma = self.gamma if self.scale else tf.ones((self.channels,), tf.float32)
        beta = self.beta if self.center else tf.zeros((self.channels,), tf.float32)
        if training and self.trainable:  # a frozen BN layer runs in inference mode, as in Keras
            y, mean, var = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=self.epsilon, data_format=self.data_format, is_training=True)
            biased = convert(var, values_per_channel(x, mean), to="biased")  # the kernel's is Bessel-corrected
            record(self, mean, biased)  # what the step normalized with, for the BN trace
            if self.moving_variance_rule == "biased":  # the module docstring
                var = biased
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + var * (1.0 - self.momentum))
            return y
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, mean=self.moving_mean, variance=self.moving_variance, epsilon=self.epsilon,
            data_format=self.data_format, is_training=False)
        return y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "momentum": self.momentum, "epsilon": self.epsilon,
                "center": self.center, "scale": self.scale, "moving_variance": self.moving_variance_rule}
