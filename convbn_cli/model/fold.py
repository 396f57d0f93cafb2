"""Rebuild a trained model out of standard Keras layers, optionally folding BN into the conv/dense before it.

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

from .bn import is_bn
from .fused_bn import FusedBatchNorm
from .graph import consumers, producer
from .stats import bn_layer_parameters

PIXELS_INPUT = "pixels"  # the input name of a model that takes raw pixels and normalizes them itself

FOLDABLE = (keras.layers.Conv2D, keras.layers.Dense)


def fold_weights(kernel, bias, p: dict):
    """(kernel', bias') of a conv/dense layer with the BN whose parameters are `p` (model.stats) folded in.

    Keras keeps the output channels on the kernel's last axis for Conv2D (either data_format) and Dense, so the
    per-channel scale broadcasts over it. `bias` is None for a layer without one.
    """
    s = p["scale"]  # gamma / sqrt(var + eps)
    kernel = np.asarray(kernel, np.float64)
    bias = np.zeros_like(s) if bias is None else np.asarray(bias, np.float64)
    return (kernel * s).astype(np.float32), (p["beta"] + (bias - p["moving_mean"]) * s).astype(np.float32)


def foldable_pairs(model) -> dict:
    """{BN layer: conv/dense layer} for every BN that directly follows a conv/dense whose only consumer it is
    (folding into a layer that also feeds something else would change that other input)."""
    pairs = {}
    for layer in model.layers:
        if is_bn(layer):
            prev = producer(layer)
            if isinstance(prev, FOLDABLE) and consumers(model, prev) == [layer]:
                pairs[layer] = prev
    return pairs


NORMALIZE_LAYER = "normalize_pixels"  # the layer that normalizes them


def standard_model(model: keras.Model, fold_bn: bool = False, pixel_affine=None):
    """(new model, folded BN names, kept BN names): only Keras' own layers, weights copied.

    With `pixel_affine` = (scale, offset) the new model takes raw 0-255 pixels (input "pixels") and normalizes
    them itself with keras.layers.Rescaling(scale, offset) (layer "normalize_pixels") before the network.

    A FusedBatchNorm that is not folded becomes keras.layers.BatchNormalization with the same weights, and
    convbn's Keras subclasses become Keras' own classes, so the result loads anywhere without convbn. A convbn
    channels_first model (NHWC images permuted to NCHW first) is rebuilt in channels_last, which computes the
    same function with the same weights (Keras keeps conv kernels as HWIO in both layouts, and Flatten in
    channels-last order) and avoids Keras' channels_first conv-bias bug (model/conv.py).
    Works on any functional graph (the model is cloned layer by layer).
    """
    pairs = foldable_pairs(model) if fold_bn else {}
    folded_into = {id(conv): bn for bn, conv in pairs.items()}
    to_last = _permutes_to_channels_first(model)
    weights, folded, kept = {}, [], []

    strip = takes_pixels(model)  # an export of an export: its own normalization goes, and comes back if asked

    def clone(layer):
        if layer is to_last or (strip and layer.name == NORMALIZE_LAYER):
            return _PassThrough(layer.name)
        if is_bn(layer):
            if layer in pairs:
                folded.append(layer.name)
                return _PassThrough(layer.name)
            kept.append(layer.name)
        cls, config = standard_config(layer, to_channels_last=to_last is not None)
        w = layer.get_weights()
        bn = folded_into.get(id(layer))
        if bn is not None:
            kernel, bias = fold_weights(w[0], w[1] if config.get("use_bias") else None, bn_layer_parameters(bn))
            config, w = {**config, "use_bias": True}, [kernel, bias]
        new = cls.from_config(config)
        weights[id(new)] = w
        return new

    def call(layer, *args, **kwargs):
        if isinstance(layer, _PassThrough):
            return args[0]
        out = layer(*args, **kwargs)
        layer.set_weights(weights[id(layer)])
        return out

    pixels, normalized = keras.Input(shape=model.input_shape[1:], name="image") if strip else None, {}
    if pixel_affine is not None:
        pixels = keras.Input(shape=model.input_shape[1:], name=PIXELS_INPUT)
        normalize = keras.layers.Rescaling(*pixel_affine, name=NORMALIZE_LAYER)

        def call(layer, *args, _call=call, **kwargs):  # every consumer of the input gets the normalized pixels
            if args and args[0] is pixels:
                if not normalized:
                    normalized["x"] = normalize(pixels)
                args = (normalized["x"], *args[1:])
            return _call(layer, *args, **kwargs)

    new = keras.models.clone_model(model, input_tensors=pixels, clone_function=clone, call_function=call)
    return keras.Model(new.inputs[0], new.outputs[0], name="convbn_export"), folded, kept


def takes_pixels(model: keras.Model) -> bool:
    """Whether `model` is an export that normalizes raw pixels itself."""
    return model.inputs[0].name == PIXELS_INPUT and NORMALIZE_LAYER in [layer.name for layer in model.layers]


def without_preprocessing(model: keras.Model) -> keras.Model:
    """An export that takes raw pixels rebuilt as the network alone (normalized images in, same weights); any
    other model as it is. (A sub-model from the normalized tensor on would not do: Keras clones the graph for
    it, so its layers' `.output` would still belong to the original graph.)"""
    return standard_model(model)[0] if takes_pixels(model) else model


def standard_config(layer, to_channels_last=False):
    """(Keras class, config) that rebuilds `layer` from Keras' own layers, optionally in channels_last."""
    config = layer.get_config()
    cls = next(c for c in type(layer).__mro__ if c.__module__.startswith("keras"))  # convbn's subclasses -> Keras'
    if isinstance(layer, FusedBatchNorm):
        cls, config = keras.layers.BatchNormalization, {k: config[k] for k in ("name", "axis", "momentum", "epsilon",
                                                                                "center", "scale")}
    config.pop("moving_variance", None)  # convbn's own option: it shapes training only
    if to_channels_last:
        if config.get("data_format") == "channels_first":
            config["data_format"] = "channels_last"
        if is_bn(layer) and len(layer.input.shape) == 4:
            config["axis"] = -1
    return cls, config


def _permutes_to_channels_first(model):
    """convbn's channels_first models start with Permute((3, 1, 2)) right after the input: that layer, or None."""
    first = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)][:1]
    if first and isinstance(first[0], keras.layers.Permute) and tuple(first[0].dims) == (3, 1, 2):
        return first[0]
    return None


class _PassThrough:
    """Stands in for a folded BN layer while cloning: its input goes straight on."""

    def __init__(self, name):
        self.name = name
