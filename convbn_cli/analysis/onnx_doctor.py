"""`convbn diagnose`, `inspect-bn` and `recalibrate` on an ONNX model (`MODEL.onnx --data ...`): a PyTorch model
exported with torch.onnx.export, or a Keras one converted with tf2onnx.

The checks are the Keras ones, under the same names: those that read BN's parameters and the measurements
(never updated, inference gap, input scale, accuracy floor, non-finite values, epsilon) run as they are on the
ONNX BN layers (onnx_graph.OnnxBn reads like a Keras BN layer, onnx_measure.OnnxContext measures like
findings.Context); those that look at the graph (axis, dead channels after a ReLU, a bias before BN, dtypes, a
BN left unfolded) are written here for ONNX's graph. The fixes are said in the model's own framework's terms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config.schema import PRECISE_BN_BATCHES
from ..errors import ConvbnError, TargetError
from ..files import remove_stale_temporaries, staged
from ..formats.catalog import file_name
from ..formats.output import check_output
from ..present.thresholds import DEAD_GAMMA
from . import advice
from .data_checks import check_accuracy_floor, check_inference_gap, check_input_scale, check_never_updated
from .findings import SEVERITIES, Finding, evaluate_bn, helps, precise_bn_accuracy, run_checks
from .model_checks import check_values
from .onnx_checks import (
    check_batch_dependence,
    check_decay_too_fast,
    check_layer_order,
    check_workers,
    layout_differs,
    open_workers,
)
from .onnx_graph import (
    bias_of,
    channel_axis,
    fold_target,
    open_onnx,
    producer_chain,
    to_inference_mode,
    with_statistics,
)
from .onnx_measure import OnnxContext, Runner, inputs_of, onnx_data, precise_bn, score


def check_bn_axis(ctx) -> list:
    """A BatchNormalization (which always normalizes axis 1) over a tensor whose feature channels are on another
    axis: after a Transpose to NHWC, it normalizes each image row instead of each feature map."""
    out = []
    for bn in ctx.bns:
        for node in bn.nodes:
            axis = channel_axis(ctx.model, node.input[0])
            if axis is None or axis == 1:
                continue
            out.append(Finding(
                "bn_wrong_axis", "error",
                f"{bn.name} normalizes axis 1 ({bn.channels} values) of a tensor whose feature channels are on axis "
                f"{axis}: it learns one scale and shift per row or position, not per feature map",
                "normalize the channel axis: BatchNorm over the conv's output as it is (NCHW), not after a "
                "Transpose (in Keras: BatchNormalization(axis=-1) after a channels_last conv)", layers=[bn.name],
                evidence={"bn_axis": 1, "channel_axis": axis, "input_shape": list(ctx.model.shapes.get(node.input[0])
                                                                                  or [])}))
            break
    return out


def _dead(ctx, precise: bool) -> dict:
    """{BN layer: {channel: why}}: |gamma| near 0, or never positive where a ReLU alone takes the BN's output."""
    peaks, out = ctx.peaks(precise), {}
    for bn in ctx.bns:
        found = {int(c): "gamma" for c in np.flatnonzero(np.abs(bn.gamma.numpy()) < DEAD_GAMMA)}
        relu = all([n.op_type for n in ctx.model.consumers.get(node.output[0], [])] == ["Relu"] for node in bn.nodes)
        if relu:
            found.update({int(c): found.get(int(c), "never positive after ReLU")
                          for c in np.flatnonzero(peaks[bn.name] <= 0)})
        if found:
            out[bn.name] = found
    return out


def check_dead_channels(ctx) -> list:
    """Channels that carry nothing (data_checks.check_dead_channels' rules, for an ONNX graph): judged with the
    precise statistics where those differ materially from the running ones."""
    stale = helps(ctx, evaluate_bn(ctx, "moving")["accuracy"], precise_bn_accuracy(ctx))
    now = _dead(ctx, False)
    settled = _dead(ctx, True) if stale else now
    out = []
    for bn in ctx.bns:
        found, only_stale = settled.get(bn.name, {}), sorted(set(now.get(bn.name, {})) - set(settled.get(bn.name, {})))
        why = {str(c): w for c, w in sorted(found.items())}
        if found and len(found) == bn.channels:
            out.append(Finding("dead_bn_layer", "error",
                               f"{bn.name}: all {len(found)} channels carry nothing: nothing of its input passes this "
                               "layer, so what follows it sees a constant",
                               "do not prune it: find what silenced it (weights not loaded or converted wrongly, a "
                               "scale initialized to zero, a learning rate or weight decay that collapsed it; convbn "
                               "inspect-bn TARGET shows its scale and bias)", layers=[bn.name],
                               channels={bn.name: sorted(found)},
                               evidence={"why": why, "gamma_threshold": DEAD_GAMMA,
                                         "accuracy_moving": evaluate_bn(ctx, "moving")["accuracy"]}))
        elif found:
            out.append(Finding("dead_channels", "warning",
                               f"{bn.name}: {len(found)} of {bn.channels} channel(s) carry nothing",
                               "prune them (convbn inspect-bn TARGET --rank), or train with less weight decay / a "
                               "lower learning rate", layers=[bn.name], channels={bn.name: sorted(found)},
                               evidence={"why": why, "gamma_threshold": DEAD_GAMMA}))
        if only_stale:
            out.append(Finding("channels_silenced_by_stale_statistics", "info",
                               f"{bn.name}: {len(only_stale)} channel(s) are never positive after the ReLU with the "
                               "running statistics but come back with precise BN's: a consequence of the stale "
                               "statistics, not dead channels", "do not prune them: " + _recompute(ctx),
                               layers=[bn.name], channels={bn.name: only_stale}))
    return out


def check_redundant_bias(ctx) -> list:
    """A bias in the Conv/Gemm right before a BN (through pooling and reshapes): BN's B already shifts each
    channel."""
    hits = {}
    for bn in ctx.bns:
        for node in bn.nodes:
            prev, _ = producer_chain(ctx.model, node)
            bias = bias_of(ctx.model, prev) if prev is not None else None
            if bias is not None:
                hits[prev.name or prev.output[0]] = int(ctx.model.inits[bias].size) if bias in ctx.model.inits else 0
    if not hits:
        return []
    return [Finding("redundant_bias_before_bn", "info",
                    f"{len(hits)} layer(s) before a BN have a bias ({sum(hits.values())} wasted parameters)",
                    "bias=False on those layers (nn.Conv2d(..., bias=False); in Keras use_bias=False)",
                    layers=list(hits), evidence={"bias_parameters": hits})]


def check_dtypes(ctx) -> list:
    """BN statistics stored below float32 (float16/bfloat16 lose them)."""
    low = {bn.name: [bn.dtype] for bn in ctx.bns if bn.dtype not in ("float32", "float64")}
    if not low:
        return []
    return [Finding("bn_variables_not_float32", "error",
                    f"{len(low)} BN layer(s) keep their statistics in "
                    + ", ".join(sorted({v[0] for v in low.values()})),
                    "keep BN's parameters and statistics float32 (export in float32, then convert the rest)",
                    layers=list(low), evidence={"dtypes": low})]


def check_unfolded_export(ctx) -> list:
    """BN nodes left in an inference graph although each could fold into the Conv/Gemm before it."""
    foldable = [bn.name for bn in ctx.bns if not isinstance(fold_target(ctx.model, bn), str)]
    if not foldable:
        return []
    return [Finding("bn_not_folded", "info",
                    f"{len(foldable)} BN layer(s) follow a Conv/Gemm and could be folded into it",
                    "convbn export TARGET --format onnx --fold-bn --data DATA (one op fewer per block, same outputs)",
                    layers=foldable)]


def _recompute(ctx) -> str:
    here = "convbn recalibrate TARGET --data DATA writes MODEL-recalibrated.onnx beside it"
    return here if advice.origin(ctx) != "pytorch" else f"{advice.recompute(ctx)}; for this file: {here}"


# In diagnose.py's order (see there): the scale check before the gap, the floor after BN's own parameters.
CHECKS = (check_batch_dependence, check_never_updated, check_bn_axis, check_input_scale, check_decay_too_fast,
          check_inference_gap, check_dead_channels, check_values, check_accuracy_floor, check_redundant_bias,
          check_dtypes, check_unfolded_export, check_layer_order, check_workers)
ONLY_WITH = {check_workers: lambda ctx: bool(ctx.workers)}


def no_bn(path, verb: str) -> str:
    """The one line for an ONNX file without BN nodes: most often an export whose BN was folded into the convs
    (convbn's own ONNX exports, tf2onnx's default), where the model it came from still has them."""
    return (f"{path}: the model has no BatchNormalization nodes to {verb} (BN folded into the convs at export "
            f"leaves none: {verb} the model it was exported from, e.g. its run directory)")


def context(path, data, batches: int, scale: float, layout=None, log=lambda s: None, workers=()) -> tuple:
    """(context, --data) of an ONNX model opened with --data's images, measured (each BN mode's accuracy, precise
    BN) once; `workers`: the other workers' files (diagnose A B ...), each with the same layers and weights."""
    m = open_onnx(path, layout)
    others = open_workers(workers, layout)
    why = layout_differs([m] + [w for _, w in others]) if others else None
    if why:
        raise TargetError(f"{', '.join([str(path), *map(str, workers)])}: not workers of one model: {why}")
    if not m.bns and not m.batch_mixing:  # a graph that normalizes with batch statistics is still diagnosed
        raise TargetError(no_bn(path, "diagnose"))
    data, scale = inputs_of(m, data, scale)
    log(f"diagnosing {path}: {len(m.bns)} BN layer(s); measuring with the running statistics, each batch's own and "
        "an in-memory precise BN (onnxruntime) ...")
    d = onnx_data(m, data, batches, scale, log)
    n = batches * d.batch_size
    ctx = OnnxContext(m, d.num_classes, d.images[:n], d.labels[:n], d.batch_size, d.calibration, None, None, "onnx",
                      scale=scale, framework=m.framework, bns=m.bns, runner=Runner(m), workers=others,
                      target_name=str(path))
    ctx.measure()
    return ctx, data


def diagnose_onnx(path, *, data=None, batches=20, scale=1 / 255, layout=None, log=lambda s: None,
                  workers=()) -> dict:
    """diagnose.diagnose's result for an ONNX model (the same keys, kind "onnx"; "not_applied": {check: why})."""
    ctx, data = context(path, data, batches, scale, layout, log, workers)
    passed = []
    findings = run_checks(ctx, CHECKS, ONLY_WITH, passed)
    for name, why in ctx.not_applied.items():  # said as well as kept in --json: a check that did not judge
        log(f"{name}: {why}")
    for f in findings:
        f.fix = f.fix.replace("TARGET", str(path)).replace("--data DATA", f"--data {data}")
    if ctx.framework == "pytorch":  # the PyTorch recipe fixes the model; this file is fixed by recalibrate
        for f in findings:
            if "reset_running_stats" in f.fix and "convbn recalibrate" not in f.fix:
                f.fix += f"; for this file: convbn recalibrate {path} --data {data}"
    return {"target": str(path), "kind": "onnx", "bn_layers": [bn.name for bn in ctx.bns], "images": len(ctx.images),
            "findings": findings, "passed": passed, "framework": ctx.framework, "layout": ctx.model.layout,
            "workers": [name for name, _ in ctx.workers], "not_applied": ctx.not_applied,
            "counts": {s: sum(f.severity == s for f in findings) for s in SEVERITIES}}


def parameters(bn) -> dict:
    """inspect-bn's per-layer dict (model/stats.py's keys) of an ONNX BN layer."""
    mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    gamma, beta = bn.gamma.numpy(), bn.beta.numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        s = gamma / np.sqrt(var + bn.epsilon)
    return {"channels": bn.channels, "epsilon": bn.epsilon, "decay": bn.momentum, "center": True,
            "scale_learned": True, "impl": "onnx", "moving_variance_rule": "biased", "gamma": gamma, "beta": beta,
            "moving_mean": mean, "moving_variance": var, "scale": s, "shift": beta - mean * s}


def inspect_onnx(path, layers=None, layout=None) -> dict:
    """inspection.inspect_bn's result for an ONNX model: {"checkpoint": path, "layers": {name: parameters}}."""
    m = open_onnx(path, layout or "NCHW")  # the layout changes nothing here: no images are fed
    params = {bn.name: parameters(bn) for bn in m.bns}
    if not params:
        raise TargetError(no_bn(path, "inspect"))
    if layers:
        unknown = [n for n in layers if n not in params]
        if unknown:
            raise TargetError(f"no BN layer named {', '.join(unknown)} (the model has: {', '.join(params)})")
        params = {n: params[n] for n in layers}
    return {"checkpoint": str(path), "layers": params}


def recalibrate_onnx(path, *, data=None, batches=PRECISE_BN_BATCHES, scale=1 / 255, layout=None, output=None,
                     force=False, log=lambda s: None) -> dict:
    """Precise BN for an ONNX model: a new .onnx (NAME-recalibrated.onnx beside it, or `output`) with every BN
    layer's running statistics recomputed, in inference mode (a BN exported in training mode would ignore them);
    recalibrate's result keys (before/after on --data's images), and `inference_mode`: the layers switched."""
    path = Path(path)
    if batches is None:  # --full: a run's one pass over its training split; --data has no such split
        raise ConvbnError(f"{path}: --full is for runs and Keras models; an ONNX model's statistics average "
                          "--batches batches of --data's images")
    out = Path(output) if output else path.with_name(file_name(f"{path.stem}-recalibrated", "onnx"))
    _check_output(path, out, force)
    m = open_onnx(path, layout)
    if not m.bns:
        raise TargetError(no_bn(path, "recalibrate"))
    switched = to_inference_mode(m, log)
    data, scale = inputs_of(m, data, scale)
    d = onnx_data(m, data, batches, scale, log)
    runner = Runner(m)
    batched = [(d.images[i:i + 500], d.labels[i:i + 500]) for i in range(0, len(d.images), 500)]
    before = score(runner.logits, batched, d.num_classes)
    stats = precise_bn(runner, d.calibration, log)
    after = score(lambda x: runner.logits(x, stats), batched, d.num_classes)
    remove_stale_temporaries(out.parent, out.name)
    # minutes of measuring lie between the first check and the write: a file that appeared meanwhile is refused
    with staged(out, before_replace=lambda: _check_output(path, out, force)) as tmp:
        tmp.write_bytes(with_statistics(m, stats).SerializeToString())
    changes = {bn.name: (bn.moving_mean.numpy(), bn.moving_variance.numpy(), *stats[bn.name]) for bn in m.bns}
    return {"source": str(path), "checkpoint": str(out), "split": d.split, "batches": len(d.calibration),
            "before": before, "after": after, "layers": changes, "source_step": None, "inference_mode": switched}


def _check_output(source: Path, out: Path, force: bool) -> None:
    """formats/output.check_output's rules (a .onnx name; an existing file replaced only with --force, never a
    symlink or a directory), and never the model being recalibrated."""
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise ConvbnError(f"--output {out}: is the model being recalibrated; write it to another path")
    check_output(out, "onnx", force)
