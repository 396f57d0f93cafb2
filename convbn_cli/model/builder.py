"""Build the Keras model from a validated config: conv -> BN (per channel) -> activation, and so on.

The plan (config/plan.py) has already checked shapes and chosen names and BN implementations, layers.py makes
each planned layer's Keras layer and bn.py its BN; this module only chains them. The model always takes NHWC
images (what the data pipeline gives); with `data_format: channels_first` a Permute layer turns them to NCHW.
"""

from __future__ import annotations

import keras

from ..config import plan_layers
from ..config.schema import Config
from .bn import make_bn_layer
from .layers import keras_layer


def build_model(cfg: Config, plan=None, precision: str = "float32") -> keras.Model:
    """Build the network a config describes.

    Args:
        cfg: a validated config (`load_config`).
        plan: its layer plan (`plan_layers(cfg)`), when the caller already has it.
        precision: "float32", or "mixed_bfloat16" (training only; see train.precision): every layer but the
            last computes in bfloat16 with float32 variables; the logits stay float32 so that the loss is
            accurate. Evaluation, inspection and export rebuild the model in float32 from the same variables.

    Returns:
        A functional keras.Model whose layer names follow the plan (conv1, conv1_bn, conv1_relu, ...; conv1_pool
        between a conv and its BN when the conv block pools).
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
        dt = policy if i < len(plan) - 1 else None  # the last layer gives float32 logits
        x = keras_layer(layer, fmt, dt)(x)
        if getattr(layer.spec, "pool", 1) > 1:  # a conv block's pooling, before its BN (schema.ConvLayer.pool)
            x = keras.layers.MaxPooling2D(layer.spec.pool, data_format=fmt, name=f"{layer.name}_pool", dtype=dt)(x)
        if layer.bn is not None:
            axis = channel_axis if len(layer.out_shape) == 3 else -1
            x = make_bn_layer(layer.bn, layer.bn_impl, axis, layer.bn_name, dtype=dt)(x)
        if layer.activation:
            x = keras.layers.Activation(layer.activation, name=f"{layer.name}_{layer.activation}", dtype=dt)(x)
    return keras.Model(inputs, x, name="convbn")
