"""`convbn diagnose A B ...`: the workers of one data-parallel training, one checkpoint or model each, compared
(workers_disagree).

In data-parallel training every worker holds the same weights (their gradients are all-reduced), but a BN layer
that is not synchronized averages its moving statistics over its own worker's batches only: each worker's
checkpoint then carries different statistics, and which one is kept decides the model's accuracy. Weights that
differ mean the checkpoints are not of one model (different steps, or gradients that were never all-reduced).

The core (`compare_workers`) takes per-worker NumPy arrays, so that other model formats (ONNX) use it too; the rest
is the Keras adapter.
"""

from __future__ import annotations

import numpy as np

from ..model import Evaluator
from ..model.bn import bn_layers, restore_statistics, snapshot_statistics
from . import advice
from .findings import Finding, dataset_of, helps, precise_bn_accuracy

WEIGHTS_APART = 1e-5  # relative difference of a weight across workers beyond a checkpoint's float round trip
STATS_APART = 0.25  # moving means this many of the data's standard deviations apart across workers
VARIANCE_APART = 1.5  # moving variances this many times apart across workers


def _finite(value) -> float | None:
    """A float for the evidence (JSON), None where it is not finite (a variance of 0 or below in some worker)."""
    return float(value) if np.isfinite(value) else None


def compare_workers(workers: list) -> dict:
    """How the workers' BN statistics and weights differ.

    Contract (format-free): `workers` holds one dict per worker (at least two, the first the reference), each
    {"statistics": {BN layer: (moving mean (C,), moving variance (C,))}, "weights": {name: array}}, with the same
    layer names, weight names and shapes in every worker. Means are compared in units of the square root of the
    workers' mean moving variance (plus 1e-12), variances as the ratio of the largest to the smallest.

    Returns: {"weights_differ": {name: max relative difference} beyond WEIGHTS_APART, "weights_max_relative":
    float, "statistics": {layer: {"max_mean_distance_in_std", "max_variance_ratio" (None where not finite),
    "channels": [apart]}},
    "statistics_differ": [layers with a channel beyond STATS_APART or VARIANCE_APART]}.
    """
    ref = workers[0]
    weights = {}
    for name, w0 in ref["weights"].items():
        w0 = np.asarray(w0, np.float64)
        diff = max(float(np.abs(np.asarray(w["weights"][name], np.float64) - w0).max(initial=0)) for w in workers[1:])
        weights[name] = diff / max(float(np.abs(w0).max(initial=0)), 1e-12)
    stats, apart = {}, []
    for layer in ref["statistics"]:
        means = np.stack([np.asarray(w["statistics"][layer][0], np.float64) for w in workers])
        variances = np.stack([np.asarray(w["statistics"][layer][1], np.float64) for w in workers])
        sd = np.sqrt(np.maximum(variances.mean(0), 0) + 1e-12)
        distance = (means.max(0) - means.min(0)) / sd
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(variances.min(0) > 0, variances.max(0) / variances.min(0), np.inf)
        far = np.flatnonzero((distance > STATS_APART) | (ratio > VARIANCE_APART) | ~np.isfinite(distance))
        stats[layer] = {"max_mean_distance_in_std": _finite(np.nanmax(distance, initial=0)),
                        "max_variance_ratio": _finite(np.nanmax(ratio, initial=1)), "channels": far.tolist()}
        if len(far):
            apart.append(layer)
    return {"weights_differ": {k: v for k, v in weights.items() if v > WEIGHTS_APART},
            "weights_max_relative": max(weights.values(), default=0.0), "statistics": stats,
            "statistics_differ": apart}


# --------------------------------------------------------------------------- Keras adapters

def keras_worker(model) -> dict:
    """compare_workers' view of one Keras model: its BN statistics and every other variable, by path."""
    stats = {bn.name: (bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in bn_layers(model)}
    skip = {id(v) for bn in bn_layers(model) for v in (bn.moving_mean, bn.moving_variance)}
    return {"statistics": stats, "weights": {v.path: v.numpy() for v in model.weights if id(v) not in skip}}


def same_layout(models: list) -> str | None:
    """Why the Keras models cannot be workers of one training (another BN layer, weight or shape), or None."""
    return views_differ([keras_worker(m) for m in models])


def views_differ(views: list, weights: str = "weights") -> str | None:
    """Why the workers' views (compare_workers' contract) cannot be of one training: another BN layer, weight or
    shape than the first's; None where they can. `weights`: what the format calls them."""
    for i, v in enumerate(views[1:], 1):
        for part, what in (("statistics", "BN layers"), ("weights", weights)):
            a = {k: np.shape(x[0] if part == "statistics" else x) for k, x in views[0][part].items()}
            b = {k: np.shape(x[0] if part == "statistics" else x) for k, x in v[part].items()}
            if a != b:
                odd = sorted(set(a) ^ set(b)) or sorted(k for k in a if a[k] != b[k])
                return f"worker {i + 1} has other {what} than the first ({', '.join(odd[:3])})"
    return None


def _accuracy_with_statistics(ctx, stats: dict) -> float:
    saved = snapshot_statistics(ctx.model)
    try:
        for bn in ctx.bns:
            bn.moving_mean.assign(np.asarray(stats[bn.name][0], np.float32))
            bn.moving_variance.assign(np.asarray(stats[bn.name][1], np.float32))
        return Evaluator(ctx.model, ctx.num_classes)(dataset_of(ctx))["accuracy"]
    finally:
        restore_statistics(saved)


KERAS_WORDS = {"weights": "variable(s)", "copies": "checkpoints", "kept": "checkpoint",
               "same_step": "compare checkpoints written at the same step, and check that the gradients are "
                            "all-reduced across workers (a distribution strategy, or DDP in PyTorch)",
               "average": "average the workers' moving means and variances into one checkpoint",
               "precise": lambda ctx, first: f"{advice.recompute(ctx, measured=True)} on the first worker's checkpoint"}


def check_workers(ctx) -> list:
    """workers_disagree: the first target against the other workers (ctx.workers: [(name, model)])."""
    views = [keras_worker(ctx.model)] + [keras_worker(m) for _, m in ctx.workers]
    return workers_finding(ctx, views, lambda stats: _accuracy_with_statistics(ctx, stats), KERAS_WORDS)


def workers_finding(ctx, views: list, accuracy_with, words: dict) -> list:
    """workers_disagree for any format: `views` (compare_workers' contract, ctx.model's first, then ctx.workers'),
    `accuracy_with` (statistics -> accuracy of ctx.model with them), `words` (what the format calls its parts).
    Weights that differ are an error (not one model); BN statistics that differ a warning, with each worker's
    accuracy with its own statistics and the measured fix: the averaged statistics or a precise BN, whichever
    measures better."""
    found = compare_workers(views)
    if not found["weights_differ"] and not found["statistics_differ"]:
        return []
    names = [ctx.target_name or "worker 1"] + [n for n, _ in ctx.workers]
    accuracy = {name: accuracy_with(v["statistics"]) for name, v in zip(names, views)}
    evidence = {**found, "workers": names, "accuracy_by_worker": accuracy}
    if found["weights_differ"]:
        top = sorted(found["weights_differ"], key=found["weights_differ"].get, reverse=True)[:3]
        return [Finding("workers_disagree", "error",
                        f"the workers' weights differ ({len(found['weights_differ'])} {words['weights']}, up to "
                        f"{found['weights_max_relative']:.2g} relative: {', '.join(top)}): these are not "
                        f"{words['copies']} of one model at one step", words["same_step"], layers=[],
                        evidence=evidence)]
    average = {layer: tuple(np.mean([np.asarray(v["statistics"][layer][k], np.float64) for v in views], axis=0)
                            for k in (0, 1)) for layer in found["statistics"]}
    averaged, precise = accuracy_with(average), precise_bn_accuracy(ctx)
    worst, best = min(accuracy.values()), max(accuracy.values())
    evidence.update(accuracy_averaged_statistics=averaged, accuracy_after_precise_bn=precise)
    options = {"precise BN": precise, "the workers' averaged statistics": averaged}
    choice = max(options, key=options.get)
    fix = words["precise"](ctx, names[0]) if choice == "precise BN" else words["average"]
    fix += (f" (measured: {options[choice]:.2%}, the workers {worst:.2%} to {best:.2%}); in training, "
            f"{advice.synchronized(ctx)}")
    severity = "warning" if helps(ctx, worst, best) or helps(ctx, worst, options[choice]) else "info"
    layers = found["statistics_differ"]
    far = max(np.inf if (d := found["statistics"][n]["max_mean_distance_in_std"]) is None else d for n in layers)
    return [Finding("workers_disagree", severity,
                    f"{len(names)} workers share their weights but their BN statistics differ in {len(layers)} "
                    f"layer(s) (means up to {far:.2f} standard deviations apart): each averaged its own worker's "
                    f"batches (BN not synchronized), so which {words['kept']} is kept decides the accuracy", fix,
                    layers=layers, channels={n: found["statistics"][n]["channels"] for n in layers},
                    evidence=evidence)]
