"""How `convbn diagnose` phrases a fix for where the model comes from, and the numbers a fix names.

A convbn run or export (one with a config) is changed through its config keys: model.bn.decay, model.bn.epsilon,
train.precise_bn. A Keras model trained elsewhere is changed where its author wrote it: the layers' arguments,
BatchNormalization(momentum=..., epsilon=...), and the training loop's `training=True`. A PyTorch model (an ONNX
graph exported from PyTorch, once diagnose opens ONNX targets: Context.framework "pytorch") through
nn.BatchNorm2d(momentum=..., eps=...), where momentum is the weight of the newest batch, 1 - Keras' momentum:
a shorter average is a lower Keras momentum but a higher PyTorch one, so every direction is said in the model's
own convention.
"""

from __future__ import annotations

import numpy as np

ORIGINS = ("convbn", "keras", "pytorch")
SHORT_AVERAGE = 0.9  # a Keras momentum below this averages fewer than ~10 batches: little more than the last one's
START_LEFT = 0.25  # moving statistics still holding this share of their start (mean 0, variance 1) lag behind
CLEAN_TOLERANCE = float(np.log(1.05))  # a measured factor this close (5%) to a clean one is that one at least


def origin(ctx) -> str:
    """"convbn" (the target has a convbn config), else the framework its model was written in."""
    if ctx.config is not None:
        return "convbn"
    return ctx.framework if ctx.framework in ORIGINS else "keras"


def _momentum(ctx, decay: float) -> str:
    """The layer argument that gives the average `decay` (Keras' momentum), in the model's own convention."""
    if origin(ctx) == "pytorch":
        return f"nn.BatchNorm2d(momentum={1 - decay:.4g})"
    return f"BatchNormalization(momentum={decay:g})"


def shorter_average(ctx, to: float | None = None, steps: int | None = None) -> str:
    """A decay whose average forgets its start sooner (`to`, fitting `steps`, when measured)."""
    o = origin(ctx)
    run = f" for {steps} steps" if steps else ""
    if to is None:
        return {"convbn": "a lower model.bn.decay (a shorter average)",
                "keras": "a lower momentum in the BN layers (BatchNormalization(momentum=...): a shorter average)",
                "pytorch": "a higher momentum in the BN layers (nn.BatchNorm2d(momentum=...): a shorter average; "
                           "PyTorch's momentum is 1 - Keras')"}[o]
    if o == "convbn":
        return f"lower model.bn.decay to {to:g} or below{run}"
    if o == "pytorch":
        return (f"raise the BN layers' momentum to {1 - to:.4g} or above{run} ({_momentum(ctx, to)}; PyTorch's "
                "momentum is 1 - Keras')")
    return f"lower the BN layers' momentum to {to:g} or below{run} ({_momentum(ctx, to)})"


def longer_average(ctx, decay: float) -> str:
    """A decay that averages more batches than `decay` does (about 1/(1 - decay))."""
    last = f"the statistics of the last ~{1 / (1 - decay):.0f} batch(es) only"
    return {"convbn": f"a higher model.bn.decay (0.9 to 0.99: decay {decay:g} keeps {last})",
            "keras": "a higher momentum in the BN layers (BatchNormalization(momentum=0.9 to 0.99): momentum "
                     f"{decay:g} keeps {last})",
            "pytorch": f"a lower momentum in the BN layers (nn.BatchNorm2d(momentum=0.01 to 0.1): momentum "
                       f"{1 - decay:.4g} keeps {last}; PyTorch's momentum is 1 - Keras')"}[origin(ctx)]


def recompute(ctx, measured: bool = False) -> str:
    """Recompute the moving statistics with the final weights (precise BN)."""
    here = " (precise BN, measured here)" if measured else ""
    o = origin(ctx)
    if o == "convbn":
        return f"convbn recalibrate TARGET{here}, or train.precise_bn: auto (it does so at the end of a run)"
    if o == "pytorch":
        return ("recompute the statistics with the final weights: reset_running_stats(), momentum=None, then a pass "
                "over training batches in train() mode under torch.no_grad()")
    return f"convbn recalibrate TARGET{here}: it saves the model with its statistics recomputed, beside it"


def epsilon(ctx) -> str:
    return {"convbn": "lower model.bn.epsilon", "keras": "a lower BatchNormalization(epsilon=...)",
            "pytorch": "a lower nn.BatchNorm2d(eps=...)"}[origin(ctx)]


def update_in_training(ctx) -> str:
    """How the moving statistics get updated while training."""
    return {"convbn": "train with the BN layers trainable, so that the update runs",
            "keras": "train with training=True so the update runs (model(x, training=True) in a custom loop; in TF1: "
                     "run tf.GraphKeys.UPDATE_OPS with the train op)",
            "pytorch": "call model.train() before training (model.eval() only for inference)"}[origin(ctx)]


def inference_mode(ctx) -> str:
    """How BN layers are made to use their moving statistics at inference."""
    return {"convbn": "run the model with training=False at inference (a custom layer or a wrapper that calls BN "
                      "with training=True keeps each batch's statistics)",
            "keras": "let those BN layers use their moving statistics at inference: a custom layer or call that passes "
                     "training=True to BN whatever it is given keeps each batch's statistics; pass the call's own "
                     "flag through (bn(x, training=training)) and load the weights into the fixed model "
                     "(model.save_weights, then load_weights)",
            "pytorch": "call model.eval() before inference and before torch.onnx.export (or export with "
                       "training=torch.onnx.TrainingMode.EVAL): in train() mode BN normalizes with each batch's "
                       "statistics"}[origin(ctx)]


def synchronized(ctx) -> str:
    """How BN statistics are averaged over every worker's batches in data-parallel training."""
    return {"convbn": "distribute.sync_bn: true",
            "keras": "BatchNormalization(synchronized=True) under the distribution strategy",
            "pytorch": "nn.SyncBatchNorm.convert_sync_batchnorm(model) under DDP"}[origin(ctx)]


def fitting_decay(steps: int) -> float:
    """The largest decay (two decimals) whose average forgets its start (weight below 1%) and spans at most a third
    of `steps`: what check_decay suggests."""
    d = min(0.01 ** (1 / max(steps, 1)), 1 - 3 / max(steps, 3))
    return max(0.0, float(np.floor(d * 100) / 100))


def decay_direction(decay: float, steps: int | None, start_left: float | None) -> str | None:
    """Which way a decay should move, from the measured lag: "lower" when the average is long for the steps taken or
    the statistics still hold a share of their start; "higher" when it spans so few batches that the statistics are
    a batch's noise; None when neither is measured. A decay of 0 (Keras momentum 0: the last batch alone) never gets
    "lower", which would point the wrong way."""
    lags = (bool(steps) and decay > fitting_decay(steps)) or (start_left is not None and start_left > START_LEFT)
    if decay > 0 and lags:
        return "lower"
    if decay < SHORT_AVERAGE and not lags:
        return "higher"
    return None


def clean_factor(factor: float, noise: float) -> float | None:
    """The power of 255 (1/255, 255, ...), else of 2 (1/16, 16, ...), within `noise` (natural log) of a measured
    factor, when exactly one is: the factor preprocessing code uses, which a measurement on other images than the
    training ones (or with statistics that lag the weights) only comes near. At least 5% counts as near; at most a
    factor 2 for the powers of 255, and 10% for the powers of 2, which lie a factor 2 apart: a factor between two
    of them (MNIST's standardization, 1/(255 * 0.3081), is 23% from 1/64) is left as measured."""
    for base, powers, most in ((255.0, (1, 2), np.log(2)), (2.0, range(1, 17), np.log(1.1))):
        tolerance = min(max(noise, CLEAN_TOLERANCE), most)
        near = [float(base ** (sign * k)) for k in powers for sign in (1, -1)
                if abs(np.log(factor) - sign * k * np.log(base)) <= tolerance]
        if len(near) == 1:
            return near[0]
    return None


def fraction(f: float) -> str:
    """1/255 for 0.00392..., 255 for 255.0."""
    return f"1/{1 / f:.6g}" if f < 1 else f"{f:.6g}"
