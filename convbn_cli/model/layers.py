"""The Keras layer of each planned layer (config/plan.py): what every layer type of the config schema becomes.

The config only describes and plans layers (no Keras there); this module is where a `conv` entry becomes a Conv2D.
BN layers are made by bn.make_bn_layer, the builder chains both (builder.py).
"""

from __future__ import annotations

import keras

from .conv import Conv2D


def keras_layer(planned, data_format: str, dtype):
    """The Keras layer for `planned` (a config.plan.PlannedLayer), in `data_format`, computing in `dtype`."""
    spec, name = planned.spec, planned.name
    if spec.type == "conv":
        # Keras' own Conv2D, except for a channels_first bias (see model/conv.py)
        conv = Conv2D if data_format == "channels_first" and planned.use_bias else keras.layers.Conv2D
        return conv(spec.filters, tuple(spec.kernel), strides=tuple(spec.stride), padding=spec.padding,
                    dilation_rate=tuple(spec.dilation), use_bias=planned.use_bias, data_format=data_format,
                    name=name, dtype=dtype)
    if spec.type == "crop":
        (bh, bw) = spec.border
        return keras.layers.Cropping2D(((bh, bh), (bw, bw)), data_format=data_format, name=name, dtype=dtype)
    if spec.type == "pool":
        pool = keras.layers.MaxPooling2D if spec.kind == "max" else keras.layers.AveragePooling2D
        return pool(tuple(spec.size), strides=tuple(spec.stride or spec.size), padding=spec.padding,
                    data_format=data_format, name=name, dtype=dtype)
    if spec.type == "dropout":
        return keras.layers.Dropout(spec.rate, name=name, dtype=dtype)
    if spec.type == "flatten":
        # Flatten in channels-last order for either layout, so dense weights mean the same thing.
        return keras.layers.Flatten(data_format=data_format, name=name, dtype=dtype)
    if spec.type == "global_pool":
        pool = keras.layers.GlobalAveragePooling2D if spec.kind == "avg" else keras.layers.GlobalMaxPooling2D
        return pool(data_format=data_format, name=name, dtype=dtype)
    if spec.type == "dense":
        return keras.layers.Dense(spec.units, use_bias=planned.use_bias, name=name, dtype=dtype)
    raise ValueError(f"no Keras layer for layer type {spec.type!r}")  # a new schema type without its layer here
