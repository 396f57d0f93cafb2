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

from .bn import channel_axis, is_bn
from .fused_bn import FusedBatchNorm
from .graph import consumers, producer
from .keras_private import made_by
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
    (folding into a layer that also feeds something else would change that other input), normalizes that layer's
    output channels (not e.g. the width, as BatchNormalization() with its default axis -1 does after a
    channels_first conv: no per-channel scale of the kernel computes that), and that the export can give a bias
    (see _bias_added_wrongly)."""
    model = as_functional(model)
    flips = _channels_last_plan(model)[1]
    pairs = {}
    for layer in model.layers:
        if is_bn(layer):
            prev = producer(layer)
            if isinstance(prev, FOLDABLE) and consumers(model, prev) == [layer] and _on_output_channels(layer, prev) \
                    and not (flips.get(id(prev)) != FLIP and _bias_added_wrongly(prev)):
                pairs[layer] = prev
    return pairs


def _on_output_channels(bn, layer) -> bool:
    """Whether `bn` normalizes the axis that holds `layer`'s output channels (axis 1 of a channels_first conv)."""
    ndim = len(layer.output.shape)
    if not isinstance(bn.axis, int) and len(bn.axis) != 1:
        return False
    channels_first = getattr(layer, "data_format", None) == "channels_first" and ndim > 2
    return channel_axis(bn, ndim) == (1 if channels_first else ndim - 1)


def _bias_added_wrongly(layer) -> bool:
    """Whether Keras' own Conv2D would add a bias to `layer`'s output along its width: a channels_first conv whose
    static output width equals its filter count (Keras' TensorFlow backend then takes the add for an NHWC
    bias_add; model/conv.py). Folding gives the conv a bias, so such a conv keeps its BN unless the export
    rebuilds it in channels_last."""
    return isinstance(layer, keras.layers.Conv2D) and layer.data_format == "channels_first" \
        and layer.output.shape[-1] == layer.filters


def as_functional(model: keras.Model) -> keras.Model:
    """`model` as a functional model: a Sequential one as a functional model over the same layers (and so the
    same weights), which Keras' clone_model can rebuild with a call_function (it refuses Sequential models)."""
    if not isinstance(model, keras.Sequential):
        return model
    return keras.Model(model.inputs, model.outputs, name=model.name)  # Keras 3: .input raises for a Sequential


NORMALIZE_LAYER = "normalize_pixels"  # the layer that normalizes them


def standard_model(model: keras.Model, fold_bn: bool = False, pixel_affine=None):
    """(new model, folded BN names, kept BN names): only Keras' own layers, weights copied.

    With `pixel_affine` = (scale, offset) the new model takes raw 0-255 pixels (input "pixels") and normalizes
    them itself with keras.layers.Rescaling(scale, offset) (layer "normalize_pixels") before the network.

    A FusedBatchNorm that is not folded becomes keras.layers.BatchNormalization with the same weights, and
    convbn's Keras subclasses become Keras' own classes, so the result loads anywhere without convbn. A
    channels_first model (NHWC images permuted to NCHW first, as convbn builds them) is rebuilt in channels_last,
    which computes the same function with the same weights (Keras keeps conv kernels as HWIO in both layouts) and
    avoids Keras' channels_first conv-bias bug (model/conv.py); a layer that cannot change layout (a Flatten in
    channels_last order of an NCHW tensor, say) gets its input permuted back to NCHW (_channels_last_plan).
    Works on any functional graph (the model is cloned layer by layer) and on Sequential models.
    """
    model = as_functional(model)
    rebuild = _Rebuild(model, fold_bn)
    pixels, normalized = keras.Input(shape=model.input_shape[1:], name="image") if rebuild.strip else None, {}
    call = rebuild.call
    if pixel_affine is not None:
        pixels = keras.Input(shape=model.input_shape[1:], name=PIXELS_INPUT)
        normalize = keras.layers.Rescaling(*pixel_affine, name=NORMALIZE_LAYER)

        def call(layer, *args, _call=call, **kwargs):  # every consumer of the input gets the normalized pixels
            if args and args[0] is pixels:
                if not normalized:
                    normalized["x"] = normalize(pixels)
                args = (normalized["x"], *args[1:])
            return _call(layer, *args, **kwargs)

    new = keras.models.clone_model(model, input_tensors=pixels, clone_function=rebuild.clone, call_function=call)
    return keras.Model(new.inputs[0], new.outputs[0], name="convbn_export"), rebuild.folded, rebuild.kept


class _Rebuild:
    """The clone and call functions of standard_model's keras.models.clone_model, and what they found."""

    def __init__(self, model, fold_bn):
        self.pairs = foldable_pairs(model) if fold_bn else {}
        self.folded_into = {id(conv): bn for bn, conv in self.pairs.items()}
        self.to_last, self.plan = _channels_last_plan(model)
        self.strip = takes_pixels(model)  # an export of an export: its normalization goes, and comes back if asked
        self.weights, self.flipped, self.folded, self.kept = {}, set(), [], []

    def clone(self, layer):
        if layer is self.to_last or (self.strip and layer.name == NORMALIZE_LAYER):
            return _PassThrough(layer.name, to_last=layer is self.to_last)
        if is_bn(layer):
            if layer in self.pairs:
                self.folded.append(layer.name)
                return _PassThrough(layer.name)
            self.kept.append(layer.name)
        flip = self.plan.get(id(layer))
        cls, config = standard_config(layer, to_channels_last=flip == FLIP)
        w = layer.get_weights()
        bn = self.folded_into.get(id(layer))
        if bn is not None:
            kernel, bias = fold_weights(w[0], w[1] if config.get("use_bias") else None, bn_layer_parameters(bn))
            config, w = {**config, "use_bias": True}, [kernel, bias]
        new = cls.from_config(config)
        self.weights[id(new)] = (w, flip)
        return new

    def call(self, layer, *args, **kwargs):
        if isinstance(layer, _PassThrough):
            if layer.to_last:  # the images are NHWC already: the NCHW tensor the Permute made, in channels_last
                self.flipped.add(id(args[0]))
            return args[0]  # a folded BN keeps its input's layout
        w, flip = self.weights[id(layer)]
        if flip == UNFLIP:  # its flipped inputs back to NCHW, as the original layer takes them
            x = args[0]
            x = [self._unflip(t) for t in x] if isinstance(x, (list, tuple)) else self._unflip(x)
            args = (x, *args[1:])
        out = layer(*args, **kwargs)
        layer.set_weights(w)
        if flip == FLIP and len(out.shape) == 4:
            self.flipped.add(id(out))
        return out

    def _unflip(self, tensor):
        return keras.layers.Permute((3, 1, 2))(tensor) if id(tensor) in self.flipped else tensor


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


FLIP, UNFLIP = "flip", "unflip"  # _channels_last_plan's two answers for a layer after the Permute
# Layers that compute the same on an NHWC tensor as on the NCHW one (value by value, or tensor by tensor)
ELEMENTWISE = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
               keras.layers.Dropout, keras.layers.GaussianNoise, keras.layers.GaussianDropout, keras.layers.Add,
               keras.layers.Subtract, keras.layers.Multiply, keras.layers.Average, keras.layers.Maximum,
               keras.layers.Minimum, keras.layers.Identity)


def _channels_last_plan(model):
    """(the Permute((3, 1, 2)) that starts a channels_first model, or None; {id(layer): FLIP or UNFLIP}).

    Without that Permute the NHWC images go on, so each tensor after it is "flipped" (NHWC where the original
    has NCHW). A layer whose inputs are all flipped and that computes the same in channels_last (FLIP: a
    channels_first data_format, BN over axis 1, an elementwise layer) is rebuilt so, its 4-D output flipped too;
    any other layer that takes a flipped tensor (Flatten() in channels_last order, a Dense on NCHW,
    BatchNormalization() over the width) gets it permuted back to NCHW (UNFLIP) and computes what it did.
    convbn's own models are all FLIP; a model from elsewhere need not be. No plan where the input also feeds
    other layers, a layer is called more than once, or an output would stay flipped.
    """
    permute = _permutes_to_channels_first(model)
    try:
        alone = permute is not None and consumers(model, made_by(permute.input)) == [permute]
    except (AttributeError, ValueError):  # a shared Permute
        alone = False
    if not alone:
        return None, {}
    flipped, plan = {id(permute)}, {}
    for layer in model.layers:
        try:
            ins = layer.input
        except (AttributeError, ValueError):  # called more than once: no one layout for its input
            return None, {}
        hits = [id(made_by(t)) in flipped for t in (ins if isinstance(ins, (list, tuple)) else [ins])]
        if layer is permute or isinstance(layer, keras.layers.InputLayer) or not any(hits):
            continue
        plan[id(layer)] = FLIP if all(hits) and _flippable(layer) else UNFLIP
        if plan[id(layer)] == FLIP and len(layer.output.shape) == 4:
            flipped.add(id(layer))
    if any(id(made_by(t)) in flipped for t in model.outputs):
        return None, {}
    return permute, plan


def _flippable(layer) -> bool:
    """Whether `layer`, given NHWC instead of NCHW, computes the same (transposed) once rebuilt in channels_last."""
    if getattr(layer, "data_format", None) == "channels_first":
        return True
    if is_bn(layer):
        return (isinstance(layer.axis, int) or len(layer.axis) == 1) and channel_axis(layer, 4) == 1
    return type(layer) in ELEMENTWISE and getattr(layer, "noise_shape", None) is None


class _PassThrough:
    """Stands in while cloning for a folded BN layer, the normalization of an export of an export, or the
    Permute of a model rebuilt in channels_last (`to_last`): its input goes straight on."""

    def __init__(self, name, to_last=False):
        self.name, self.to_last = name, to_last
