"""`convbn diagnose`'s checks of the decay (Keras momentum) that averaged the moving statistics: too slow for the
steps taken (decay_too_slow: the statistics still hold their start), or too fast (decay_too_fast: the statistics
are little more than the last batches' noise, as when a PyTorch momentum of 0.1 is ported to Keras unchanged).

Both are measured before they are reported, and every fix is measured before it is offered: recalibrate only where
an in-memory precise BN helps, and a decay for the next training only where the statistics it would leave with these
weights (`ema_statistics`) measure as well as precise BN's. The data-dependent cores (`noise_equivalent`,
`ema_statistics`) take per-channel NumPy arrays, not a Keras model, so that other model formats (ONNX) use them too.
"""

from __future__ import annotations

import numpy as np

from ..model import Evaluator
from ..model.bn import channel_axis, restore_statistics, snapshot_statistics
from ..model.graph import input_model
from . import advice
from .findings import (
    Finding,
    dataset_of,
    evaluate_bn,
    helps,
    in_precise_bn,
    precise_bn_accuracy,
    precise_statistics,
    usable_channels,
)

SUB_BATCH = 8  # images per sub-batch when measuring how much one image's statistics vary
NOISE_IMAGES = 1024  # at most this many images for that measurement (128 sub-batches): enough for a variance
FAST_BATCHES = 3.0  # a decay whose average spans fewer batches, (1 + d) / (1 - d), than this: d below 0.5


def noise_equivalent(moving_mean, population_mean, population_var, subbatch_means, subbatch_size: int) -> dict:
    """How many images' average the moving means are as close to the population means as.

    Contract (format-free, one BN layer): `moving_mean`, `population_mean`, `population_var` are per-channel arrays
    (C,); `subbatch_means` (K, C), K >= 2, holds the per-channel means of K disjoint sub-batches of
    `subbatch_size` images each, measured with the same weights and the same normalization before the layer as
    the population statistics (which are the sub-batches' mean, or any estimate from at least as many images).
    One image's mean varies by sigma^2 = var(sub-batch means) * subbatch_size; an average over n images sits
    sigma^2 / n from the truth. The moving means' squared distance, pooled over the usable channels in units of
    their variance and less what the population estimate's own noise (sigma^2 / K*subbatch_size) explains, gives
    n. A decay-d average over batches of B images is worth about B (1 + d) / (1 - d) images.

    Returns: {"images_equivalent" (inf when the distance is within the estimate's noise), "channels" (used),
    "distance_rms_in_std" (the moving means' RMS distance in the data's standard deviations)}.
    """
    pv = np.asarray(population_var, np.float64)
    keep = usable_channels(pv)
    means = np.asarray(subbatch_means, np.float64)
    if keep.sum() == 0 or len(means) < 2:
        return {"images_equivalent": None, "channels": 0, "distance_rms_in_std": None}
    pv = pv[keep]
    sigma2 = means[:, keep].var(0, ddof=1) * subbatch_size
    err = (np.asarray(moving_mean, np.float64)[keep] - np.asarray(population_mean, np.float64)[keep]) ** 2
    own = np.sum(sigma2 / pv) / (len(means) * subbatch_size)  # what the population estimate's noise explains
    excess = float(np.sum(err / pv) - own)
    n = float(np.sum(sigma2 / pv) / excess) if excess > 0 else float("inf")
    return {"images_equivalent": n, "channels": int(keep.sum()),
            "distance_rms_in_std": float(np.sqrt(np.mean(err / pv)))}


def ema_statistics(population_mean, population_var, decay: float, steps: int, batch_mean_var=None, seed: int = 0):
    """(mean, variance) per channel that a moving average with `decay` (Keras' momentum) leaves after `steps`
    updates from its start (mean 0, variance 1), when every batch's statistics come from the population given.

    Contract (format-free): per-channel arrays (C,); `batch_mean_var` (C,), optional, the variance of one training
    batch's mean (sigma^2 / batch size): the noise the average keeps, (1 - d) / (1 + d) of it, drawn with `seed`.
    """
    w = float(decay) ** int(steps)  # the weight the start keeps
    pm, pv = np.asarray(population_mean, np.float64), np.asarray(population_var, np.float64)
    mean, var = (1 - w) * pm, (1 - w) * pv + w
    if batch_mean_var is not None:
        keep = (1 - decay) / (1 + decay) * (1 - w ** 2)
        mean = mean + np.random.default_rng(seed).normal(size=pm.shape) * np.sqrt(np.asarray(batch_mean_var) * keep)
    return mean, var


# --------------------------------------------------------------------------- Keras adapters

def start_left(ctx) -> float | None:
    """The share of their start (mean 0, variance 1) the moving statistics still hold, measured against the ones an
    in-memory precise BN computes: moving = (1 - w) precise + w start, fitted over the usable channels
    (findings.usable_channels) of the updating layers (means in the data's standard deviations, variances relative
    to (variance + 1)). None when precise BN's statistics sit too near the start for the fit to tell."""
    precise = precise_statistics(ctx)
    lag, span = [], []  # precise - moving, precise - start
    for bn in [bn for bn in ctx.bns if bn.trainable]:
        pm, pv = precise[bn.name]
        mm, mv = (np.asarray(v.numpy(), np.float64) for v in (bn.moving_mean, bn.moving_variance))
        keep = usable_channels(pv)  # a constant channel's distance over a tiny epsilon is rounding noise
        pm, pv, mm, mv = pm[keep], pv[keep], mm[keep], mv[keep]
        sd = np.sqrt(np.maximum(pv, 0) + bn.epsilon)
        lag += [(pm - mm) / sd, (pv - mv) / (np.abs(pv) + 1)]
        span += [pm / sd, (pv - 1) / (np.abs(pv) + 1)]
    lag, span = np.concatenate(lag or [[]]), np.concatenate(span or [[]])
    ok = np.isfinite(lag) & np.isfinite(span)
    lag, span = lag[ok], span[ok]
    if not len(span) or float(np.mean(span ** 2)) < 0.01:
        return None
    return float(np.clip(lag @ span / (span @ span), 0, 1))



def per_image_means(values: np.ndarray, axis: int) -> np.ndarray:
    """(N, C): each image's mean per channel of a layer's values (N, ...) whose channels are on `axis`."""
    values = np.moveaxis(np.asarray(values, np.float64), axis, -1)
    return values.reshape(len(values), -1, values.shape[-1]).mean(1)


def subbatch_means(ctx) -> dict:
    """{BN layer: (K, C) per-channel means of K sub-batches of SUB_BATCH images (of at most NOISE_IMAGES)}, each
    layer's input measured with precise BN's statistics in the layers before it (the weights are final; nothing
    written). The layers before it run on whole batches; the sub-batches are made of its per-image means. The
    images are the context's unaugmented ones: where training augments, one image's spread in training was
    somewhat larger, so the yardstick is a little short (the moving statistics may read a little noisier)."""
    def measure():
        out = {}
        images = ctx.images[:NOISE_IMAGES]
        n = (len(images) // SUB_BATCH) * SUB_BATCH
        for bn in ctx.bns:
            upstream = input_model(ctx.model, bn)
            means = [per_image_means(v, channel_axis(bn, len(v.shape))) for v in
                     (upstream(images[i:i + ctx.batch_size], training=False) for i in range(0, n, ctx.batch_size))]
            per_image = np.concatenate(means)[:n] if means else np.zeros((0, 1))
            out[bn.name] = per_image.reshape(-1, SUB_BATCH, per_image.shape[-1]).mean(1) if n >= 2 * SUB_BATCH \
                else np.zeros((0, 1))
        return out

    if "subbatch_means" not in ctx._measured:
        own = getattr(ctx, "subbatch_means", None)  # a context of another format (ONNX) measures them its own way
        ctx._measured["subbatch_means"] = own() if own is not None else in_precise_bn(ctx, measure, as_trained=True)
    return ctx._measured["subbatch_means"]


def measurable(ctx) -> bool:
    """Whether the context has data to measure the statistics with (a structural unit context has none)."""
    return not (isinstance(ctx.calibration, (list, tuple)) and not ctx.calibration) and len(ctx.images) >= 2


def noise_by_layer(ctx) -> dict:
    """{BN layer: noise_equivalent(...)} of the updating layers, against precise BN's statistics."""
    precise, subs = precise_statistics(ctx), subbatch_means(ctx)
    out = {}
    for bn in [bn for bn in ctx.bns if bn.trainable]:
        pm, pv = precise[bn.name]
        out[bn.name] = noise_equivalent(np.asarray(bn.moving_mean.numpy()), pm, pv, subs[bn.name], SUB_BATCH)
    return out


def _accuracy_with(ctx, stats: dict) -> float:
    """Accuracy with the moving statistics replaced by `stats` {layer: (mean, var)} for the duration."""
    own = getattr(ctx, "accuracy_with", None)  # a context of another format (ONNX) feeds them its own way
    if own is not None:
        return own(stats)
    saved = snapshot_statistics(ctx.model)
    try:
        for bn in ctx.bns:
            if bn.name in stats:
                bn.moving_mean.assign(stats[bn.name][0].astype(bn.moving_mean.dtype))
                bn.moving_variance.assign(stats[bn.name][1].astype(bn.moving_variance.dtype))
        return Evaluator(ctx.model, ctx.num_classes)(dataset_of(ctx))["accuracy"]
    finally:
        restore_statistics(saved)


def decay_checked(ctx, decay: float, steps: int) -> dict:
    """What a decay would give: the accuracy with the statistics a `decay` average over `steps` batches of the
    training size leaves with these weights (ema_statistics, its noise measured), beside precise BN's; "ok" when
    it is not measurably worse."""
    precise, subs = precise_statistics(ctx), subbatch_means(ctx)
    stats = {}
    for bn in [bn for bn in ctx.bns if bn.trainable]:
        pm, pv = precise[bn.name]
        noise = subs[bn.name].var(0, ddof=1) * SUB_BATCH / ctx.batch_size if len(subs[bn.name]) > 1 else None
        stats[bn.name] = ema_statistics(pm, pv, decay, steps, noise)
    # against the same batches' precise BN: a decay averages the training batches, so that is the most it can leave
    got, best = _accuracy_with(ctx, stats), precise_bn_accuracy(ctx, as_trained=True)
    return {"decay": decay, "steps": steps, "accuracy": got, "accuracy_precise_bn": best,
            "ok": not helps(ctx, got, best)}


def _recompute_first(ctx) -> tuple:
    """(fix so far, evidence): recalibrate where an in-memory precise BN measurably helps, with the numbers."""
    moving, precise = evaluate_bn(ctx, "moving")["accuracy"], precise_bn_accuracy(ctx)
    ev = {"accuracy_moving": moving, "accuracy_after_precise_bn": precise}
    if helps(ctx, moving, precise):
        return f"{advice.recompute(ctx, measured=True)} ({moving:.2%} -> {precise:.2%} measured here)", ev
    return (f"keep these statistics for now (precise BN measured no better here: {moving:.2%} -> {precise:.2%})",
            ev)


def _next_training(ctx, decay: float, steps: int | None, said: str) -> tuple:
    """("; for the next training: SAID (...)" or "", its check): advice `said` toward `decay` for the next training,
    offered only where the statistics `decay` would leave with these weights measure as well as precise BN's
    (decay_checked)."""
    check = decay_checked(ctx, decay, steps or 100)
    if not check["ok"]:
        return "", check
    return (f"; for the next training: {said} (the statistics it leaves with these weights measured "
            f"{check['accuracy']:.2%})"), check


def check_decay(ctx) -> list:
    """decay_too_slow: a decay whose averaging horizon 1/(1-decay) is long against the steps taken, whose moving
    statistics measurably still remember their start (or cost accuracy against an in-memory precise BN). A decay
    long on paper whose statistics measure fine is no fault: recalibrating such a model can only add noise."""
    if not ctx.steps:
        return []
    updating = [bn for bn in ctx.bns if bn.trainable]  # a frozen layer's statistics are not averaged at all
    out = []
    for decay in sorted({round(float(bn.momentum), 6) for bn in updating}):
        left = decay ** ctx.steps  # the weight the initial (0, 1) still has in the average
        if left > 0.01 or ctx.steps < 3 / max(1 - decay, 1e-9):
            names = [bn.name for bn in updating if round(float(bn.momentum), 6) == decay]
            out += _too_slow(ctx, decay, names, left)
    return out


def _too_slow(ctx, decay, names, left) -> list:
    fitting = advice.fitting_decay(ctx.steps)
    evidence = {"decay": decay, "keras_momentum": decay, "pytorch_momentum": 1 - decay,
                "horizon_steps": 1 / (1 - decay), "steps": ctx.steps, "initial_weight_left": left}
    said = (f"decay {decay:g} averages over ~{1 / (1 - decay):.0f} steps but training took {ctx.steps}: the "
            f"initial statistics still weigh {left:.1%}")
    if not measurable(ctx):  # the structure alone: no data to measure the statistics with
        later = f"; for the next training: {advice.shorter_average(ctx, fitting, ctx.steps)}" if fitting < decay else ""
        return [Finding("decay_too_slow", "warning", f"{said} and the rest lags behind the final weights",
                        f"run {advice.recompute(ctx)}{later}", layers=names, evidence=evidence)]
    measured = start_left(ctx)
    fix, ev = _recompute_first(ctx)
    evidence.update(ev, start_left_measured=measured)
    # judged against the training batches' own statistics: a gain that unaugmented ones add is no lag of the decay
    if not helps(ctx, ev["accuracy_moving"], precise_bn_accuracy(ctx, as_trained=True)) and (
            measured is None or measured <= advice.START_LEFT):
        return []  # the statistics measure as good as recomputed ones: nothing to fix
    if fitting < decay:
        later, evidence["decay_checked"] = _next_training(
            ctx, fitting, ctx.steps, advice.shorter_average(ctx, fitting, ctx.steps))
        fix += later
    share = f" (measured: {measured:.0%})" if measured is not None else ""
    return [Finding("decay_too_slow", "warning", f"{said}{share}, and the rest lags behind the final weights", fix,
                    layers=names, evidence=evidence)]


def averaged_batches(decay: float) -> float:
    """About how many batches a moving average with `decay` (Keras' momentum) is worth: (1 + d) / (1 - d)."""
    return (1 + decay) / max(1 - decay, 1e-9)


def check_decay_too_fast(ctx) -> list:
    """decay_too_fast: layers whose decay averages fewer than FAST_BATCHES batches (Keras momentum below 0.5) and
    whose moving means measurably sit farther from the data's (precise BN's) than the average of the batches the
    decay fitting the steps spans would (noise_equivalent), without lagging from their start: a PyTorch momentum
    (0.1, the newest batch's weight) ported to Keras unchanged, where Keras' momentum is the old average's weight.
    The statistics are then little more than the last batches' noise. (Measured distance alone does not tell a
    decay too fast: weights that moved while training leave any average some way off; the decay says which.)"""
    if not measurable(ctx) or ctx.scale_mismatch:
        return []
    short = [bn for bn in ctx.bns if bn.trainable and averaged_batches(float(bn.momentum)) < FAST_BATCHES]
    if not short:
        return []
    target = max(advice.fitting_decay(ctx.steps), advice.SHORT_AVERAGE) if ctx.steps else advice.SHORT_AVERAGE
    noise = noise_by_layer(ctx)
    fast = {bn.name: noise[bn.name] for bn in short if noise[bn.name]["images_equivalent"] is not None
            and noise[bn.name]["images_equivalent"] / ctx.batch_size < averaged_batches(target)}
    lag = start_left(ctx) if fast else None
    if not fast or (lag is not None and lag > advice.START_LEFT):
        return []  # a lagging average is far from the data for another reason (decay_too_slow, the gap)
    decay = min(float(bn.momentum) for bn in short if bn.name in fast)
    images = min(r["images_equivalent"] for r in fast.values())
    batches = images / ctx.batch_size
    fix, ev = _recompute_first(ctx)
    later, check = _next_training(ctx, target, ctx.steps, advice.longer_average(ctx, decay))
    return [Finding("decay_too_fast", "warning",
                    f"{', '.join(fast)}: decay {decay:g} (Keras momentum) averages ~{averaged_batches(decay):.2g} "
                    f"batches, and the moving means sit as far from the data's as the average of ~{images:.0f} images "
                    f"(~{batches:.2g} batch(es) of {ctx.batch_size}) would, where decay {target:g} would average ~"
                    f"{averaged_batches(target):.0f} batches: "
                    "the statistics are the last batches' noise (a PyTorch momentum ported to Keras unchanged is the "
                    "usual cause: Keras' momentum is 1 - PyTorch's)",
                    fix + later, layers=list(fast),
                    evidence={"decay": decay, "keras_momentum": decay, "pytorch_momentum": 1 - decay,
                              "batches_equivalent": batches, "batch_size": ctx.batch_size, "fitting_decay": target,
                              "layers": fast, "start_left": lag, "decay_checked": check, **ev})]
