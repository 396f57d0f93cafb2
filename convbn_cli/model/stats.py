"""Per-channel BN statistics of a live model, as plain lists (for bn_stats/*.json and TensorBoard)."""

from __future__ import annotations

import numpy as np

from .builder import bn_layers


def bn_statistics(model) -> dict:
    """{layer name: {gamma, beta, moving_mean, moving_variance (lists, one entry per channel), epsilon, ...}}."""
    out = {}
    for layer in bn_layers(model):
        c = int(layer.moving_mean.shape[0])
        gamma = layer.gamma.numpy() if layer.scale else np.ones(c, np.float32)
        beta = layer.beta.numpy() if layer.center else np.zeros(c, np.float32)
        out[layer.name] = {
            "impl": "fused" if type(layer).__name__ == "FusedBatchNorm" else "keras",
            "channels": c,
            "epsilon": float(layer.epsilon),
            "decay": float(layer.momentum),
            "center": bool(layer.center),
            "scale": bool(layer.scale),
            "gamma": gamma.tolist(),
            "beta": beta.tolist(),
            "moving_mean": layer.moving_mean.numpy().tolist(),
            "moving_variance": layer.moving_variance.numpy().tolist(),
        }
    return out
