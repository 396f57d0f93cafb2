"""Every BN layer's per-channel parameters, read from a checkpoint, and what BN does with them at inference
(the affine map scale * x + shift; see model/stats.py).

|gamma| is also the channel-importance signal of Network Slimming (Liu et al. 2017): a channel whose gamma
is near zero contributes (almost) only a constant and can be pruned.
"""

from __future__ import annotations

import numpy as np

from ..errors import TargetError
from ..model.stats import bn_parameters
from ..present.inspection import QUANTITIES, fixed
from ..runs.target import onnx_file, opened


def inspect_bn(target, *, which="best", layers=None) -> dict:
    """Every BN layer's per-channel parameters (see model.stats.bn_parameters).

    The values come from restoring the checkpoint into the model its run's config describes; a checkpoint
    without moving statistics fails the restore (every variable must be found) rather than showing 0 and 1.

    Args:
        target: a run directory, checkpoint prefix or .keras model, or a Target opened already.
        which: a run directory's checkpoint ("best", "latest", "recalibrated", "ema" or a training step).
        layers: only these BN layers (names); None: all.

    Returns:
        {"checkpoint": source, "layers": {name: {gamma, beta, moving_mean, moving_variance, scale, shift, ...}}}.
    """
    if onnx_file(target) is not None:  # an ONNX model: its BatchNormalization nodes' initializers
        from .onnx_doctor import inspect_onnx

        return inspect_onnx(onnx_file(target), layers)
    t = opened(target, which)
    prefix = t.source
    params = bn_parameters(t.model)
    if not params:
        raise TargetError(f"{prefix}: the model has no BN layers")
    if layers:
        unknown = [n for n in layers if n not in params]
        if unknown:
            raise TargetError(f"no BN layer named {', '.join(unknown)} (the model has: {', '.join(params)})")
        params = {n: params[n] for n in layers}
    return {"checkpoint": prefix, "layers": params}


def rank(layer: dict, thresholds) -> dict | None:
    """Channels ordered by |gamma|, largest first, and the fraction of channels below each threshold; None for a
    layer whose gamma is fixed (it ranks nothing)."""
    if fixed(layer, "gamma"):
        return None
    g = np.abs(layer["gamma"])
    return {"order": np.argsort(-g, kind="stable"),
            "below": {float(t): float((g < t).mean()) for t in thresholds}}


def counterparts(a: dict, b: dict) -> tuple[list, list]:
    """(names of the BN layers that match in both: same name and same channel count, the rest of either side).

    Two networks can share a layer name for unrelated layers; matching the shape as well keeps them apart."""
    same = [n for n, la in a["layers"].items() if n in b["layers"] and b["layers"][n]["channels"] == la["channels"]]
    rest = [n for n in [*a["layers"], *b["layers"]] if n not in same]
    return same, list(dict.fromkeys(rest))


def compare(a: dict, b: dict) -> dict:
    """Per-channel differences b - a for every BN layer with a counterpart (same name and channels) in both."""
    same, _ = counterparts(a, b)
    if not same:
        raise TargetError("the two checkpoints share no BN layer (same name and number of channels)")
    return {name: {q: b["layers"][name][q] - a["layers"][name][q] for q in QUANTITIES} for name in same}
