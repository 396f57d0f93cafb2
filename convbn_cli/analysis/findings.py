"""What `convbn diagnose`'s checks share: the Finding they report, the Context they look at, and the measurements
they take of the model on data (each BN mode's accuracy, an in-memory precise BN), each taken once per Context.

Severity: "error" (inference is wrong, or will be), "warning" (likely to cost accuracy), "info" (worth knowing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import keras
import numpy as np
import tensorflow as tf

from ..model import Evaluator, recalibrate_model
from ..model.bn import channel_axis, restore_statistics, snapshot_statistics
from ..model.graph import consumers, input_model

SEVERITIES = ("info", "warning", "error")
MATERIAL_GAP = 0.02  # accuracy points between batch- and moving-statistics inference that call for a look
QUIET = 1e-4  # channels whose variance is below this share of their layer's median: constant, they tell nothing


@dataclass
class Finding:
    name: str
    severity: str
    message: str
    fix: str
    layers: list = field(default_factory=list)
    channels: dict = field(default_factory=dict)  # {layer: [channel, ...]}
    evidence: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Context:
    """What the checks may look at: the model, its BN layers, data, and what is known of its training."""

    model: object
    num_classes: int
    images: np.ndarray  # normalized, as the model takes them
    labels: np.ndarray
    batch_size: int  # per replica, as trained (or a usual 128 when unknown)
    calibration: object  # batches of training images for an in-memory precise BN (model.recalibrate_model's)
    steps: int | None = None  # training steps taken, when known
    config: object = None
    kind: str = "external"
    scale: float | None = None  # what a model from elsewhere was fed: pixels x scale (--scale); None for runs
    # whose terms the fixes use for a model without a convbn config (advice.py): "keras", or "pytorch" for a graph
    # exported from PyTorch, whose BN momentum is 1 - Keras' (for ONNX targets, once diagnose opens them)
    framework: str = "keras"
    bns: list = field(default_factory=list)
    workers: list = field(default_factory=list)  # [(name, model)]: the other workers' models (diagnose A B ...)
    target_name: str | None = None  # how the user named the target, for findings that name several
    _stats: dict = field(default_factory=dict)
    _measured: dict = field(default_factory=dict)  # accuracies by BN mode, each measured once
    scale_mismatch: bool = False  # set by check_input_scale: the statistics look stale because the inputs are off
    suggested_scale: float | None = None  # and the --scale it names
    # the same training images as training made them (augmented, where `calibration` is not): what the moving
    # statistics averaged, so what the decay checks measure their lag and noise against; None: `calibration` is
    training_calibration: object = None

    def batches(self):
        n = len(self.images)
        return [(self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size])
                for i in range(0, n - self.batch_size + 1, self.batch_size)] or [(self.images, self.labels)]

    def population_stats(self, bn):
        """Mean and (biased) variance per channel of what `bn` receives at inference, over the data."""
        if bn.name not in self._stats:
            upstream = input_model(self.model, bn)
            flat = np.concatenate([per_channel(upstream(x, training=False), bn) for x, _ in self.batches()])
            self._stats[bn.name] = (flat.mean(0), flat.var(0))
        return self._stats[bn.name]


def run_checks(ctx, checks, only_with: dict, passed: list | None = None) -> list:
    """Every check's findings for an opened model (Keras or ONNX: the context answers the same questions), most
    severe first; a check in `only_with` runs only where its predicate holds (workers_disagree: when there are
    workers); the names of the checks that found nothing are appended to `passed`."""
    findings = []
    for check in checks:
        applies = only_with.get(check)
        if applies is not None and not applies(ctx):
            continue
        found = check(ctx)
        findings += found
        if not found and passed is not None:
            passed.append(check.__name__.removeprefix("check_"))
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))


def per_channel(tensor, bn) -> np.ndarray:
    """(values, channels) float64: `tensor` with every axis but the BN's channel axis flattened."""
    out = np.asarray(tensor, np.float64)
    axis = channel_axis(bn, out.ndim)
    return np.moveaxis(out, axis, -1).reshape(-1, out.shape[axis])


def dataset_of(ctx):
    """The context's images and labels in whole batches of its batch size."""
    return tf.data.Dataset.from_tensor_slices((ctx.images, ctx.labels)).batch(ctx.batch_size, drop_remainder=True)


def evaluate_bn(ctx, bn_stats):
    """{loss, accuracy, count, ...} with the moving ("moving") or each batch's own ("batch") BN statistics, once
    each."""
    if bn_stats not in ctx._measured:
        ctx._measured[bn_stats] = Evaluator(ctx.model, ctx.num_classes, bn_stats)(dataset_of(ctx))
    return ctx._measured[bn_stats]


def in_precise_bn(ctx, fn, as_trained: bool = False):
    """fn() run with the statistics an in-memory precise BN gives (computed once); the model's own are put back
    afterwards: nothing is written. `as_trained`: over ctx.training_calibration, the batches the moving statistics
    averaged (where training augments, precise BN's own batches are unaugmented: the difference is the
    augmentation's, not a lag)."""
    batches, key = ctx.calibration, "precise_stats"
    if as_trained and ctx.training_calibration is not None:
        batches, key = ctx.training_calibration, "precise_stats_as_trained"
    saved = snapshot_statistics(ctx.model)
    try:
        if key not in ctx._measured:
            recalibrate_model(ctx.model, batches)
            ctx._measured[key] = snapshot_statistics(ctx.model)
        restore_statistics(ctx._measured[key])
        return fn()
    finally:
        restore_statistics(saved)


def precise_bn_accuracy(ctx, as_trained: bool = False) -> float:
    """Accuracy after an in-memory precise BN (nothing written): what recalibrating gives, or `as_trained`, with
    the statistics of the batches training averaged (what the best decay could leave: in_precise_bn)."""
    key = "precise_as_trained" if as_trained and ctx.training_calibration is not None else "precise"
    if key not in ctx._measured:
        ctx._measured[key] = in_precise_bn(ctx, lambda: Evaluator(ctx.model, ctx.num_classes)(dataset_of(ctx)),
                                           as_trained=as_trained)
    return ctx._measured[key]["accuracy"]


def precise_statistics(ctx) -> dict:
    """{BN layer name: (mean, variance)} float64 that an in-memory precise BN computes over the batches training
    averaged (nothing written): what the decay checks hold the moving statistics against."""
    def read():
        return {bn.name: (np.asarray(bn.moving_mean.numpy(), np.float64),
                          np.asarray(bn.moving_variance.numpy(), np.float64)) for bn in ctx.bns}

    if "precise_by_layer" not in ctx._measured:
        ctx._measured["precise_by_layer"] = in_precise_bn(ctx, read, as_trained=True)
    return ctx._measured["precise_by_layer"]


def helps(ctx, before: float, after: float) -> bool:
    """Whether precise BN measurably improves the accuracy: by more than two standard errors (at least a point)."""
    n = max(len(ctx.images), 1)
    return after - before > max(MATERIAL_GAP / 2, 2 * np.sqrt(max(before * (1 - before), 1e-4) / n))


def following_relu(model, bn):
    """The ReLU that alone consumes `bn`'s output, or None."""
    after = consumers(model, bn)
    if len(after) != 1:
        return None
    act = after[0]
    if isinstance(act, keras.layers.ReLU) or (isinstance(act, keras.layers.Activation)
                                              and getattr(act.activation, "__name__", "") == "relu"):
        return act
    return None


def usable_channels(population_var: np.ndarray) -> np.ndarray:
    """Channels whose population variance is finite and not negligible against the layer's median: a constant
    channel (a ReLU that never fires before the BN) has a variance at float rounding, and any distance divided by
    it (or by a tiny epsilon) is noise."""
    pv = np.asarray(population_var, np.float64)
    ok = np.isfinite(pv) & (pv > 0)
    if not ok.any():
        return ok
    return ok & (pv > QUIET * np.median(pv[ok]))
