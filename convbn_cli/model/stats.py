"""Per-channel BN parameters of a live model: what bn_stats/*.json, TensorBoard, inspect-bn and BN folding read.

At inference BN is an affine map per channel, y = scale * x + shift, with
    scale = gamma / sqrt(moving_variance + epsilon),   shift = beta - moving_mean * scale.
"""

from __future__ import annotations

import numpy as np

from .bn import bn_impl, bn_layers, moving_variance_rule


def bn_layer_parameters(layer) -> dict:
    """One BN layer's per-channel arrays (float64): gamma, beta, moving mean/variance, and the inference map."""
    mean = np.asarray(layer.moving_mean.numpy(), np.float64)
    var = np.asarray(layer.moving_variance.numpy(), np.float64)
    gamma = np.asarray(layer.gamma.numpy(), np.float64) if layer.scale else np.ones_like(mean)
    beta = np.asarray(layer.beta.numpy(), np.float64) if layer.center else np.zeros_like(mean)
    # a negative variance (a converted or hand-edited checkpoint) gives NaN here, as at inference: diagnose reports
    # it as negative_moving_variance, so NumPy's RuntimeWarning would only repeat it as noise
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = gamma / np.sqrt(var + layer.epsilon)
    return {
        "channels": int(mean.shape[0]), "epsilon": float(layer.epsilon), "decay": float(layer.momentum),
        "center": bool(layer.center), "scale_learned": bool(layer.scale),
        "impl": bn_impl(layer), "moving_variance_rule": moving_variance_rule(layer),
        "gamma": gamma, "beta": beta, "moving_mean": mean, "moving_variance": var,
        "scale": scale, "shift": beta - mean * scale,
    }


def bn_parameters(model) -> dict:
    """{layer name: bn_layer_parameters(layer)} for every BN layer of the model, in order."""
    return {layer.name: bn_layer_parameters(layer) for layer in bn_layers(model)}


def bn_statistics(model) -> dict:
    """bn_parameters with the arrays as lists (JSON-ready)."""
    return {name: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in p.items()}
            for name, p in bn_parameters(model).items()}
