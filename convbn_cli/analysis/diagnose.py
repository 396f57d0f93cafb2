"""`convbn diagnose`: what is wrong with a model's batch normalization, measured on the model and on data.

Works on convbn's runs, on any Keras 3 model with BN layers (a `.keras` file trained anywhere) and on ONNX models
(a PyTorch export: onnx_doctor.py). Each check
looks for one problem that users of Keras, TensorFlow and PyTorch keep reporting, and each finding has a name, a
severity, the layers (and channels) concerned, the evidence in numbers, and one concrete fix in the target's own
terms. Here: the order the checks run in, and opening a target with its data; findings.py holds what the checks
share (Finding, Context, the measurements), model_checks.py the checks of the model alone, data_checks.py those
that run it on data, advice.py how a fix is phrased for where the model comes from.

Severity: "error" (inference is wrong, or will be), "warning" (likely to cost accuracy), "info" (worth knowing).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TargetError
from ..model import bn_layers
from ..runs.target import Target, onnx_file, opened
from .advice import fitting_decay
from .batch_checks import check_batch_dependence
from .data_checks import (
    check_accuracy_floor,
    check_dead_channels,
    check_inference_gap,
    check_input_scale,
    check_never_updated,
)
from .decay_checks import check_decay, check_decay_too_fast
from .findings import SEVERITIES, Context, Finding, run_checks
from .model_checks import (
    check_bn_axis,
    check_dtypes,
    check_few_values,
    check_frozen,
    check_redundant_bias,
    check_unfolded_export,
    check_values,
)
from .order_checks import check_layer_order
from .worker_checks import check_workers, same_layout

__all__ = ["CHECKS", "SEVERITIES", "Context", "Finding", "diagnose", "diagnose_model", "fitting_decay"] + [
    c.__name__ for c in (check_accuracy_floor, check_batch_dependence, check_bn_axis, check_dead_channels,
                         check_decay, check_decay_too_fast, check_dtypes,
                         check_few_values, check_frozen, check_inference_gap, check_input_scale, check_layer_order,
                         check_never_updated, check_redundant_bias, check_unfolded_export, check_values,
                         check_workers)]

# In this order: check_input_scale tells check_inference_gap (and check_accuracy_floor) whether stale-looking
# statistics are a scale problem; check_accuracy_floor comes after the checks of BN's own parameters, so that a
# model at chance through a dead or non-finite layer leads with that layer's finding; check_decay_too_fast after
# check_input_scale, whose mismatch makes any statistics look far from the data's.
CHECKS = (check_batch_dependence, check_never_updated, check_decay, check_bn_axis, check_input_scale,
          check_decay_too_fast, check_inference_gap, check_dead_channels, check_values, check_accuracy_floor,
          check_redundant_bias, check_dtypes, check_few_values, check_frozen, check_unfolded_export,
          check_layer_order, check_workers)
ONLY_WITH = {check_workers: lambda ctx: bool(ctx.workers)}  # checks that apply only to some targets


def diagnose_model(ctx: Context, passed: list | None = None) -> list:
    """Every check's findings for an opened model and its data, most severe first; the names of the checks that
    found nothing are appended to `passed`."""
    ctx.bns = bn_layers(ctx.model)
    return run_checks(ctx, CHECKS, ONLY_WITH, passed)


# --------------------------------------------------------------------------- opening a target with its data

def diagnose(target, *, which="best", data=None, batches=20, scale=1 / 255, layout=None, log=lambda m: None,
             workers=()) -> dict:
    """Diagnose the BN of a run directory, checkpoint, convbn export or any Keras 3 `.keras` model.

    Args:
        target: what `convbn eval` takes, or any .keras model with BN layers.
        which: a run directory's checkpoint ("best", "latest", "recalibrated", "ema" or a training step).
        data: for a model from elsewhere (required there): "mnist", "fashion_mnist", or an .npz path with `x`
            (N, H, W[, C]) and `y`; for convbn's own targets the run's dataset is used when None.
        batches: how many batches of images the data checks (and the in-memory precise BN) use.
        scale: the factor pixels are multiplied by for a model from elsewhere (1/255: pixels in [0, 1]).
        layout: an ONNX model's input layout ("NCHW" or "NHWC") where its graph does not say.
        workers: the other workers' checkpoints or models of one data-parallel training (`target` the first):
            compared with it (workers_disagree); each has the same BN layers and weights as `target`.

    Returns:
        {"target", "kind", "bn_layers", "images", "findings": [Finding, ...], "counts": {severity: n}, "workers"}.
    """
    files = [onnx_file(w) for w in [target, *workers]]
    if workers and any(f is None for f in files) and any(f is not None for f in files):
        raise TargetError("comparing workers (diagnose A B ...) takes ONNX models only or Keras models, checkpoints "
                          "and runs only, not both")
    if files[0] is not None:  # an ONNX model (PyTorch's, tf2onnx's): its graph's BN, measured with onnxruntime
        from .onnx_doctor import diagnose_onnx

        return diagnose_onnx(files[0], data=data, batches=batches, scale=scale, layout=layout, log=log,
                             workers=files[1:])
    t = opened(target, which)
    if not bn_layers(t.model):
        raise TargetError(f"{t.source}: the model has no BN layers to diagnose")
    others = [(str(w), opened(w, which).model) for w in workers]
    why = same_layout([t.model] + [m for _, m in others]) if others else None
    if why:
        raise TargetError(f"{', '.join([str(target), *map(str, workers)])}: not workers of one model: {why}")
    d = t.eval_data(batches, data_source=data, scale=scale, log=log, as_trained=True)
    n = batches * d.batch_size  # batches of the training size (a model from elsewhere: of 128)
    ctx = Context(t.model, d.num_classes, d.images[:n], d.labels[:n], d.batch_size, d.calibration, _steps(t),
                  t.config, t.kind, scale=None if t.config is not None else scale, workers=others,
                  target_name=str(target), training_calibration=d.as_trained)
    log(f"diagnosing {t.source}: {len(bn_layers(t.model))} BN layer(s), {len(ctx.images)} images; measuring with "
        "the moving statistics, each batch's own and an in-memory precise BN ...")
    passed = []
    findings = diagnose_model(ctx, passed)
    named = str(target) if not isinstance(target, Target) else str(t.run.path if t.kind == "checkpoint" else t.source)
    for f in findings:  # the fixes name the user's own target
        f.fix = f.fix.replace("TARGET", named)
    return {"target": t.source, "kind": t.kind, "bn_layers": [bn.name for bn in ctx.bns], "images": len(ctx.images),
            "findings": findings, "passed": passed, "workers": [name for name, _ in others],
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
