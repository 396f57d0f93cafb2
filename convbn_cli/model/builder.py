"""Build the Keras model from a validated config: conv -> BN (per channel) -> activation, and so on.

The plan (config/plan.py) has already checked shapes and chosen names and BN implementations; this
module only turns it into Keras layers. The model always takes NHWC images (what the data pipeline
gives); with `data_format: channels_first` a Permute layer turns them to NCHW first.
"""

from __future__ import annotations

import keras

from ..config import plan_layers
from ..config.schema import Config
from .fused_bn import FusedBatchNorm


def bn_layer(bn, impl: str, axis: int, name: str, dtype=None):
    """The BN layer for one conv/dense output; `bn` holds the TF1-style settings (decay = Keras momentum)."""
    if impl == "fused":
        return FusedBatchNorm(axis=axis, momentum=bn.decay, epsilon=bn.epsilon, center=bn.center,
                              scale=bn.scale, name=name, dtype=dtype)
    extra = {"synchronized": True} if impl == "sync" else {}  # all-reduced statistics under tf.distribute
    if bn.renorm:
        extra = dict(renorm=True, renorm_momentum=bn.renorm_momentum,
                     renorm_clipping=bn.renorm_clipping.model_dump() if bn.renorm_clipping else None, **extra)
    return keras.layers.BatchNormalization(axis=axis, momentum=bn.decay, epsilon=bn.epsilon, center=bn.center,
                                           scale=bn.scale, name=name, dtype=dtype, **extra)


def build_model(cfg: Config, plan=None, precision: str = "float32") -> keras.Model:
    """A functional keras.Model whose layer names follow the plan (conv1, conv1_bn, conv1_relu, ...).

    precision "mixed_bfloat16" (training only; see train.precision) computes every layer but the last in
    bfloat16 with float32 variables; the logits stay float32 so that the loss is computed accurately.
    Evaluation, inspection and export rebuild the model in float32 from the same (float32) variables.
    """
    plan = plan if plan is not None else plan_layers(cfg)
    policy = None if precision == "float32" else precision
    fmt = cfg.model.data_format
    channel_axis = 1 if fmt == "channels_first" else -1
    inputs = keras.Input(shape=tuple(cfg.model.input_shape), name="image")
    x = inputs
    if fmt == "channels_first":
        x = keras.layers.Permute((3, 1, 2), name="to_channels_first")(x)
    for i, layer in enumerate(plan):
        s, name = layer.spec, layer.name
        dt = policy if i < len(plan) - 1 else None  # the last layer gives float32 logits
        if s.type == "conv":
            x = keras.layers.Conv2D(s.filters, tuple(s.kernel), strides=tuple(s.stride), padding=s.padding,
                                    dilation_rate=tuple(s.dilation), use_bias=layer.use_bias, data_format=fmt,
                                    name=name, dtype=dt)(x)
        elif s.type == "dense":
            x = keras.layers.Dense(s.units, use_bias=layer.use_bias, name=name, dtype=dt)(x)
        elif s.type == "pool":
            pool = keras.layers.MaxPooling2D if s.kind == "max" else keras.layers.AveragePooling2D
            x = pool(tuple(s.size), strides=tuple(s.stride or s.size), padding=s.padding, data_format=fmt,
                     name=name, dtype=dt)(x)
        elif s.type == "dropout":
            x = keras.layers.Dropout(s.rate, name=name, dtype=dt)(x)
        elif s.type == "flatten":
            # Flatten in channels-last order for either layout, so dense weights mean the same thing.
            x = keras.layers.Flatten(data_format=fmt, name=name, dtype=dt)(x)
        elif s.type == "global_pool":
            pool = keras.layers.GlobalAveragePooling2D if s.kind == "avg" else keras.layers.GlobalMaxPooling2D
            x = pool(data_format=fmt, name=name, dtype=dt)(x)
        if layer.bn is not None:
            axis = channel_axis if s.type == "conv" else -1
            x = bn_layer(layer.bn, layer.bn_impl, axis, layer.bn_name, dtype=dt)(x)
        act = getattr(s, "activation", None)
        if act not in (None, "linear"):
            x = keras.layers.Activation(act, name=f"{name}_{act}", dtype=dt)(x)
    return keras.Model(inputs, x, name="convbn")


def bn_layers(model: keras.Model) -> list:
    """The model's BN layers (fused or Keras), in order."""
    return [layer for layer in model.layers
            if isinstance(layer, (FusedBatchNorm, keras.layers.BatchNormalization))]
