"""`convbn diagnose`: what is wrong with a model's batch normalization, measured on the model and on data.

Works on convbn's runs and on any Keras 3 model with BN layers (a `.keras` file trained anywhere). Each check
below looks for one problem that users of Keras, TensorFlow and PyTorch keep reporting, and each finding has a
name, a severity, the layers (and channels) concerned, the evidence in numbers, and one concrete fix.

Severity: "error" (inference is wrong, or will be), "warning" (likely to cost accuracy), "info" (worth knowing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ..errors import TargetError
from ..model import Evaluator, bn_layers, recalibrate_model
from ..model.bn import channel_axis, restore_statistics, snapshot_statistics
from ..model.fold import foldable_pairs
from ..model.graph import all_layers, consumers, input_model, output_model, producer
from ..model.stats import bn_layer_parameters
from ..present.thresholds import DEAD_GAMMA
from ..runs.target import Target, opened

SEVERITIES = ("info", "warning", "error")
MATERIAL_GAP = 0.02  # accuracy points between batch- and moving-statistics inference that call for a look
FEW_VALUES = 16  # values per channel per replica under which batch statistics are too noisy to trust
SCALE_OFF = 10.0  # inputs this many times too large (or small) for the first BN layer: a scale mismatch


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
    bns: list = field(default_factory=list)
    _stats: dict = field(default_factory=dict)
    _measured: dict = field(default_factory=dict)  # accuracies by BN mode, each measured once
    scale_mismatch: bool = False  # set by check_input_scale: the statistics look stale because the inputs are off

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


def per_channel(tensor, bn) -> np.ndarray:
    """(values, channels) float64: `tensor` with every axis but the BN's channel axis flattened."""
    out = np.asarray(tensor, np.float64)
    axis = channel_axis(bn, out.ndim)
    return np.moveaxis(out, axis, -1).reshape(-1, out.shape[axis])


# --------------------------------------------------------------------------- the checks

def check_never_updated(ctx) -> list:
    """Moving mean exactly 0 and variance exactly 1 in a trained model: the update ops never ran (TF1's
    UPDATE_OPS, a custom loop calling the model without training=True, or a frozen layer)."""
    stuck = [bn.name for bn in ctx.bns
             if np.all(bn.moving_mean.numpy() == 0) and np.all(bn.moving_variance.numpy() == 1)]
    trained = any(np.any(bn.gamma.numpy() != 1) for bn in ctx.bns if bn.scale) or bool(ctx.steps)
    if not stuck or not trained:
        return []
    moving, precise = _evaluate(ctx, "moving")["accuracy"], _recalibrated_accuracy(ctx)
    now = (f"; or recompute them now: convbn recalibrate TARGET (measured here: {moving:.2%} -> {precise:.2%})"
           if _helps(ctx, moving, precise) else "")
    return [Finding("moving_statistics_never_updated", "error",
                    f"{len(stuck)} BN layer(s) still hold their initial moving statistics (mean 0, variance 1) in a "
                    "trained model: inference normalizes with numbers that were never measured",
                    "train with training=True so the update runs (in TF1: run tf.GraphKeys.UPDATE_OPS with the train "
                    f"op){now}", layers=stuck,
                    evidence={"moving_mean": 0.0, "moving_variance": 1.0, "steps": ctx.steps,
                              "accuracy_moving": moving, "accuracy_after_precise_bn": precise})]


def check_decay(ctx) -> list:
    """A decay whose averaging horizon 1/(1-decay) is long against the steps taken: the moving statistics still
    remember their start and lag behind the final weights."""
    if not ctx.steps:
        return []
    out = []
    updating = [bn for bn in ctx.bns if bn.trainable]  # a frozen layer's statistics are not averaged at all
    for decay in sorted({round(float(bn.momentum), 6) for bn in updating}):
        left = decay ** ctx.steps  # the weight the initial (0, 1) still has in the average
        if left > 0.01 or ctx.steps < 3 / max(1 - decay, 1e-9):
            names = [bn.name for bn in updating if round(float(bn.momentum), 6) == decay]
            fitting = fitting_decay(ctx.steps)
            lower = (f"lower model.bn.decay to {fitting:g} or below for {ctx.steps} steps, or " if fitting < decay
                     else "")
            out.append(Finding(
                "decay_too_slow", "warning",
                f"decay {decay:g} averages over ~{1 / (1 - decay):.0f} steps but training took {ctx.steps}: the "
                f"initial statistics still weigh {left:.1%} and the rest lags behind the final weights",
                f"{lower}run convbn recalibrate TARGET (train.precise_bn: auto does it at the end of a run)",
                layers=names, evidence={"decay": decay, "keras_momentum": decay, "pytorch_momentum": 1 - decay,
                                        "horizon_steps": 1 / (1 - decay), "steps": ctx.steps,
                                        "initial_weight_left": left}))
    return out


def fitting_decay(steps: int) -> float:
    """The largest decay (two decimals) whose average forgets its start (weight below 1%) and spans at most a third
    of `steps`: what check_decay suggests."""
    d = min(0.01 ** (1 / max(steps, 1)), 1 - 3 / max(steps, 3))
    return max(0.0, float(np.floor(d * 100) / 100))


def check_inference_gap(ctx) -> list:
    """Accuracy with moving vs batch statistics on the same images, and how far each channel's moving statistics
    sit from the data's, in units of the data's standard deviation."""
    moving = _evaluate(ctx, "moving")
    batch = _evaluate(ctx, "batch")
    gap = batch["accuracy"] - moving["accuracy"]
    if gap <= MATERIAL_GAP:
        return []
    per_layer, channels = {}, {}
    for bn in ctx.bns:
        mean, var = ctx.population_stats(bn)
        z = np.abs(bn.moving_mean.numpy() - mean) / np.sqrt(var + bn.epsilon)
        ratio = bn.moving_variance.numpy() / np.maximum(var, 1e-12)
        per_layer[bn.name] = {"max_mean_distance_in_std": float(z.max()), "median_mean_distance_in_std":
                              float(np.median(z)), "variance_ratio_range": [float(ratio.min()), float(ratio.max())]}
        far = np.flatnonzero((z > 1) | (ratio > 2) | (ratio < 0.5)).tolist()
        if far:
            channels[bn.name] = far
    recal = _recalibrated_accuracy(ctx)
    # A gap that precise BN does not close comes from evaluating with small batches' own statistics, not from
    # stale moving averages: worth knowing, not a fault.
    helps = _helps(ctx, moving["accuracy"], recal)
    severity = "error" if gap > 0.1 else "warning" if helps else "info"
    fix = ("scale the inputs as in training first (input_scale_mismatch): the statistics only look stale"
           if ctx.scale_mismatch else
           "convbn recalibrate TARGET (precise BN, measured here), or train.precise_bn / a lower model.bn.decay"
           if helps else "keep the moving statistics: precise BN does not improve them here (the gap comes from "
           "normalizing small evaluation batches with their own statistics, or from layers meant to stay frozen)")
    return [Finding("inference_training_gap", severity,
                    f"inference with the moving statistics reaches {moving['accuracy']:.2%}, with each batch's own "
                    f"statistics {batch['accuracy']:.2%}; precise BN would give {recal:.2%}",
                    fix,
                    layers=list(channels) or [bn.name for bn in ctx.bns], channels=channels,
                    evidence={"accuracy_moving": moving["accuracy"], "accuracy_batch": batch["accuracy"],
                              "loss_moving": moving["loss"], "loss_batch": batch["loss"],
                              "accuracy_after_precise_bn": recal, "layers": per_layer})]


def check_bn_axis(ctx) -> list:
    """BN normalizing an axis that is not the channel axis of the conv that feeds it: one statistic (and one gamma
    and beta) per image row or column instead of per feature map. `axis=1` on channels_last data, or the default
    axis=-1 after a channels_first conv: the very mistake the classic "BN on a conv layer" question is about.
    A BN with no conv or pooling layer right before it (after an Add, a ReLU, the input) is judged by the layout
    of the model's conv and pooling layers, when they all share one."""
    layouts = {getattr(layer, "data_format", None) for layer in all_layers(ctx.model)} - {None}
    only = next(iter(layouts)) if len(layouts) == 1 else None
    out = []
    for bn in ctx.bns:
        prev = producer(bn)
        fmt = getattr(prev, "data_format", None)
        source = f"{prev.name}'s" if fmt else "the model's"
        fmt = fmt or only
        shape = tuple(bn.input.shape)
        if fmt not in ("channels_last", "channels_first") or len(shape) != 4:
            continue
        want = 1 if fmt == "channels_first" else 3
        got = channel_axis(bn, 4)
        if got != want:
            out.append(Finding(
                "bn_wrong_axis", "error",
                f"{bn.name} normalizes axis {got} (size {shape[got]}) of {source} {fmt} output, whose feature "
                f"maps are on axis {want} ({shape[want]} channels): it learns one scale and shift per "
                f"{'row' if got in (1, 2) and fmt == 'channels_last' else 'position'}, not per feature map",
                f"BatchNormalization(axis={-1 if want == 3 else 1}) after a {fmt} conv", layers=[bn.name],
                evidence={"bn_axis": got, "channel_axis": want, "data_format": fmt, "input_shape": list(shape)}))
    return out


def check_input_scale(ctx) -> list:
    """A model from elsewhere fed pixels on another scale than it was trained on (0-255 against 0-1): the first BN
    layer's moving variance is off from what the data give by the same large factor in every channel (s^2, for
    inputs s times too small or too large), which precise BN would only hide. Names the --scale to use."""
    if ctx.scale is None or not ctx.bns:
        return []
    first = ctx.bns[0]
    mean, var = ctx.population_stats(first)
    ratio = first.moving_variance.numpy() / np.maximum(var, 1e-12)
    live = ratio[(var > 1e-8) & (first.moving_variance.numpy() > first.epsilon)]
    if len(live) == 0:
        return []
    spread = np.log10(live.max() / live.min())
    factor = float(np.sqrt(np.median(live)))  # the trained inputs were `factor` times the ones given here
    if not (factor > SCALE_OFF or factor < 1 / SCALE_OFF) or spread > 1:
        return []
    # The means must tell the same story (they scale by the factor, not by its square): statistics that merely
    # lag from their start (mean 0, variance 1) give a variance far off too, but not means `factor` apart.
    clear = np.abs(mean) > 0.1 * np.sqrt(var)
    means = first.moving_mean.numpy()[clear] / mean[clear]
    if not len(means) or not 0.5 < float(np.median(means)) / factor < 2:
        return []
    ctx.scale_mismatch = True
    suggested = ctx.scale * factor
    return [Finding("input_scale_mismatch", "error",
                    f"{first.name}, the first BN layer, expects inputs about {factor:.3g} times the ones given (moving "
                    f"variance {np.median(live):.3g} times the data's, alike in all {len(live)} channels): the images "
                    f"are not scaled as in training (--scale {ctx.scale:.4g} now)",
                    f"--scale {suggested:.4g}" + (" (raw pixels 0-255)" if abs(suggested - 1) < 0.2 else
                                                  " (pixels in [0, 1])" if abs(suggested * 255 - 1) < 0.2 else "")
                    + ", then diagnose again; recalibrating on wrongly scaled images would only hide this",
                    layers=[first.name], evidence={"variance_ratio_median": float(np.median(live)),
                                                   "variance_ratio_spread_decades": float(spread),
                                                   "scale_given": ctx.scale, "scale_suggested": suggested})]


def check_accuracy_floor(ctx) -> list:
    """A model at chance whatever BN uses (moving statistics, each batch's own, precise BN): these images do not fit
    the model (another dataset, another preprocessing or --scale, or it never learned), and no BN verdict can be
    drawn from them."""
    labels = np.asarray(ctx.labels)
    if len(labels) == 0:
        return []
    chance = float(np.bincount(labels.astype(np.int64)).max()) / len(labels)  # always guessing the commonest class
    measured = max(_evaluate(ctx, "moving")["count"], 1)  # (whole batches of the images)
    margin = max(0.05, 2 * np.sqrt(chance * (1 - chance) / measured))  # 5 points, or two standard errors of guessing
    modes = {"moving": _evaluate(ctx, "moving")["accuracy"], "batch": _evaluate(ctx, "batch")["accuracy"]}
    if max(modes.values()) > chance + margin:
        return []
    modes["precise_bn"] = _recalibrated_accuracy(ctx)
    if modes["precise_bn"] > chance + margin:
        return []
    return [Finding("accuracy_at_chance", "error",
                    "the model is at chance on these images whatever BN uses (moving statistics "
                    f"{modes['moving']:.2%}, "
                    f"batch statistics {modes['batch']:.2%}, precise BN {modes['precise_bn']:.2%}; chance "
                    f"{chance:.2%}): the data do not fit the model, which is not a BN verdict",
                    "check that the images are the ones it was trained on, preprocessed the same way (--scale: what "
                    "its pixels 0-255 were multiplied by), and that it was trained at all", layers=[],
                    evidence={"accuracy": modes, "chance": chance})]


def check_dead_channels(ctx) -> list:
    """Channels that carry nothing: |gamma| near 0, or never positive after the ReLU that follows the BN. A channel
    is judged with the statistics precise BN gives when those differ materially from the moving ones: a channel
    "dead" only because stale moving statistics shift it below zero comes back after precise BN, and pruning it
    would do harm (it is reported as such, with no pruning advice)."""
    stale = _helps(ctx, _evaluate(ctx, "moving")["accuracy"], _recalibrated_accuracy(ctx))
    now = _dead(ctx)
    settled = _in_precise_bn(ctx, lambda: _dead(ctx)) if stale else now
    out = []
    for bn in ctx.bns:
        found, only_stale = settled.get(bn.name, {}), sorted(set(now.get(bn.name, {})) - set(settled.get(bn.name, {})))
        if found:
            out.append(Finding("dead_channels", "warning",
                               f"{bn.name}: {len(found)} of {bn.moving_mean.shape[0]} channel(s) carry nothing",
                               "prune them (convbn inspect-bn TARGET --rank), or train with less weight decay / a "
                               "lower learning rate", layers=[bn.name], channels={bn.name: sorted(found)},
                               evidence={"why": {str(c): w for c, w in sorted(found.items())},
                                         "gamma_threshold": DEAD_GAMMA}))
        if only_stale:
            out.append(Finding("channels_silenced_by_stale_statistics", "info",
                               f"{bn.name}: {len(only_stale)} channel(s) are never positive after the ReLU with the "
                               "moving statistics but come back with precise BN's: a consequence of the stale "
                               "statistics, not dead channels",
                               "do not prune them: " + ("scale the inputs as in training (input_scale_mismatch)"
                                                        if ctx.scale_mismatch else "convbn recalibrate TARGET"),
                               layers=[bn.name], channels={bn.name: only_stale}))
    return out


def _dead(ctx) -> dict:
    """{BN layer: {channel: why}} of the channels that carry nothing with the model's current statistics."""
    out = {}
    for bn in ctx.bns:
        found = {}
        if bn.scale:
            found.update({int(c): "gamma" for c in np.flatnonzero(np.abs(bn.gamma.numpy()) < DEAD_GAMMA)})
        relu = _following_relu(ctx.model, bn)
        if relu is not None:
            upto = output_model(ctx.model, relu)
            peak = np.max([per_channel(upto(x, training=False), bn).max(0) for x, _ in ctx.batches()], axis=0)
            found.update({int(c): found.get(int(c), "never positive after ReLU") for c in np.flatnonzero(peak <= 0)})
        if found:
            out[bn.name] = found
    return out


def check_values(ctx) -> list:
    """Non-finite or extreme values in BN variables; variances so small that epsilon dominates."""
    out = []
    for bn in ctx.bns:
        p = bn_layer_parameters(bn)
        arrays = {q: p[q] for q in ("gamma", "beta", "moving_mean", "moving_variance")}
        bad = {q: int((~np.isfinite(a)).sum()) for q, a in arrays.items() if not np.isfinite(a).all()}
        if bad:
            out.append(Finding("non_finite_bn_values", "error",
                               f"{bn.name}: NaN or infinite values in {', '.join(bad)}",
                               "retrain from the last finite checkpoint with a lower learning rate", layers=[bn.name],
                               evidence={"non_finite_counts": bad}))
            continue
        negative = np.flatnonzero(p["moving_variance"] + bn.epsilon <= 0)
        if len(negative):  # sqrt(variance + epsilon) of a negative number: NaN at inference
            out.append(Finding("negative_moving_variance", "error",
                               f"{bn.name}: {len(negative)} channel(s) have a negative moving variance (down to "
                               f"{float(p['moving_variance'].min()):.3g}); inference divides by the square root of "
                               "variance + epsilon, so those channels give NaN",
                               "recompute the statistics: convbn recalibrate TARGET (and look for what wrote them: a "
                               "hand-edited or converted checkpoint)", layers=[bn.name],
                               channels={bn.name: negative.tolist()},
                               evidence={"min_moving_variance": float(p["moving_variance"].min()),
                                         "epsilon": float(bn.epsilon)}))
            continue
        big = {q: float(np.abs(a).max()) for q, a in arrays.items() if np.abs(a).max() > 1e6}
        if big:
            out.append(Finding("extreme_bn_values", "warning", f"{bn.name}: values above 1e6 in {', '.join(big)}",
                               "check the input scaling and the learning rate", layers=[bn.name], evidence=big))
        tiny = np.flatnonzero(p["moving_variance"] <= bn.epsilon)
        if len(tiny) > 0.25 * len(p["moving_variance"]):
            out.append(Finding("epsilon_dominates", "warning",
                               f"{bn.name}: {len(tiny)} channel(s) have a moving variance at or below epsilon "
                               f"({bn.epsilon:g}), so BN barely normalizes them",
                               "lower model.bn.epsilon (Keras: epsilon), or scale the inputs up", layers=[bn.name],
                               channels={bn.name: tiny.tolist()},
                               evidence={"epsilon": float(bn.epsilon),
                                         "median_variance": float(np.median(p["moving_variance"]))}))
    return out


POOLS = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)


def check_redundant_bias(ctx) -> list:
    """A bias in the conv/dense right before a BN with center: BN's beta already shifts each channel. Only for a
    linear producer: a bias before the producer's own activation (Conv2D(activation="relu")) is not redundant.
    A pooling layer in between (conv -> pool -> BN, convbn's `pool: 2` blocks) changes nothing: a per-channel
    constant passes through a max or an average unchanged."""
    hits = {}
    for bn in ctx.bns:
        prev = producer(bn)
        while isinstance(prev, POOLS):
            prev = producer(prev)
        linear = getattr(getattr(prev, "activation", None), "__name__", "linear") == "linear"
        if bn.center and linear and getattr(prev, "use_bias", False) and getattr(prev, "bias", None) is not None:
            hits[prev.name] = int(np.prod(prev.bias.shape))
    if not hits:
        return []
    return [Finding("redundant_bias_before_bn", "info",
                    f"{len(hits)} layer(s) before a centered BN have a bias ({sum(hits.values())} wasted parameters; "
                    "it also makes BN folding and channels_first exports fragile)",
                    "use_bias=False on those Conv2D/Dense layers (convbn drops it by itself)", layers=list(hits),
                    evidence={"bias_parameters": hits})]


def check_dtypes(ctx) -> list:
    """BN statistics and parameters kept in float32 under mixed precision (float16/bfloat16 lose them)."""
    low = {bn.name: sorted({v.dtype for v in bn.weights if v.dtype != "float32"}) for bn in ctx.bns}
    low = {k: v for k, v in low.items() if v}
    if not low:
        return []
    return [Finding("bn_variables_not_float32", "error",
                    f"{len(low)} BN layer(s) keep variables in "
                    + ", ".join(sorted({d for v in low.values() for d in v})),
                    "keep BN variables float32: a mixed_* dtype policy (Keras keeps BN variables float32), not a "
                    "layer dtype of float16/bfloat16", layers=list(low), evidence={"dtypes": low})]


def check_few_values(ctx) -> list:
    """Batch statistics over too few values per channel per replica: noisy in training, and far from what the
    moving averages hold at inference."""
    if ctx.config is None:
        return []
    hits = {}
    for bn in ctx.bns:
        shape = bn.input.shape  # (batch, ..., channels) or (batch, channels, ...)
        axis = channel_axis(bn, len(shape))
        spatial = int(np.prod([d for i, d in enumerate(shape) if i not in (0, axis)]))
        values = ctx.config.data.batch_size * spatial
        if values < FEW_VALUES:
            hits[bn.name] = values
    if not hits:
        return []
    return [Finding("too_few_values_per_channel", "warning",
                    f"{len(hits)} BN layer(s) normalize over fewer than {FEW_VALUES} values per channel per replica",
                    "raise data.batch_size (it is per replica), or use distribute.sync_bn: true across replicas",
                    layers=list(hits), evidence={"values_per_channel": hits,
                                                 "batch_size_per_replica": ctx.config.data.batch_size})]


def check_frozen(ctx) -> list:
    """BN layers with trainable=False in a model that is otherwise trainable: in Keras 3 such a layer always runs
    in inference mode (moving statistics, no updates), which is right for fine-tuning and a surprise otherwise."""
    frozen = [bn.name for bn in ctx.bns if not bn.trainable]
    others = [layer for layer in ctx.model.layers if layer.trainable_weights and layer not in ctx.bns]
    if not frozen or not others:
        return []
    return [Finding("frozen_bn_layers", "info",
                    f"{len(frozen)} BN layer(s) have trainable=False: in Keras 3 they run in inference mode even in "
                    "training (moving statistics used, never updated; gamma and beta fixed)",
                    "set layer.trainable = True to let them adapt, or keep them frozen deliberately when fine-tuning "
                    "on little data", layers=frozen, evidence={"frozen": len(frozen), "bn_layers": len(ctx.bns)})]


def check_unfolded_export(ctx) -> list:
    """An exported model that still computes BN at inference although each BN could fold into its conv/dense."""
    if ctx.kind != "export":
        return []
    pairs = foldable_pairs(ctx.model)
    if not pairs:
        return []
    return [Finding("bn_not_folded", "info",
                    f"{len(pairs)} BN layer(s) directly follow a conv/dense and could be folded into it",
                    "convbn export RUN --fold-bn (one op fewer per block at inference, same outputs)",
                    layers=[bn.name for bn in pairs])]


# in this order: check_input_scale tells check_inference_gap whether stale-looking statistics are a scale problem
CHECKS = (check_never_updated, check_decay, check_bn_axis, check_input_scale, check_accuracy_floor,
          check_inference_gap, check_dead_channels, check_values, check_redundant_bias, check_dtypes, check_few_values,
          check_frozen, check_unfolded_export)


# --------------------------------------------------------------------------- helpers

def _dataset(ctx):
    return tf.data.Dataset.from_tensor_slices((ctx.images, ctx.labels)).batch(ctx.batch_size, drop_remainder=True)


def _evaluate(ctx, bn_stats):
    """{loss, accuracy, ...} with the moving ("moving") or each batch's own ("batch") BN statistics, once each."""
    if bn_stats not in ctx._measured:
        ctx._measured[bn_stats] = Evaluator(ctx.model, ctx.num_classes, bn_stats)(_dataset(ctx))
    return ctx._measured[bn_stats]


def _in_precise_bn(ctx, fn):
    """fn() run with the statistics an in-memory precise BN gives (computed once); the model's own are put back
    afterwards: nothing is written."""
    saved = snapshot_statistics(ctx.model)
    try:
        if "precise_stats" not in ctx._measured:
            recalibrate_model(ctx.model, ctx.calibration)
            ctx._measured["precise_stats"] = snapshot_statistics(ctx.model)
        restore_statistics(ctx._measured["precise_stats"])
        return fn()
    finally:
        restore_statistics(saved)


def _recalibrated_accuracy(ctx) -> float:
    """Accuracy after an in-memory precise BN (nothing written)."""
    if "precise" not in ctx._measured:
        ctx._measured["precise"] = _in_precise_bn(ctx, lambda: Evaluator(ctx.model, ctx.num_classes)(_dataset(ctx)))
    return ctx._measured["precise"]["accuracy"]


def _helps(ctx, before: float, after: float) -> bool:
    """Whether precise BN measurably improves the accuracy: by more than two standard errors (at least a point)."""
    n = max(len(ctx.images), 1)
    return after - before > max(MATERIAL_GAP / 2, 2 * np.sqrt(max(before * (1 - before), 1e-4) / n))


def _following_relu(model, bn):
    after = consumers(model, bn)
    if len(after) != 1:
        return None
    act = after[0]
    if isinstance(act, keras.layers.ReLU) or (isinstance(act, keras.layers.Activation)
                                              and getattr(act.activation, "__name__", "") == "relu"):
        return act
    return None


def diagnose_model(ctx: Context, passed: list | None = None) -> list:
    """Every check's findings for an opened model and its data, most severe first; the names of the checks that
    found nothing are appended to `passed`."""
    ctx.bns = bn_layers(ctx.model)
    findings = []
    for check in CHECKS:
        found = check(ctx)
        findings += found
        if not found and passed is not None:
            passed.append(check.__name__.removeprefix("check_"))
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))



# --------------------------------------------------------------------------- opening a target with its data

def diagnose(target, *, which="best", data=None, batches=20, scale=1 / 255, log=lambda m: None) -> dict:
    """Diagnose the BN of a run directory, checkpoint, convbn export or any Keras 3 `.keras` model.

    Args:
        target: what `convbn eval` takes, or any .keras model with BN layers.
        which: a run directory's checkpoint ("best", "latest", "recalibrated", "ema" or a training step).
        data: for a model from elsewhere (required there): "mnist", "fashion_mnist", or an .npz path with `x`
            (N, H, W[, C]) and `y`; for convbn's own targets the run's dataset is used when None.
        batches: how many batches of images the data checks (and the in-memory precise BN) use.
        scale: the factor pixels are multiplied by for a model from elsewhere (1/255: pixels in [0, 1]).

    Returns:
        {"target", "kind", "bn_layers", "images", "findings": [Finding, ...], "counts": {severity: n}}.
    """
    t = opened(target, which)
    if not bn_layers(t.model):
        raise TargetError(f"{t.source}: the model has no BN layers to diagnose")
    d = t.eval_data(batches, data_source=data, scale=scale, log=log)
    n = batches * d.batch_size  # batches of the training size (a model from elsewhere: of 128)
    ctx = Context(t.model, d.num_classes, d.images[:n], d.labels[:n], d.batch_size, d.calibration, _steps(t),
                  t.config, t.kind, scale=None if t.config is not None else scale)
    log(f"diagnosing {t.source}: {len(bn_layers(t.model))} BN layer(s), {len(ctx.images)} images; measuring with "
        "the moving statistics, each batch's own and an in-memory precise BN ...")
    passed = []
    findings = diagnose_model(ctx, passed)
    named = str(target) if not isinstance(target, Target) else str(t.run.path if t.kind == "checkpoint" else t.source)
    for f in findings:  # the fixes name the user's own target
        f.fix = f.fix.replace("TARGET", named)
    return {"target": t.source, "kind": t.kind, "bn_layers": [bn.name for bn in ctx.bns], "images": len(ctx.images),
            "findings": findings, "passed": passed,
            "counts": {s: sum(f.severity == s for f in findings) for s in SEVERITIES}}


def _steps(t):
    """The training steps the model took, when known: a run's metrics, else a compiled model's optimizer."""
    if t.run is not None:
        rows = t.run.read_metrics()
        # a precise-BN or EMA checkpoint's statistics were computed for its weights, not averaged with the decay
        # over the training steps: the decay has nothing left to say about them (they are judged by what they measure)
        computed = Path(t.source).parent.resolve() in (t.run.recalibrated.resolve(), t.run.ema.resolve())
        return rows[-1]["step"] if rows and not computed else None
    optimizer = getattr(t.model, "optimizer", None)
    steps = int(optimizer.iterations.numpy()) if optimizer is not None and hasattr(optimizer, "iterations") else None
    return steps or None
