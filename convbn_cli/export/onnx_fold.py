"""`convbn export MODEL.onnx --format onnx --fold-bn`: every BN node that can be folded into the Conv, Gemm or
MatMul before it (analysis/onnx_graph.fold_target's rules) is folded, the rest kept, and the result is checked
with onnxruntime against the original (logits within MAX_LOGIT_DIFF) before it is written.

A BN node is y = s * (x - mean) + beta with s = gamma / sqrt(var + epsilon), per channel. A Conv's weight
(out, in, kh, kw) and a Gemm's (out, in with transB, else in, out) or MatMul's (in, out) scale along their output
channels by s, and the bias becomes s * (bias - mean) + beta; MatMul has no bias, so the BN node becomes an Add
of it. Pools and reshapes in between stay where they are: a per-channel factor and offset pass through them
(a max-pool only for a positive factor, which fold_target checks).

A BN node exported in training mode (training_mode=1) is written in inference mode: the graph as exported
normalizes with each batch's own statistics, which no folded layer can do.

Before folding, the "only works in training mode" trap: a model whose accuracy with each batch's own statistics
beats its running statistics' has stale statistics, and folding would bake them in; export refuses and names
recalibrate.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from ..analysis.findings import MATERIAL_GAP
from ..analysis.onnx_graph import attr, fold_target, open_onnx, to_inference_mode
from ..analysis.onnx_measure import Runner, inputs_of, onnx_data, score
from ..errors import ConvbnError
from ..files import remove_stale_temporaries, staged
from ..formats import runtime
from ..formats.catalog import file_name
from .output import check_output

MAX_LOGIT_DIFF = 1e-4
STALE_BATCHES = 8  # batches of 128 the running and batch statistics' accuracies are compared on before folding


class ExportError(ConvbnError):
    exit_code = 1  # not the user's input: the exported model does not reproduce the original


def _scale_shift(bn):
    s = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    return s, bn.beta.numpy() - bn.moving_mean.numpy() * s


def _fold_one(g, inits: dict, bn, node, prev) -> None:
    """Fold BN `node` (of layer `bn`) into `prev` in graph `g`: new weight and bias initializers, BN node removed
    (or, after a MatMul, turned into an Add of the bias)."""
    from onnx import helper, numpy_helper

    s, shift = _scale_shift(bn)
    w = inits[prev.input[1]].astype(np.float64)
    if prev.op_type == "Conv":
        w = w * s.reshape(-1, *([1] * (w.ndim - 1)))
    elif prev.op_type == "Gemm" and attr(prev, "transB", 0):
        w = w * s[:, None]
    else:
        w = w * s[None, :]
    dtype = inits[prev.input[1]].dtype
    g.initializer.append(numpy_helper.from_array(w.astype(dtype), prev.input[1] + "__folded"))
    prev.input[1] = prev.input[1] + "__folded"
    old = prev.input[2] if len(prev.input) > 2 and prev.input[2] else None
    if prev.op_type == "Gemm" and old is not None and attr(prev, "beta", 1.0) == 0:
        old = None
    bias = np.zeros_like(s) if old is None else inits[old].astype(np.float64).reshape(-1)
    if prev.op_type == "Gemm" and old is not None:
        bias = bias * attr(prev, "beta", 1.0)
    new_bias = (s * bias + shift).astype(dtype)
    name = (prev.output[0] + "__folded_bias")
    g.initializer.append(numpy_helper.from_array(new_bias, name))
    index = list(g.node).index(node)
    if prev.op_type == "MatMul":
        g.node.remove(node)
        g.node.insert(index, helper.make_node("Add", [node.input[0], name], [node.output[0]], name=node.name))
        return
    if len(prev.input) > 2:
        prev.input[2] = name
    else:
        prev.input.append(name)
    if prev.op_type == "Gemm":
        for a in [a for a in prev.attribute if a.name == "beta"]:
            prev.attribute.remove(a)
    # the BN's output is now what its input was: the consumers of the output read the input instead
    g.node.remove(node)
    out_names = {o.name for o in g.output}
    if node.output[0] in out_names:
        g.node.insert(index, helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
    else:
        for n in g.node:
            for i, t in enumerate(n.input):
                if t == node.output[0]:
                    n.input[i] = node.input[0]


def folded_model(m):
    """(proto, folded layer names, kept {name: why}) of the model with every foldable BN layer folded."""
    p = copy.deepcopy(m.proto)
    g = p.graph
    nodes = {n.output[0]: n for n in g.node}
    folded, kept = [], {}
    for bn in m.bns:
        plan = fold_target(m, bn)
        if isinstance(plan, str):
            kept[bn.name] = plan
            continue
        for node, prev, _ in plan:
            _fold_one(g, m.inits, bn, nodes[node.output[0]], nodes[prev.output[0]])
        folded.append(bn.name)
    used = {t for n in g.node for t in n.input}
    unused = [t for t in g.initializer if t.name not in used]
    for t in unused:
        g.initializer.remove(t)
    return p, folded, kept


def export_onnx(path, fmt="onnx", *, fold_bn=False, output=None, force=False, data=None, scale=1 / 255, layout=None,
                check_images=256, log=lambda s: None) -> dict:
    """export.export's result for an ONNX model: the model with its BN folded (--fold-bn), checked with
    onnxruntime on --data's images, written beside it (NAME-folded.onnx) or to `output`."""
    path = Path(path)
    if fmt != "onnx":
        raise ConvbnError(f"{path}: an ONNX model exports as ONNX only (--format onnx)")
    if not fold_bn:
        raise ConvbnError(f"{path}: exporting an ONNX model to ONNX only folds its BN: add --fold-bn")
    out = Path(output) if output else path.with_name(file_name(f"{path.stem}-folded", "onnx"))
    out = check_output(out, "onnx", force)
    if out.exists() and out.resolve() == path.resolve():
        raise ConvbnError(f"--output {out}: is the model being exported; write the export to another path")
    m = open_onnx(path, layout)
    # a BN exported in training mode: folded (or kept) as inference runs it, with the running statistics that
    # _refuse_stale checks first; the export is checked against that inference-mode graph, and says so
    switched = to_inference_mode(m, log)
    data, scale = inputs_of(m, data, scale)  # the images the folded export is checked on
    d = onnx_data(m, data, max(STALE_BATCHES, -(-check_images // 128)), scale, log)
    runner = Runner(m)
    if m.bns:
        _refuse_stale(path, runner, d, data)
    proto, folded, kept = folded_model(m)
    x = d.images[:check_images]
    reference = runner.logits(x)
    remove_stale_temporaries(out.parent, out.name)
    with staged(out, before_replace=lambda: check_output(out, "onnx", force)) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        # read back as eval runs it: images (N, H, W, C), fed in the layout the graph takes
        nhwc = np.moveaxis(x, 1, -1) if m.layout == "NCHW" else x
        diff = float(np.abs(runtime.read("onnx", tmp, m.layout).predict(nhwc) - reference).max())
        if not diff < MAX_LOGIT_DIFF:
            raise ExportError(f"{out}: exported logits differ from the original by {diff:.3g} (at most "
                              f"{MAX_LOGIT_DIFF:g} allowed); nothing was written")
    return {"source": str(path), "path": str(out), "format": "onnx", "fold_bn": True, "folded": folded,
            "kept": list(kept), "kept_why": kept, "input": f"{m.layout} float32, as the original model takes them",
            "max_abs_logit_diff": diff, "checked_images": len(x), "inference_mode": switched}


def _refuse_stale(path, runner, d, data) -> None:
    """The "only works in training mode" trap: batch statistics beat the running ones by more than MATERIAL_GAP and
    by more than two standard errors of the difference on these images (a healthy model is never refused for the
    noise of a few images)."""
    batches = [(d.images[i:i + d.batch_size], d.labels[i:i + d.batch_size])
               for i in range(0, len(d.images) - d.batch_size + 1, d.batch_size)] or [(d.images, d.labels)]
    running = score(runner.logits, batches, d.num_classes)["accuracy"]
    batch = score(runner.batch_logits, batches, d.num_classes)["accuracy"]
    p, n = max(running, batch), sum(len(y) for _, y in batches)
    if batch - running > max(MATERIAL_GAP, 2 * np.sqrt(2 * max(p * (1 - p), 1e-4) / n)):
        raise ConvbnError(f"{path}: only works in training mode: {batch:.2%} with each batch's own statistics, "
                          f"{running:.2%} with its running ones; folding would bake the stale statistics in. First "
                          f"recompute them: convbn recalibrate {path} --data {data}, then fold the recalibrated "
                          "model")
