"""A Conv2D whose bias is right in channels_first.

Keras 3's TensorFlow backend adds a conv bias with `ops.add`, which switches to `tf.nn.bias_add(..., "NHWC")`
whenever the tensor's last dimension equals the bias length. In channels_first (NCHW) that last dimension is
the width, so a conv whose output width equals its filter count gets its bias added along the width: wrong
outputs and gradients, eagerly and under XLA (tf.function often hides it, when the width is not static).
This layer adds the bias with `tf.nn.bias_add` in the layer's own data format. Exports do not need it: they
are rebuilt in channels_last (model/fold.py), where Keras' own Conv2D is right.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="convbn")
class Conv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D (same weights and config) with a data-format-correct bias."""

    def call(self, inputs):
        if not self.use_bias or self.data_format != "channels_first":
            return super().call(inputs)
        outputs = tf.nn.bias_add(self.convolution_op(inputs, self.kernel), tf.cast(self.bias, self.compute_dtype),
                                 data_format="NCHW")
        return self.activation(outputs) if self.activation is not None else outputs
