"""`convbn diagnose`'s checks of what a model does at inference with its batch: predictions that depend on which
images share the batch (batch_dependent_predictions), and whether a change of epsilon would change the outputs at
all (what epsilon_dominates is measured by).

The data-dependent cores (`batch_dependence`, `material_change`) take plain NumPy arrays and a predict callable, not a
Keras model, so that the same measurement serves any model format (ONNX through onnxruntime as well); the
`check_*` functions are the thin Keras adapters diagnose runs.
"""

from __future__ import annotations

from typing import Callable

import keras
import numpy as np

from ..model import Evaluator
from ..model.graph import input_model, output_model
from . import advice
from .findings import Finding, dataset_of, evaluate_bn

BATCH_TOLERANCE = 1e-3  # relative change of an image's logits between two batches beyond float rounding
MATERIAL_LOGITS = 0.05  # relative mean change of the logits that counts as a material change of the outputs
MATERIAL_ARGMAX = 0.01  # share of images whose predicted class changes that counts as material


def _relative_change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image (row): max |a - b| over the logits, relative to the row's largest |logit| (at least 1e-6)."""
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return np.abs(a - b).max(1) / np.maximum(np.abs(a).max(1), 1e-6)


def batch_dependence(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int,
                     seed: int = 0, tolerance: float = BATCH_TOLERANCE) -> dict:
    """Whether a model's inference output for an image depends on the other images of its batch.

    Contract (format-free): `predict(batch) -> logits` takes a NumPy batch of images (N, ...) exactly as the model
    takes them and returns an array whose first axis is N (scores per image). `images` holds at least two batches'
    worth of images, preferably; `batch_size` is the batch size inference is run with. Every image is predicted
    twice: in its batch of consecutive images, and in a batch of the same size with other partners (a fixed
    permutation of all images). An inference that uses only moving statistics gives the same logits up to float
    rounding.

    Returns: {"images": n, "batch_size", "median_relative_change", "max_relative_change" (per image: max |change| of
    its logits / its largest |logit|), "predictions_changed" (share of images whose argmax changed), "depends"
    (the median change above `tolerance`: not one noisy image, the batch as a whole)}.
    """
    images = np.asarray(images)
    batch_size = max(1, min(int(batch_size), len(images) // 2 or 1))
    n = (len(images) // batch_size) * batch_size or len(images)
    images = images[:n]
    order = np.random.default_rng(seed).permutation(n)
    # other partners for every image: the same batch size over a permutation of all the images, or half the batch
    # where the images make one batch only (a permutation of one batch keeps its partners)
    other = batch_size if n >= 2 * batch_size else max(1, batch_size // 2)

    def run(x, size):
        return np.concatenate([np.asarray(predict(x[i:i + size])) for i in range(0, len(x), size)])

    plain = run(images, batch_size)
    mixed = np.empty_like(plain)
    mixed[order] = run(images[order], other)
    change = _relative_change(plain, mixed)
    flips = float(np.mean(plain.reshape(n, -1).argmax(1) != mixed.reshape(n, -1).argmax(1)))
    median = float(np.median(change))
    return {"images": int(n), "batch_size": int(batch_size), "median_relative_change": median,
            "max_relative_change": float(change.max()), "predictions_changed": flips, "depends": median > tolerance}


def material_change(before: np.ndarray, after: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Whether two sets of logits for the same images (before and after a change to the model, such as a lower
    epsilon) differ materially.

    Contract (format-free): `before` and `after` are arrays (N, classes) of logits for the same N images, `labels`
    optionally their N integer classes. Material: the mean |change| of the logits above MATERIAL_LOGITS of their
    mean |value|, or the predicted class changed for more than MATERIAL_ARGMAX of the images.

    Returns: {"relative_change" (None where a logit is not finite), "predictions_changed", "accuracy_before",
    "accuracy_after" (None without labels), "material"}.
    """
    a, b = np.asarray(before, np.float64), np.asarray(after, np.float64)
    finite = np.isfinite(a).all() and np.isfinite(b).all()
    rel = float(np.abs(a - b).mean() / max(np.abs(a).mean(), 1e-12)) if finite else None  # None: not finite
    pa, pb = a.reshape(len(a), -1).argmax(1), b.reshape(len(b), -1).argmax(1)
    flips = float(np.mean(pa != pb)) if len(a) else 0.0
    acc = (None, None) if labels is None else (float(np.mean(pa == labels)), float(np.mean(pb == labels)))
    return {"relative_change": rel, "predictions_changed": flips, "accuracy_before": acc[0], "accuracy_after": acc[1],
            "material": bool(rel is None or rel > MATERIAL_LOGITS or flips > MATERIAL_ARGMAX)}


# --------------------------------------------------------------------------- Keras adapters

def keras_predict(model, training=False) -> Callable[[np.ndarray], np.ndarray]:
    """predict(batch) -> logits of a Keras model in inference mode (as `model.predict` would run it)."""
    return lambda x: keras.ops.convert_to_numpy(model(x, training=training))


def _culprits(ctx, images) -> list:
    """The BN layers whose input is the same whatever the batch but whose output is not: where batch statistics
    enter at inference (a layer called with training=True in the model's graph)."""
    out = []
    for bn in ctx.bns:
        ins, outs = input_model(ctx.model, bn), output_model(ctx.model, bn)
        if (not batch_dependence(lambda x, f=ins: f(x, training=False), images, ctx.batch_size)["depends"]
                and batch_dependence(lambda x, f=outs: f(x, training=False), images, ctx.batch_size)["depends"]):
            out.append(bn.name)
    return out


def _with_moving_statistics(ctx, names) -> float:
    """The accuracy when the layers `names` are made to use their moving statistics (for the duration, their call
    is Keras' own BatchNormalization.call with training=False, whatever a subclass or wrapper asked for): what the
    model gives once it is fixed."""
    layers = [bn for bn in ctx.bns if bn.name in names]
    for bn in layers:
        base = keras.layers.BatchNormalization.call if isinstance(bn, keras.layers.BatchNormalization) else None
        original = bn.call

        def call(inputs, *args, _bn=bn, _base=base, _call=original, **kwargs):
            kwargs["training"] = False
            return _base(_bn, inputs, *args, **kwargs) if _base is not None else _call(inputs, *args, **kwargs)

        bn.call = call
    try:
        return Evaluator(ctx.model, ctx.num_classes)(dataset_of(ctx))["accuracy"]
    finally:
        for bn in layers:
            del bn.call  # the class's call again


def check_batch_dependence(ctx) -> list:
    """Predictions at inference that change with the images that share the batch: BN layers that normalize with
    each batch's statistics at inference (a graph that calls BN with training=True, a model exported in training
    mode). The moving and batch accuracies then agree, so no other check sees it."""
    images = ctx.images[:4 * ctx.batch_size]
    found = batch_dependence(keras_predict(ctx.model), images, ctx.batch_size)
    if not found["depends"]:
        return []
    layers = _culprits(ctx, images[:2 * ctx.batch_size])  # two sub-models a layer: two batches are enough
    now = evaluate_bn(ctx, "moving")["accuracy"]
    fixed = _with_moving_statistics(ctx, layers) if layers else None
    measured = f" (measured here: {now:.2%} now, {fixed:.2%} with their moving statistics)" if layers else ""
    where = f"BN layer(s) {', '.join(layers)} normalize" if layers else "something in the model normalizes"
    return [dependence_finding(found, f"{where} with each batch's own statistics at inference",
                               advice.inference_mode(ctx) + measured, layers,
                               {"accuracy_now": now, "accuracy_with_moving_statistics": fixed})]


def dependence_finding(found: dict, where: str, fix: str, layers: list, evidence: dict) -> Finding:
    """batch_dependent_predictions' one wording for Keras and ONNX models: `found` is batch_dependence's result,
    `where` says what normalizes with the batch's statistics."""
    return Finding("batch_dependent_predictions", "error",
                   f"the same image gets different logits in different batches at inference (median change "
                   f"{found['median_relative_change']:.2%} of its largest logit, {found['predictions_changed']:.1%} "
                   f"of the predicted classes change): {where}, so a prediction depends on the other images and a "
                   "single image is normalized by itself", fix, layers=layers, evidence={**found, **evidence})


def epsilon_effect(ctx, bn, channels, factors=(1e1, 1e2)) -> dict:
    """material_change of the logits on (up to) two batches of the images when `bn`'s epsilon is divided by each of
    `factors` in turn in `channels` (the ones epsilon dominates) alone: {"epsilon", "by_factor": {"10x":
    material_change, ...}, "material": any of them}. Inference divides by sqrt(variance + epsilon), so a moving
    variance lowered by epsilon (1 - 1/f) in those channels is that division with epsilon / f, for the duration;
    the other channels, whatever their variance, are left as they are: what is measured is whether the channels
    the finding names matter. (A context of another format, such as ONNX, gives check_values the same dict through
    its own method ctx.epsilon_effect(bn, channels), built with material_change.)"""
    images, labels = ctx.images[:2 * ctx.batch_size], np.asarray(ctx.labels[:2 * ctx.batch_size])
    predict = keras_predict(ctx.model)

    def logits():
        return np.concatenate([predict(images[i:i + ctx.batch_size]) for i in range(0, len(images), ctx.batch_size)])

    saved, eps = bn.moving_variance.numpy(), float(bn.epsilon)
    before, by = logits(), {}
    try:
        for f in factors:
            var = saved.copy()
            var[channels] = saved[channels] - eps * (1 - 1 / f)
            bn.moving_variance.assign(var)
            by[f"{f:g}x"] = material_change(before, logits(), labels)
    finally:
        bn.moving_variance.assign(saved)
    return {"epsilon": eps, "channels": len(channels), "by_factor": by,
            "material": any(c["material"] for c in by.values())}
