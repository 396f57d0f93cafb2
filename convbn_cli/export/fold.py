"""Rebuild a trained convbn model out of standard Keras layers, optionally folding BN into the conv/dense before it.

At inference a BN layer is a fixed per-channel affine map, y = s * x + (beta - mean * s) with
s = gamma / sqrt(moving_variance + epsilon). When x is the output of a conv (or dense) layer,
x = W * input + b, the map can be absorbed into that layer:

    W' = W * s            (each output channel's kernel slice scaled by its s)
    b' = beta + (b - mean) * s

and the BN layer disappears: one op fewer per block at inference, same outputs (up to rounding).
"""

from __future__ import annotations

import keras
import numpy as np

from ..model import FusedBatchNorm
from ..model.stats import bn_layer_parameters

FOLDABLE = (keras.layers.Conv2D, keras.layers.Dense)
BN_TYPES = (FusedBatchNorm, keras.layers.BatchNormalization)


def fold_into(spec: dict, bn) -> dict:
    """Fold `bn` into the conv/dense layer described by spec {"cls", "config", "weights"}; returns a new spec."""
    p = bn_layer_parameters(bn)
    s = p["scale"]  # gamma / sqrt(var + eps)
    kernel = spec["weights"][0].astype(np.float64)
    bias = spec["weights"][1].astype(np.float64) if spec["config"].get("use_bias") else np.zeros_like(s)
    # Keras keeps the output channels on the kernel's last axis for Conv2D (either data_format) and Dense.
    new_kernel = (kernel * s).astype(np.float32)
    new_bias = (p["beta"] + (bias - p["moving_mean"]) * s).astype(np.float32)
    return {"cls": spec["cls"], "config": {**spec["config"], "use_bias": True}, "weights": [new_kernel, new_bias]}


def standard_model(model: keras.Model, fold_bn: bool = False):
    """(new model, folded BN names, kept BN names): only Keras' own layers, weights copied.

    A FusedBatchNorm that is not folded becomes keras.layers.BatchNormalization with the same weights, so the
    result loads anywhere without convbn. Works on the chains convbn builds (each layer feeds the next).
    """
    specs, folded, kept = [], [], []
    for layer in model.layers[1:]:
        if isinstance(layer, BN_TYPES):
            prev = specs[-1] if specs else None
            if fold_bn and prev is not None and issubclass(prev["cls"], FOLDABLE):
                specs[-1] = fold_into(prev, layer)
                folded.append(layer.name)
                continue
            kept.append(layer.name)
            if isinstance(layer, FusedBatchNorm):
                config = {"name": layer.name, "axis": layer.axis, "momentum": layer.momentum,
                          "epsilon": layer.epsilon, "center": layer.center, "scale": layer.scale}
                weights = [w.numpy() for w in (layer.gamma, layer.beta) if w is not None]
                weights += [layer.moving_mean.numpy(), layer.moving_variance.numpy()]
                specs.append({"cls": keras.layers.BatchNormalization, "config": config, "weights": weights})
                continue
        specs.append({"cls": type(layer), "config": layer.get_config(), "weights": layer.get_weights()})
    inputs = keras.Input(shape=model.input_shape[1:], name="image")
    x = inputs
    for spec in specs:
        layer = spec["cls"].from_config(spec["config"])
        x = layer(x)
        layer.set_weights(spec["weights"])
    return keras.Model(inputs, x, name="convbn_export"), folded, kept
