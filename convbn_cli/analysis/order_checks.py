"""`convbn diagnose`'s layer_order note: where each BN sits against the activation and dropout around it.

A neutral report (severity info): the evidence on BN before or after the activation is mixed (the BN paper puts it
before; many later models and benchmarks find after as good or better), so the order alone is no fault. Dropout that
feeds a BN is measured: in training dropout scales what it keeps by 1/(1 - rate), so the variance BN averages then
is larger than the one it normalizes at inference (the "variance shift" of Li et al., 2019).

The data-dependent core (`variance_shift`) takes per-channel NumPy arrays, so that other model formats (ONNX) use it
too; the rest is the Keras adapter.
"""

from __future__ import annotations

import keras
import numpy as np

from ..model.graph import consumers, input_model, producer, run_graph
from . import advice
from .findings import Finding, evaluate_bn, helps, per_channel, precise_bn_accuracy, usable_channels

ACTIVATIONS = (keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.PReLU, keras.layers.Softmax)
PASS_THROUGH = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.Flatten, keras.layers.Reshape)
LINEAR = (keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D)


def variance_shift(variance_training, variance_inference, moving_variance=None) -> dict:
    """How much larger a BN's input varies in training (dropout active) than at inference (dropout off).

    Contract (format-free, one BN layer): per-channel arrays (C,) of the variance of the layer's input measured on
    the same images with dropout active and with it off, and optionally the layer's moving variance (what it
    normalizes with at inference). Constant channels are left out (findings.usable_channels).

    Returns: {"median_ratio", "max_ratio" (training / inference variance), "moving_to_inference_median" (moving
    variance / inference variance, when given), "channels"}; ratios None when no channel is usable.
    """
    vt, vi = np.asarray(variance_training, np.float64), np.asarray(variance_inference, np.float64)
    keep = usable_channels(vi)
    if not keep.any():
        return {"median_ratio": None, "max_ratio": None, "moving_to_inference_median": None, "channels": 0}
    ratio = vt[keep] / vi[keep]
    moving = (None if moving_variance is None
              else float(np.median(np.asarray(moving_variance, np.float64)[keep] / vi[keep])))
    return {"median_ratio": float(np.median(ratio)), "max_ratio": float(ratio.max()),
            "moving_to_inference_median": moving, "channels": int(keep.sum())}


def after_activation_note(layers: list) -> str:
    """layer_order's neutral words for BN after an activation (Keras and ONNX models alike)."""
    return (f"BN layer(s) {', '.join(layers)} come after an activation (the BN paper puts BN before it; the "
            "evidence on which is better is mixed, so this is no fault)")


def _is_activation(layer, own=True) -> bool:
    """An activation layer; with `own`, also a conv/dense that applies its own activation (Conv2D(activation=...))."""
    if isinstance(layer, ACTIVATIONS):
        return True
    if isinstance(layer, keras.layers.Activation):
        return getattr(layer.activation, "__name__", "linear") != "linear"
    return own and isinstance(layer, LINEAR) and getattr(getattr(layer, "activation", None), "__name__",
                                                         "linear") != "linear"


def _dropout_before(bn):
    """The Dropout layer that feeds `bn` directly, or through pooling/reshaping and at most one conv/dense."""
    layer, linear = producer(bn), 0
    while layer is not None and not isinstance(layer, keras.layers.Dropout):
        if isinstance(layer, LINEAR) and not _is_activation(layer):
            linear += 1
        elif not isinstance(layer, PASS_THROUGH):
            return None
        if linear > 1:
            return None
        layer = producer(layer)
    return layer


def _measured_shift(ctx, bn) -> dict | None:
    """variance_shift of `bn`'s input with the dropout layers active and off (every other layer in inference mode);
    None for a BN inside a nested model, whose input no sub-model reaches."""
    upstream = input_model(ctx.model, bn)
    if not isinstance(upstream, keras.Model):
        return None
    train, infer = [], []
    for x, _ in ctx.batches():
        train.append(per_channel(run_graph(upstream, x, lambda layer: isinstance(layer, keras.layers.Dropout)), bn))
        infer.append(per_channel(upstream(x, training=False), bn))
    return variance_shift(np.concatenate(train).var(0), np.concatenate(infer).var(0), bn.moving_variance.numpy())


def orders(ctx) -> dict:
    """{BN layer: {"after_activation": name or None, "before_activation": name or None, "dropout_before": name or
    None}} from the graph."""
    out = {}
    for bn in ctx.bns:
        prev, after = producer(bn), consumers(ctx.model, bn)
        while isinstance(prev, PASS_THROUGH + (keras.layers.Dropout,)):
            prev = producer(prev)
        dropout = _dropout_before(bn)
        out[bn.name] = {"after_activation": prev.name if prev is not None and _is_activation(prev) else None,
                        "before_activation": after[0].name if len(after) == 1 and _is_activation(after[0], False)
                        else None,
                        "dropout_before": dropout.name if dropout is not None else None}
    return out


def check_layer_order(ctx) -> list:
    """layer_order (info): BN layers placed after an activation, and dropout that feeds a BN with its measured
    variance shift. BN before the activation (conv -> BN -> ReLU, the usual block) passes without a note."""
    found = {name: o for name, o in orders(ctx).items() if o["after_activation"] or o["dropout_before"]}
    if not found:
        return []
    shifts = {bn.name: _measured_shift(ctx, bn) for bn in ctx.bns if (found.get(bn.name) or {}).get("dropout_before")}
    said = []
    after = [n for n, o in found.items() if o["after_activation"]]
    if after:
        said.append(after_activation_note(after))
    for name, s in shifts.items():
        shift = f"its input varies {s['median_ratio']:.2f}x as much in training as at inference (measured)" if (
            s and s["median_ratio"] is not None) else "the variance shift is not measured inside a nested model"
        said.append(f"dropout {found[name]['dropout_before']} feeds {name}: {shift}")
    fix = "nothing required: a note on the order"
    if shifts:
        moving, precise = evaluate_bn(ctx, "moving")["accuracy"], precise_bn_accuracy(ctx)
        if helps(ctx, moving, precise):  # the statistics dropout inflated cost accuracy: measured
            fix = (f"the shift costs accuracy here ({moving:.2%}, {precise:.2%} with statistics recomputed with "
                   f"dropout off): {advice.recompute(ctx, measured=True)}, or put dropout after the last BN")
        else:
            fix = f"nothing required: with dropout off the statistics measure no better ({moving:.2%} -> {precise:.2%})"
    return [Finding("layer_order", "info", "; ".join(said), fix, layers=list(found),
                    evidence={"order": found, "variance_shift": shifts})]
