"""`convbn diagnose`'s checks that measure the model on data: BN statistics never updated, the gap between
moving and batch statistics, inputs on another scale, a model that does not fit the images, dead channels. Each
fix is measured before it is offered (recalibrate only where an in-memory precise BN helps) and phrased in the
target's own terms (advice.py)."""

from __future__ import annotations

import keras
import numpy as np

from ..model.graph import output_model
from ..present.thresholds import DEAD_GAMMA
from . import advice
from .decay_checks import decay_checked, start_left
from .findings import (
    MATERIAL_GAP,
    Finding,
    evaluate_bn,
    following_relu,
    helps,
    in_precise_bn,
    per_channel,
    precise_bn_accuracy,
)

SCALE_OFF = 10.0  # inputs this many times too large (or small) for the first BN layer: a scale mismatch
FIT_SHARE = 1 / 3  # a best accuracy below this share of the way from chance to every image right: no fit


def check_never_updated(ctx) -> list:
    """Moving mean exactly 0 and variance exactly 1 in a trained model: the update ops never ran (TF1's
    UPDATE_OPS, a custom loop calling the model without training=True, or a frozen layer)."""
    stuck = [bn.name for bn in ctx.bns
             if np.all(bn.moving_mean.numpy() == 0) and np.all(bn.moving_variance.numpy() == 1)]
    trained = any(np.any(bn.gamma.numpy() != 1) for bn in ctx.bns if bn.scale) or bool(ctx.steps)
    if not stuck or not trained:
        return []
    moving, precise = evaluate_bn(ctx, "moving")["accuracy"], precise_bn_accuracy(ctx)
    now = (f"; or recompute them now: {advice.recompute(ctx)} (measured here: {moving:.2%} -> {precise:.2%})"
           if helps(ctx, moving, precise) else "")
    return [Finding("moving_statistics_never_updated", "error",
                    f"{len(stuck)} BN layer(s) still hold their initial moving statistics (mean 0, variance 1) in a "
                    "trained model: inference normalizes with numbers that were never measured",
                    f"{advice.update_in_training(ctx)}{now}", layers=stuck,
                    evidence={"moving_mean": 0.0, "moving_variance": 1.0, "steps": ctx.steps,
                              "accuracy_moving": moving, "accuracy_after_precise_bn": precise})]


def _gap_fix(ctx, helpful: bool) -> tuple:
    """(fix, the decay evidence behind it) for an inference gap: recalibrate where precise BN helps, and then, for
    the next training, a decay only in the direction the measured lag points (advice.decay_direction) and, on a
    Keras model, only where the statistics it would leave with these weights measure as well as precise BN's."""
    if ctx.scale_mismatch:
        return "scale the inputs as in training first (input_scale_mismatch): the statistics only look stale", {}
    if not helpful:
        return ("keep the moving statistics: precise BN does not improve them here (the gap comes from normalizing "
                "small evaluation batches with their own statistics, or from layers meant to stay frozen)", {})
    # an ONNX node without a momentum attribute says nothing of the decay it was trained with: no decay advice
    decays = sorted({round(float(bn.momentum), 6) for bn in ctx.bns
                     if bn.trainable and getattr(bn, "momentum_given", True)})
    fix, basis = advice.recompute(ctx, measured=True), {"decays": decays, "steps": ctx.steps}
    if len(decays) != 1:  # layers averaging differently: no one direction to give
        return fix, basis
    decay, left = decays[0], start_left(ctx)
    direction = advice.decay_direction(decay, ctx.steps, left)
    basis.update(start_left=left, direction=direction)
    if direction is None:
        return fix, basis
    fitting = advice.fitting_decay(ctx.steps) if ctx.steps else None
    to = (fitting if fitting is not None and fitting < decay else None) if direction == "lower" else None
    # the decay measured: `to`, else a usual 0.9 (lower than a lagging one's, higher than a too short one's)
    checked = (decay_checked(ctx, to or advice.SHORT_AVERAGE, ctx.steps or 100)
               if isinstance(ctx.model, keras.Model) or hasattr(ctx, "accuracy_with") else None)
    basis["decay_checked"] = checked
    if checked is not None and not checked["ok"]:
        return fix, basis  # the decay would leave statistics no better: not offered
    said = advice.shorter_average(ctx, to, ctx.steps) if direction == "lower" else advice.longer_average(ctx, decay)
    return f"{fix}; so that it does not come back: {said}", basis


def check_inference_gap(ctx) -> list:
    """Accuracy with moving vs batch statistics on the same images, and how far each channel's moving statistics
    sit from the data's, in units of the data's standard deviation."""
    moving = evaluate_bn(ctx, "moving")
    batch = evaluate_bn(ctx, "batch")
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
    recal = precise_bn_accuracy(ctx)
    # A gap that precise BN does not close comes from evaluating with small batches' own statistics, not from
    # stale moving averages: worth knowing, not a fault.
    helpful = helps(ctx, moving["accuracy"], recal)
    severity = "error" if gap > 0.1 else "warning" if helpful else "info"
    fix, decay = _gap_fix(ctx, helpful)
    return [Finding("inference_training_gap", severity,
                    f"inference with the moving statistics reaches {moving['accuracy']:.2%}, with each batch's own "
                    f"statistics {batch['accuracy']:.2%}; precise BN would give {recal:.2%}",
                    fix,
                    layers=list(channels) or [bn.name for bn in ctx.bns], channels=channels,
                    evidence={"accuracy_moving": moving["accuracy"], "accuracy_batch": batch["accuracy"],
                              "loss_moving": moving["loss"], "loss_batch": batch["loss"],
                              "accuracy_after_precise_bn": recal, "layers": per_layer, **decay})]


def _exact_factor(factor, live, means) -> tuple:
    """(exact, noise): the clean factor (advice.clean_factor) that the measured `factor` stands for when one is within
    twice its noise, else None; and that noise: the spread (natural log, a robust standard deviation) of the
    per-channel factors, from the variance ratios `live` and the mean ratios `means` alike. Images other than the
    training ones move each channel differently, so the measured factor only comes near the preprocessing's."""
    logs = np.concatenate([0.5 * np.log(live), np.log(means[means > 0])])
    noise = float(1.4826 * np.median(np.abs(logs - np.median(logs))))
    return advice.clean_factor(factor, 2 * noise), noise


def check_input_scale(ctx) -> list:
    """A model from elsewhere fed pixels on another scale than it was trained on (0-255 against 0-1): the first BN
    layer's moving variance is off from what the data give by the same large factor in every channel (s^2, for
    inputs s times too small or too large), which precise BN would only hide. Names the --scale to use: the exact
    one (1/255, 1, ...) when the measurement is within its noise of it."""
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
    exact, noise = _exact_factor(factor, live, means)
    ctx.scale_mismatch = True
    suggested = ctx.suggested_scale = ctx.scale * (exact or factor)
    said = (f"{advice.fraction(exact)} times the ones given (measured {factor:.4g})" if exact else
            f"about {factor:.3g} times the ones given")
    return [Finding("input_scale_mismatch", "error",
                    f"{first.name}, the first BN layer, expects inputs {said} (moving variance {np.median(live):.3g} "
                    f"times the data's, alike in all {len(live)} channels): the images are not scaled as in training "
                    f"(--scale {ctx.scale:.4g} now)",
                    f"--scale {suggested:.9g}" + (" (raw pixels 0-255)" if abs(suggested - 1) < 0.2 else
                                                  " (pixels in [0, 1])" if abs(suggested * 255 - 1) < 0.2 else "")
                    + ", then diagnose again; recalibrating on wrongly scaled images would only hide this",
                    layers=[first.name], evidence={"variance_ratio_median": float(np.median(live)),
                                                   "variance_ratio_spread_decades": float(spread),
                                                   "factor_measured": factor, "factor_noise_log": noise,
                                                   "factor_exact": exact, "scale_given": ctx.scale,
                                                   "scale_suggested": suggested})]


def check_accuracy_floor(ctx) -> list:
    """A model whose accuracy is low whatever BN uses (moving statistics, each batch's own, precise BN), and about
    the same in every mode: at chance, or below a third of the way from chance to every image right (chance: the
    commonest class's share, at least 1 / the class count) with the modes within the measurement's noise of each
    other. These images do not fit the model (another dataset, preprocessing, --scale or labelling, or it never
    learned), and no BN verdict can be drawn from them, unless a BN layer's own parameters cut the signal."""
    labels = np.asarray(ctx.labels)
    if len(labels) == 0:
        return []
    chance = max(float(np.bincount(labels.astype(np.int64)).max()) / len(labels), 1 / max(ctx.num_classes, 1))
    n = max(evaluate_bn(ctx, "moving")["count"], 1)  # (whole batches of the images)
    margin = max(0.05, 2 * np.sqrt(chance * (1 - chance) / n))  # 5 points, or two standard errors of guessing
    floor = chance + FIT_SHARE * (1 - chance)
    modes = {"moving": evaluate_bn(ctx, "moving")["accuracy"], "batch": evaluate_bn(ctx, "batch")["accuracy"]}
    if max(modes.values()) > max(floor, chance + margin):
        return []
    modes["precise_bn"] = precise_bn_accuracy(ctx)
    best, spread = max(modes.values()), max(modes.values()) - min(modes.values())
    at_chance = best <= chance + margin
    # modes measured on the same images: within 5 points, or three standard errors of a difference, they agree
    allowed = max(0.05, 3 * np.sqrt(2 * max(best * (1 - best), 1e-4) / n))
    if not at_chance and (best >= floor or spread > allowed):
        return []
    return [_floor_finding(ctx, modes, at_chance, {
        "accuracy": modes, "chance": chance, "classes": ctx.num_classes, "fit_floor": floor, "spread": spread,
        "spread_allowed": allowed, "images": n})]


def _floor_finding(ctx, modes, at_chance, evidence) -> Finding:
    name = "accuracy_at_chance" if at_chance else "accuracy_low_in_every_bn_mode"
    level = "at chance" if at_chance else "far below a fitting model"
    said = (f"moving statistics {modes['moving']:.2%}, batch statistics {modes['batch']:.2%}, precise BN "
            f"{modes['precise_bn']:.2%}; chance {evidence['chance']:.2%}")
    cut = _cut_layers(ctx)
    if cut:  # the model's own BN parameters pass nothing on: a BN fault, whatever the data
        return Finding(name, "error",
                       f"the model is {level} on these images whatever BN uses ({said}), and BN layer(s) "
                       f"{', '.join(cut)} pass nothing of their input on ({'; '.join(cut.values())}): a BN fault "
                       "that explains it, not a sign of the wrong data",
                       f"fix {', '.join(cut)} first (their findings say how), then diagnose again", layers=list(cut),
                       evidence={**evidence, "explained_by": cut})
    first = (f"--scale {ctx.suggested_scale:.9g} first (input_scale_mismatch), then diagnose again; if it still does "
             "not fit, " if ctx.scale_mismatch else "")
    if ctx.scale is None:  # a convbn run or export: its own dataset, preprocessed by convbn
        check = (f"{first}check that the model learned its data (the run's curves and test accuracy: train longer, or "
                 "with another learning rate or a larger model) and, with --data, that the images are its dataset's, "
                 "with the labels numbered as in its training")
    else:
        check = (f"{first}check the data (the images it was trained on: another dataset's, as Fashion-MNIST for an "
                 "MNIST model, give this), their preprocessing (--scale: what its pixels 0-255 were multiplied by; "
                 "and the same normalization, colors and orientation), that the labels number the classes as in "
                 "its training, and that it was trained at all")
    agree = ("" if at_chance else
             f"; the modes {evidence['spread']:.1%} apart, within what {evidence['images']} images tell apart "
             f"({evidence['spread_allowed']:.1%}), and a model that fits gets well above {evidence['fit_floor']:.0%} "
             f"with {evidence['classes']} classes")
    return Finding(name, "error",
                   f"the model does not fit these images: it is {level} whatever BN uses ({said}{agree}): BN makes "
                   "no difference here, so this is not a BN verdict",
                   check, layers=[], evidence=evidence)


def _cut_layers(ctx) -> dict:
    """{BN layer: why} of the layers whose own parameters pass nothing of their input on, in every BN mode: gamma
    about 0 in every channel (only beta, a constant, comes out), or a gamma or beta that is not finite."""
    out = {}
    for bn in ctx.bns:
        gamma = bn.gamma.numpy() if bn.scale else None
        beta = bn.beta.numpy() if bn.center else None
        if any(a is not None and not np.isfinite(a).all() for a in (gamma, beta)):
            out[bn.name] = "a gamma or beta that is not finite"
        elif gamma is not None and np.all(np.abs(gamma) < DEAD_GAMMA):
            out[bn.name] = f"|gamma| below {DEAD_GAMMA:g} in all {len(gamma)} channels"
    return out


def check_dead_channels(ctx) -> list:
    """Channels that carry nothing: |gamma| near 0, or never positive after the ReLU that follows the BN. A channel
    is judged with the statistics precise BN gives when those differ materially from the moving ones: a channel
    "dead" only because stale moving statistics shift it below zero comes back after precise BN, and pruning it
    would do harm (it is reported as such, with no pruning advice). A layer dead in every channel is a fault, never
    something to prune (dead_bn_layer)."""
    stale = helps(ctx, evaluate_bn(ctx, "moving")["accuracy"], precise_bn_accuracy(ctx))
    now = _dead(ctx)
    settled = in_precise_bn(ctx, lambda: _dead(ctx)) if stale else now
    out = []
    for bn in ctx.bns:
        found, only_stale = settled.get(bn.name, {}), sorted(set(now.get(bn.name, {})) - set(settled.get(bn.name, {})))
        if found and len(found) == bn.moving_mean.shape[0]:
            out.append(_dead_layer(ctx, bn, found))
        elif found:
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
                                                        if ctx.scale_mismatch else advice.recompute(ctx)),
                               layers=[bn.name], channels={bn.name: only_stale}))
    return out


def _dead_layer(ctx, bn, found) -> Finding:
    """Every channel of `bn` carries nothing: the signal stops there. Pruning would remove the layer's path, so the
    fix is finding what silenced it."""
    reasons = {w: sum(v == w for v in found.values()) for w in dict.fromkeys(found.values())}
    why = ", ".join(f"{'|gamma| below ' + format(DEAD_GAMMA, 'g') if w == 'gamma' else w} in {k}"
                    for w, k in reasons.items())
    return Finding("dead_bn_layer", "error",
                   f"{bn.name}: all {len(found)} channels carry nothing ({why}): nothing of its input passes this "
                   "layer, so what follows it sees a constant",
                   "do not prune it: a whole layer that carries nothing is a fault, not spare capacity. Find what "
                   "silenced it and reload or retrain: weights not loaded or converted wrongly, a gamma initialized "
                   "to zero that never trained (a frozen layer), or a learning rate or weight decay that collapsed "
                   "it (convbn inspect-bn TARGET shows its gamma and beta)",
                   layers=[bn.name], channels={bn.name: sorted(found)},
                   evidence={"why": {str(c): w for c, w in sorted(found.items())}, "gamma_threshold": DEAD_GAMMA,
                             "accuracy_moving": evaluate_bn(ctx, "moving")["accuracy"]})


def _dead(ctx) -> dict:
    """{BN layer: {channel: why}} of the channels that carry nothing with the model's current statistics."""
    out = {}
    for bn in ctx.bns:
        found = {}
        if bn.scale:
            found.update({int(c): "gamma" for c in np.flatnonzero(np.abs(bn.gamma.numpy()) < DEAD_GAMMA)})
        relu = following_relu(ctx.model, bn)
        if relu is not None:
            upto = output_model(ctx.model, relu)
            peak = np.max([per_channel(upto(x, training=False), bn).max(0) for x, _ in ctx.batches()], axis=0)
            found.update({int(c): found.get(int(c), "never positive after ReLU") for c in np.flatnonzero(peak <= 0)})
        if found:
            out[bn.name] = found
    return out
