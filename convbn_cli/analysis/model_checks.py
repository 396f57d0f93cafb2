"""`convbn diagnose`'s checks of the model alone: its structure, its BN variables and their dtypes, what is known of
its training; nothing here runs the model on data, except to confirm that a change epsilon_dominates would
suggest (a lower epsilon) changes the outputs at all."""

from __future__ import annotations

import keras
import numpy as np

from ..model.bn import channel_axis
from ..model.fold import foldable_pairs
from ..model.graph import all_layers, producer
from ..model.stats import bn_layer_parameters
from . import advice
from .batch_checks import epsilon_effect
from .findings import Finding

FEW_VALUES = 16  # values per channel per replica under which batch statistics are too noisy to trust


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
        out += _epsilon_dominates(ctx, bn, p)
    return out


def _epsilon_dominates(ctx, bn, p) -> list:
    """More than a quarter of the channels with a moving variance at or below epsilon, where a lower epsilon
    (10x, 100x) in those channels measurably changes the outputs: otherwise (channels that are constant, or that
    nothing after them uses) the advice would change nothing, and the finding would only stand beside the model's
    real fault."""
    tiny = np.flatnonzero(p["moving_variance"] <= bn.epsilon)
    if len(tiny) <= 0.25 * len(p["moving_variance"]):
        return []
    effect = None
    if len(ctx.images):  # measured on a Keras model here, by a context of another format through its own method
        own = getattr(ctx, "epsilon_effect", None)  # (bn, channels) -> batch_checks.epsilon_effect's dict
        if own is not None:
            effect = own(bn, tiny)
        elif isinstance(ctx.model, keras.Model):
            effect = epsilon_effect(ctx, bn, tiny)
    if effect is not None and not effect["material"]:
        return []
    rel = None if effect is None else effect["by_factor"]["10x"]["relative_change"]
    changed = ("" if effect is None else "; measured: a 10x lower epsilon there changes the logits "
               + ("to non-finite values" if rel is None else f"by {rel:.1%}"))
    return [Finding("epsilon_dominates", "warning",
                    f"{bn.name}: {len(tiny)} channel(s) have a moving variance at or below epsilon ({bn.epsilon:g}), "
                    f"so BN barely normalizes them{changed}",
                    f"{advice.epsilon(ctx)}, or scale the inputs up", layers=[bn.name],
                    channels={bn.name: tiny.tolist()},
                    evidence={"epsilon": float(bn.epsilon), "median_variance": float(np.median(p["moving_variance"])),
                              "lower_epsilon": effect})]


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
