"""diagnose's new checks on ONNX models, under the Keras checks' names: batch_dependent_predictions (a BN exported in
training mode, or a "BN" written out of reductions over the batch), decay_too_fast (the nodes' momentum attribute,
ONNX's convention being Keras': the old average's weight), layer_order (from the graph) and workers_disagree
(`diagnose A.onnx B.onnx ...`). Each uses the format-free core the Keras check uses (batch_checks, decay_checks,
order_checks, worker_checks); what is ONNX here is how the graph is read and run.
"""

from __future__ import annotations

from . import advice, decay_checks
from .batch_checks import batch_dependence, dependence_finding
from .findings import Finding, evaluate_bn
from .onnx_graph import POOLS, RESHAPES, open_onnx
from .onnx_measure import score
from .order_checks import after_activation_note
from .worker_checks import views_differ, workers_finding

ACTIVATIONS = {"Relu", "LeakyRelu", "Elu", "Selu", "PRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish",
               "Softplus", "Gelu", "Mish"}
PASS = set(RESHAPES + POOLS) | {"Identity", "Cast"}


def check_batch_dependence(ctx) -> list:
    """batch_dependent_predictions: the graph as exported gives an image other logits in another batch. Where the
    culprits are BatchNormalization nodes in training mode, the accuracy with their running statistics (what the
    model gives once exported in eval mode) is measured beside the accuracy now."""
    images = ctx.images[:4 * ctx.batch_size]
    found = batch_dependence(ctx.runner.exported_logits, images, ctx.batch_size)
    if not found["depends"]:
        return []
    named = ctx.model.batch_mixing
    trained = [bn.name for bn in ctx.bns if bn.training_mode]
    now = score(ctx.runner.exported_logits, ctx.batches(), ctx.num_classes)["accuracy"]
    fixed = evaluate_bn(ctx, "moving")["accuracy"] if trained else None
    measured = (f" (measured here: {now:.2%} now, {fixed:.2%} with the running statistics the file holds)"
                if trained else "")
    where = (f"node(s) {', '.join(named)} normalize" if named else "something in the graph normalizes")
    modes = f" ({len(trained)} BatchNormalization node(s) with training_mode=1)" if trained else ""
    return [dependence_finding(found, f"{where} with each batch's own statistics{modes}",
                               advice.inference_mode(ctx) + measured, trained or named,
                               {"nodes": named, "training_mode_layers": trained, "accuracy_now": now,
                                "accuracy_with_running_statistics": fixed})]


def check_decay_too_fast(ctx) -> list:
    """decay_too_fast on the layers whose nodes carry a momentum attribute (ONNX: running = momentum * running +
    (1 - momentum) * batch, Keras' convention; PyTorch's momentum 0.1 exports as 0.9, a port the wrong way as 0.1).
    A node without one says nothing of its training: the check does not apply to it (ctx.not_applied says so)."""
    given = [bn for bn in ctx.bns if bn.momentum_given and not bn.training_mode]
    if len(given) < len(ctx.bns):
        ctx.not_applied["decay_too_fast"] = (
            f"{len(ctx.bns) - len(given)} of {len(ctx.bns)} BN layer(s) have no momentum attribute (or run in "
            "training mode): their decay is unknown, so decay_too_fast does not apply to them")
    if not given:
        return []
    every, ctx.bns = ctx.bns, given
    try:
        return decay_checks.check_decay_too_fast(ctx)
    finally:
        ctx.bns = every


# --------------------------------------------------------------------------- layer order

def _upstream(m, tensor, skip):
    """The first node above `tensor` that is not in `skip` (op types), or None."""
    node = m.producers.get(tensor)
    while node is not None and node.op_type in skip:
        node = m.producers.get(node.input[0])
    return node


def _dropout_before(m, node):
    """The Dropout node that feeds BN `node` through pass-through ops and at most one Conv/Gemm/MatMul."""
    linear, cur = 0, _upstream(m, node.input[0], PASS)
    while cur is not None and cur.op_type != "Dropout":
        if cur.op_type not in ("Conv", "Gemm", "MatMul") or linear:
            return None
        linear += 1
        cur = _upstream(m, cur.input[0], PASS)
    return cur


def _name(node) -> str:
    return node.name or node.output[0]


def graph_orders(m) -> dict:
    """{BN layer: {"after_activation", "before_activation", "dropout_before"}} (node names or None) from the graph."""
    out = {}
    for bn in m.bns:
        node = bn.nodes[0]
        prev = _upstream(m, node.input[0], PASS | {"Dropout"})
        after = m.consumers.get(node.output[0], [])
        drop = _dropout_before(m, node)
        out[bn.name] = {"after_activation": _name(prev) if prev is not None and prev.op_type in ACTIVATIONS else None,
                        "before_activation": _name(after[0]) if len(after) == 1 and after[0].op_type in ACTIVATIONS
                        else None,
                        "dropout_before": _name(drop) if drop is not None else None}
    return out


def check_layer_order(ctx) -> list:
    """layer_order (info), from the graph: BN after an activation (Relu before BatchNormalization), and Dropout
    feeding a BN. An inference export usually drops Dropout nodes (torch.onnx.export in eval mode, tf2onnx), so
    only what the graph still shows is reported; the variance shift is not measured on an ONNX graph."""
    found = {n: o for n, o in graph_orders(ctx.model).items() if o["after_activation"] or o["dropout_before"]}
    if not found:
        return []
    said = []
    after = [n for n, o in found.items() if o["after_activation"]]
    if after:
        said.append(after_activation_note(after))
    for name, o in found.items():
        if o["dropout_before"]:
            said.append(f"dropout {o['dropout_before']} feeds {name} (in training it widens what BN averages; the "
                        "shift is not measured on an ONNX graph)")
    return [Finding("layer_order", "info", "; ".join(said), "nothing required: a note on the order",
                    layers=list(found), evidence={"order": found, "dropout_nodes_in_graph": any(
                        n.op_type == "Dropout" for n in ctx.model.proto.graph.node)})]


# --------------------------------------------------------------------------- workers

def onnx_worker(m) -> dict:
    """compare_workers' view of one ONNX model: its BN layers' running statistics and every other initializer."""
    stats = {bn.name: (bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in m.bns}
    skip = {bn.names[k] for bn in m.bns for k in ("mean", "var")}
    return {"statistics": stats, "weights": {k: v for k, v in m.inits.items() if k not in skip}}


def open_workers(paths, layout=None) -> list:
    """[(name, OnnxModel)] of the other workers' files, each with the first's BN layers, weights and shapes."""
    return [(str(p), open_onnx(p, layout)) for p in paths]


def layout_differs(models) -> str | None:
    """Why the ONNX models cannot be workers of one training (another BN layer, initializer or shape), or None."""
    return views_differ([onnx_worker(m) for m in models], "initializers")


ONNX_WORDS = {"weights": "initializer(s)", "copies": "exports", "kept": "file",
              "same_step": "compare models exported at the same step, and check that the gradients are all-reduced "
                           "across workers (DDP in PyTorch)",
              "average": "average the workers' running means and variances into one model",
              "precise": lambda ctx, first: f"precise BN: convbn recalibrate {first} --data DATA"}


def check_workers(ctx) -> list:
    """workers_disagree for ONNX workers (ctx.workers: [(name, OnnxModel)]): worker_checks' finding, each worker's
    accuracy measured with its own statistics in the first's graph."""
    views = [onnx_worker(ctx.model)] + [onnx_worker(m) for _, m in ctx.workers]
    return workers_finding(ctx, views, ctx.accuracy_with, ONNX_WORDS)
