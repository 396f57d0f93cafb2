"""The BN of an ONNX model, read from its graph: every BatchNormalization node, the layer it belongs to (nodes that
share their statistics, as a PyTorch module called twice exports), the Conv/Gemm/MatMul that feeds it (through
Transpose, Reshape, Flatten and pooling), which axis of its input holds the feature channels, and the layout of
the model's input. Also the in-memory variants diagnose and recalibrate run: BN inputs and outputs exposed as
graph outputs, statistics fed as inputs, BN normalizing with each batch's own statistics.

ONNX's BatchNormalization always normalizes axis 1 of its input, with the running mean and variance as inputs
(initializers): y = scale * (x - mean) / sqrt(var + epsilon) + B. A PyTorch model exports NCHW throughout;
tf2onnx wraps a Keras model's NHWC tensors in Transposes, so the channel axis is traced through them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import TargetError
from ..formats import runtime

LINEAR = ("Conv", "Gemm", "MatMul")
POOLS = ("MaxPool", "AveragePool")
RESHAPES = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
SAME_LAYOUT = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Identity", "Dropout", "Add", "Sub", "Mul", "Div",
               "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Pad", "Cast",
               "Elu", "Selu", "HardSigmoid", "HardSwish", "Softplus", "Erf", "Neg", "Abs"}
LAYOUTS = ("NCHW", "NHWC")


class _Array:
    """A NumPy array that reads (`.numpy()`) and is changed (`.assign`) like a Keras variable: the checks diagnose
    shares with Keras models read BN parameters so, and change them for a measurement."""

    def __init__(self, a):
        self.a = np.asarray(a)

    def numpy(self):
        return self.a

    def assign(self, value):  # a measurement's change for its duration (the Runner feeds what is here)
        self.a = np.asarray(value)


@dataclass
class OnnxBn:
    """One BN layer: its BatchNormalization node(s) (several when they share their statistics), read like a Keras
    BatchNormalization layer (name, gamma, beta, moving_mean, moving_variance, epsilon, momentum) so that the
    checks of Keras models apply to it as they are."""

    name: str
    nodes: list
    names: dict  # {"gamma", "beta", "mean", "var"}: the initializers' names
    epsilon: float
    momentum: float  # ONNX's momentum is Keras' (the weight of the old average)
    gamma: _Array = None
    beta: _Array = None
    moving_mean: _Array = None
    moving_variance: _Array = None
    dtype: str = "float32"
    node_epsilon: float = 0.0  # the nodes' own epsilon; `epsilon` may be changed for a measurement (Runner.feeds)
    scale: bool = True
    center: bool = True
    trainable: bool = True
    axis: int = 1
    training_mode: bool = False  # exported in training mode: normalizes with each batch's statistics as it stands
    momentum_given: bool = False  # the node has a momentum attribute (else ONNX's default 0.9 says nothing)

    @property
    def channels(self) -> int:
        return int(self.moving_mean.numpy().shape[0])

    def set(self, arrays: dict) -> None:
        """The arrays of `arrays` ({"gamma"|"beta"|"mean"|"var": array}) as this layer's."""
        for key, attr in (("gamma", "gamma"), ("beta", "beta"), ("mean", "moving_mean"), ("var", "moving_variance")):
            if key in arrays:
                setattr(self, attr, _Array(np.asarray(arrays[key])))


@dataclass
class OnnxModel:
    """An ONNX model opened for BN work: its proto (external data inside), initializers, BN layers, input layout."""

    path: Path
    proto: object
    inits: dict  # {name: NumPy array}
    bns: list
    input: str
    output: str
    input_shape: tuple  # the graph's input dims after the batch
    layout: str  # "NCHW" or "NHWC": runtime.check_signature refuses an input that is not images (rank 4)
    classes: int
    framework: str  # "pytorch" or "keras": whose terms a fix is said in (analysis/advice.py)
    producers: dict = field(default_factory=dict)  # {tensor: node}
    consumers: dict = field(default_factory=dict)  # {tensor: [node, ...]}
    shapes: dict = field(default_factory=dict)  # {tensor: dims} from ONNX shape inference (None: unknown)
    about: dict = field(default_factory=dict)  # what a convbn export says about itself (formats/catalog.py)
    batch_mixing: list = field(default_factory=list)  # nodes that mix the batch's images (batch statistics)

    runner: object = None  # onnx_measure.Runner, once the model is measured

    def __call__(self, x, training=False):
        """Logits of images `x` with the BN layers' current parameters, as a Keras model is called: the checks
        shared with Keras models measure a change (a lower epsilon) so."""
        return self.runner.logits(x)

    @property
    def hwc(self) -> tuple:
        """(H, W, C) of the images it takes, whatever its layout."""
        s = self.input_shape
        return (s[1], s[2], s[0]) if self.layout == "NCHW" else tuple(s)


def open_onnx(path, layout: str | None = None) -> OnnxModel:
    """The ONNX model at `path` (read and checked by formats/runtime.py's reader) with its BN layers; `layout`
    (--layout) where the graph does not say whether its input is NCHW or NHWC."""
    from onnx import numpy_helper, shape_inference

    path = Path(path)
    proto, about = runtime.load_onnx(path)
    g = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    dims = tuple(d.dim_value or None for d in inputs[0].type.tensor_type.shape.dim)
    out_dims = tuple(d.dim_value or None for d in g.output[0].type.tensor_type.shape.dim)
    m = OnnxModel(path, proto, inits, [], inputs[0].name, g.output[0].name, dims[1:], "NCHW", int(out_dims[-1] or 0),
                  "keras")
    for node in g.node:
        for t in node.output:
            m.producers[t] = node
        for t in node.input:
            m.consumers.setdefault(t, []).append(node)
    try:
        inferred = shape_inference.infer_shapes(proto).graph
        for v in [*inferred.value_info, *inferred.input, *inferred.output]:
            if v.type.tensor_type.HasField("shape"):
                m.shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                         for d in v.type.tensor_type.shape.dim)
    except Exception:  # noqa: BLE001  shape inference is a help, not a need: the runtime's shapes serve instead
        pass
    m.layout = input_layout(m, layout)
    m.framework = _framework(proto, m.layout)
    m.bns = _bn_layers(m)
    m.batch_mixing = batch_mixing(m)
    m.about = about
    return m


def input_layout(m: OnnxModel, given: str | None) -> str:
    """NCHW or NHWC: runtime.onnx_layout's reading of the graph (what eval and predict feed it too), else `given`
    (--layout)."""
    found = runtime.onnx_layout(m.proto.graph, (None, *m.input_shape), given)
    if found is None:
        raise TargetError(f"{m.path}: the graph does not say whether its input {tuple(m.input_shape)} is NCHW or "
                          "NHWC; give --layout NCHW (PyTorch) or --layout NHWC (Keras, TensorFlow)")
    return found


def _framework(proto, layout: str) -> str:
    producer = (proto.producer_name or "").lower()
    if "torch" in producer:
        return "pytorch"
    if "tf2onnx" in producer or "keras" in producer or "tensorflow" in producer:
        return "keras"
    return "pytorch" if layout == "NCHW" else "keras"


def attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _bn_layers(m: OnnxModel) -> list:
    """Every BN layer, in the graph's (topological) order; nodes sharing their mean and variance are one layer."""
    layers = {}
    for node in m.proto.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        if len(node.input) < 5 or any(t not in m.inits for t in node.input[1:5]):
            raise TargetError(f"{m.path}: BatchNormalization {node.name or node.output[0]!r} takes its parameters "
                              "from the graph rather than initializers; convbn reads trained BN parameters only")
        key = tuple(node.input[3:5])
        if key in layers:
            layers[key].nodes.append(node)
            continue
        names = dict(zip(("gamma", "beta", "mean", "var"), node.input[1:5]))
        eps = float(attr(node, "epsilon", 1e-5))
        bn = OnnxBn(node.name or node.output[0], [node], names, eps, float(attr(node, "momentum", 0.9)),
                    dtype=str(m.inits[names["var"]].dtype), node_epsilon=eps,
                    training_mode=bool(attr(node, "training_mode", 0)),
                    momentum_given=any(a.name == "momentum" for a in node.attribute))
        bn.set({k: m.inits[v].astype(np.float64) for k, v in names.items()})
        layers[key] = bn
    return list(layers.values())


def batch_mixing(m: OnnxModel) -> list:
    """The names of the nodes through which one image's output depends on the other images of its batch: a
    BatchNormalization exported in training mode (each batch's own statistics), and a reduction over the batch axis
    (axis 0), as exporters write a BN that normalizes with its batch's mean and variance out of ReduceMean nodes."""
    out = []
    for node in m.proto.graph.node:
        if node.op_type == "BatchNormalization" and attr(node, "training_mode", 0):
            out.append(node.name or node.output[0])
        elif node.op_type.startswith("Reduce"):
            axes = attr(node, "axes", None)
            if axes is None and len(node.input) > 1 and node.input[1] in m.inits:
                axes = m.inits[node.input[1]].tolist()
            rank = len(m.shapes.get(node.input[0]) or ()) or None
            if axes is not None and any(a == 0 or (rank and a == -rank) for a in np.ravel(axes)):
                out.append(node.name or node.output[0])
    return out


def in_inference_mode(proto):
    """A copy of `proto` whose BatchNormalization nodes exported in training mode normalize with their running
    statistics (training_mode=0, the running-statistics outputs dropped: nothing an inference graph reads)."""
    p = copy.deepcopy(proto)
    for node in p.graph.node:
        if node.op_type == "BatchNormalization" and attr(node, "training_mode", 0):
            for a in [a for a in node.attribute if a.name == "training_mode"]:
                node.attribute.remove(a)
            del node.output[1:]
    return p


def to_inference_mode(m: OnnxModel, log=lambda s: None) -> list:
    """Turn `m` (in memory) into its inference-mode variant (in_inference_mode) and name the BatchNormalization
    layers exported in training mode: a model written from it (recalibrate, export --fold-bn) must normalize with
    the running statistics it was measured with, not with each batch's own as the exported graph did."""
    trained = [bn.name for bn in m.bns if bn.training_mode]
    if trained:
        m.proto = in_inference_mode(m.proto)
        for bn in m.bns:
            bn.training_mode = False
        log(f"{m.path}: {', '.join(trained)} exported in training mode (training_mode=1: each batch's own "
            "statistics); the model written runs them in inference mode, with the running statistics measured "
            "here (in PyTorch, call model.eval() before torch.onnx.export)")
    return trained


# --------------------------------------------------------------------------- axes and producers

def channel_axis(m: OnnxModel, tensor: str, depth: int = 0):
    """The axis of `tensor` that holds feature channels, traced from the input's layout and the Conv/Gemm/MatMul
    that made them through layout-keeping ops, Transposes and Reshapes; None where the graph does not say."""
    if depth > 200:
        return None
    if tensor == m.input:
        return {"NCHW": 1, "NHWC": 3}[m.layout]
    node = m.producers.get(tensor)
    if node is None:
        return None
    op = node.op_type
    if op in ("Conv", "ConvTranspose", "Gemm"):
        return 1
    if op == "MatMul":
        rank = len(m.shapes.get(tensor) or ()) or 2
        return rank - 1
    below = channel_axis(m, node.input[0], depth + 1)
    if below is None:
        return None
    if op == "Transpose":
        perm = list(attr(node, "perm", []))
        return perm.index(below) if below in perm else None
    if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        return _reshaped_axis(m.shapes.get(node.input[0]), m.shapes.get(tensor), below)
    return below if op in SAME_LAYOUT else None


def _reshaped_axis(before, after, axis):
    """Where channel axis `axis` of a tensor shaped `before` lands after a reshape to `after`: the axis of the same
    size with as many values before it (the batch aside); None when shapes are unknown or the channels are mixed."""
    if not before or not after or axis >= len(before) or any(d is None for d in (*before[1:], *after[1:])):
        return None
    inner = int(np.prod(before[1:axis])) if axis > 1 else 1
    for j in range(1, len(after)):
        if after[j] == before[axis] and (int(np.prod(after[1:j])) if j > 1 else 1) == inner:
            return j
    return None


def producer_chain(m: OnnxModel, bn_node):
    """(the Conv/Gemm/MatMul that feeds `bn_node`, the nodes between them) through reshapes and pools, or
    (None, nodes) when something else is in between."""
    between, tensor = [], bn_node.input[0]
    while True:
        node = m.producers.get(tensor)
        if node is None:
            return None, between
        if node.op_type in LINEAR:
            return node, between
        if node.op_type not in RESHAPES + POOLS:
            return None, between
        between.append(node)
        tensor = node.input[0]


def bias_of(m: OnnxModel, node):
    """The name of a Conv's or Gemm's bias initializer, or None."""
    if node.op_type == "Conv" and len(node.input) > 2 and node.input[2]:
        return node.input[2]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and attr(node, "beta", 1.0) != 0:
        return node.input[2]
    return None


def fold_target(m: OnnxModel, bn: OnnxBn):
    """[(BN node, its Conv/Gemm/MatMul, the nodes between)] when every node of `bn` can be folded into the layer
    before it, else why not (a string). Not across a max-pool with a negative scale (max does not commute with a
    negative factor), an average pool with padding, or a node something else also reads; never into a weight that
    another node shares (folding would change that node too); only where BN normalizes the layer's channels."""
    if bn.training_mode:  # folding its running statistics would change what the graph computes
        return "it was exported in training mode (each batch's own statistics)"
    with np.errstate(invalid="ignore", divide="ignore"):
        s = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    if not all(np.isfinite(a).all() for a in (s, bn.moving_mean.numpy(), bn.beta.numpy())):
        return "its parameters are not finite"
    plan = []
    for node in bn.nodes:
        prev, between = producer_chain(m, node)
        if prev is None:
            return "no Conv, Gemm or MatMul before it"
        if channel_axis(m, node.input[0]) != 1:
            return "it does not normalize the channels of the layer before it"
        chain = [prev, *reversed(between)]
        if any(len(m.consumers.get(n.output[0], [])) != 1 for n in chain):
            return f"{prev.name or prev.output[0]}'s output (or one between) also feeds another node"
        if any(n.op_type == "MaxPool" for n in between) and not (s > 0).all():
            return "a max-pool lies between it and the layer before it, and its scale is negative in some channels"
        if any(n.op_type == "AveragePool" and any(attr(n, "pads", [])) for n in between):
            return "an average pool with padding lies between it and the layer before it"
        weights = [t for t in prev.input[1:] if t]
        if any(t not in m.inits or len(m.consumers.get(t, [])) != 1 for t in weights):
            return f"{prev.name or prev.output[0]}'s weights are not its own initializers (shared or computed)"
        if prev.op_type == "MatMul" and m.inits[prev.input[1]].ndim != 2:
            return "a MatMul whose weight is not a matrix"
        plan.append((node, prev, between))
    return plan


# --------------------------------------------------------------------------- in-memory variants

def exposed(m: OnnxModel, tensors, stats_fed: bool):
    """A copy of the model that also gives `tensors` (BN inputs and outputs) as outputs, and with `stats_fed`
    takes every BN layer's mean and variance as inputs (named as the initializers) instead of holding them."""
    from onnx import TensorProto, helper

    p = in_inference_mode(m.proto)  # the running statistics fed are what a training-mode node would ignore
    g = p.graph
    have = {o.name for o in g.output} | {i.name for i in g.input}  # the input itself is fed, not fetched
    for t in dict.fromkeys(tensors):
        if t not in have:
            g.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    if stats_fed:
        fed = {n for bn in m.bns for n in (bn.names["mean"], bn.names["var"])}
        kept = [t for t in g.initializer if t.name not in fed]
        del g.initializer[:]
        g.initializer.extend(kept)
        for i in [i for i in g.input if i.name in fed]:
            g.input.remove(i)
        for bn in m.bns:
            for key in ("mean", "var"):
                g.input.append(helper.make_tensor_value_info(bn.names[key], TensorProto.FLOAT, [bn.channels]))
    return p


def with_batch_statistics(m: OnnxModel, ranks: dict):
    """A copy of the model whose every BN node normalizes with its own batch's mean and (biased) variance, as a
    model run in training mode does (the running statistics unused); `ranks`: {BN input tensor: its rank}."""
    p = in_inference_mode(m.proto)
    g = p.graph
    opset = next((o.version for o in p.opset_import if o.domain in ("", "ai.onnx")), 13)
    nodes = []
    for k, node in enumerate(g.node):
        if node.op_type == "BatchNormalization":
            nodes += _batch_normalized(m, g, node, ranks[node.input[0]], opset, f"__convbn_bs{k}")
        else:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return p


def _batch_normalized(m: OnnxModel, g, node, rank: int, opset: int, tag: str) -> list:
    """The nodes that compute BN `node`'s output from its batch's statistics (their constants added to `g`)."""
    from onnx import helper, numpy_helper

    x, y, axes = node.input[0], node.output[0], [0, *range(2, rank)]
    bshape = [1, -1, *([1] * (rank - 2))]
    consts = {f"{tag}_g": m.inits[node.input[1]].reshape(bshape).astype(np.float32),
              f"{tag}_b": m.inits[node.input[2]].reshape(bshape).astype(np.float32),
              f"{tag}_eps": np.array(attr(node, "epsilon", 1e-5), np.float32), f"{tag}_axes": np.array(axes, np.int64)}
    g.initializer.extend(numpy_helper.from_array(v, n) for n, v in consts.items())

    def mean(src, dst):  # ReduceMean takes its axes as an input from opset 18, as an attribute before
        if opset >= 18:
            return helper.make_node("ReduceMean", [src, f"{tag}_axes"], [dst], keepdims=1)
        return helper.make_node("ReduceMean", [src], [dst], axes=axes, keepdims=1)

    return [mean(x, f"{tag}_m"), helper.make_node("Sub", [x, f"{tag}_m"], [f"{tag}_d"]),
            helper.make_node("Mul", [f"{tag}_d", f"{tag}_d"], [f"{tag}_d2"]), mean(f"{tag}_d2", f"{tag}_v"),
            helper.make_node("Add", [f"{tag}_v", f"{tag}_eps"], [f"{tag}_ve"]),
            helper.make_node("Sqrt", [f"{tag}_ve"], [f"{tag}_sd"]),
            helper.make_node("Div", [f"{tag}_d", f"{tag}_sd"], [f"{tag}_n"]),
            helper.make_node("Mul", [f"{tag}_n", f"{tag}_g"], [f"{tag}_s"]),
            helper.make_node("Add", [f"{tag}_s", f"{tag}_b"], [y])]


def with_statistics(m: OnnxModel, stats: dict):
    """A copy of the model with new running statistics: {BN layer name: (mean, var)}, each stored in its
    initializer's own dtype."""
    from onnx import numpy_helper

    p = copy.deepcopy(m.proto)
    by_name = {t.name: t for t in p.graph.initializer}
    for bn in m.bns:
        if bn.name in stats:
            for key, value in zip(("mean", "var"), stats[bn.name]):
                t = by_name[bn.names[key]]
                t.CopyFrom(numpy_helper.from_array(np.asarray(value, m.inits[bn.names[key]].dtype), t.name))
    return p
