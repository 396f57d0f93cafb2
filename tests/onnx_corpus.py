"""A corpus of small ONNX models with BN, built with onnx.helper (no PyTorch), and the data they fit.

The data: 8x8 grey images, pixels 0-255, of four classes (where a bright 3x3 blob lies: which quadrant). Every
model is computed here in NumPy as well: random conv and BN weights, BN running statistics that are the
population statistics of what each BN receives (computed layer by layer, as precise BN does), and a last Gemm
fitted by least squares on the features, so a healthy model classifies the images well and its accuracy is a
measurement. Faults are then put in by hand (statistics never updated or stale, a wrong axis, NaN, ...).

Layouts: "NCHW" as PyTorch exports; "NHWC" with the Transposes tf2onnx puts around NCHW convs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE, CLASSES, OPSET = 8, 4, 17


def images(n=1024, seed=0):
    """(pixels (n, 8, 8) uint8, labels (n,)): noise, and a blob in the labelled quadrant."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.uniform(0, 70, (n, SIZE, SIZE))
    for i, c in enumerate(y):
        r0, c0 = (c // 2) * 4 + rng.integers(0, 2), (c % 2) * 4 + rng.integers(0, 2)
        x[i, r0:r0 + 3, c0:c0 + 3] += rng.uniform(120, 185)
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


# --------------------------------------------------------------------------- NumPy forward pass (NCHW)

def conv(x, w, b=None):
    """3x3 convolution, stride 1, padding 1: x (N, C, H, W), w (O, C, 3, 3)."""
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, wd = x.shape[2:]
    out = sum(np.einsum("nchw,oc->nohw", p[:, :, i:i + h, j:j + wd], w[:, :, i, j]) for i in range(3) for j in range(3))
    return out if b is None else out + b.reshape(1, -1, 1, 1)


def bn(x, p):
    shape = [1, -1] + [1] * (x.ndim - 2)
    return ((x - p["mean"].reshape(shape)) / np.sqrt(p["var"].reshape(shape) + p["eps"]) * p["gamma"].reshape(shape)
            + p["beta"].reshape(shape))


def pool(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max((3, 5))


def moments(x):
    """Per-channel (axis 1) mean and biased variance."""
    v = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    return v.mean(0), v.var(0)


class Net:
    """A plan of layers, its weights, and its NumPy forward pass; `fit` sets BN statistics and the head."""

    def __init__(self, plan, seed=0, eps=1e-5, conv_bias=False):
        self.plan, self.rng, self.eps, self.p, self.conv_bias = plan, np.random.default_rng(seed), eps, [], conv_bias
        c, hw = 1, SIZE
        for kind, *arg in plan:
            if "share" in arg:  # this conv or BN is an earlier one called again: the same weights
                self.p.append(self.p[arg[-1]])
            elif kind == "conv":
                o = arg[0]
                self.p.append({"w": self.rng.normal(0, np.sqrt(2 / (9 * c)), (o, c, 3, 3)),
                               "b": self.rng.normal(0, 0.1, o) if conv_bias else None})
                c = o
            elif kind == "pool":
                hw //= 2
                self.p.append({})
            elif kind == "flatten":
                c = c * hw * hw
                self.p.append({})
            elif kind == "as4d":  # (N, C) as (N, C, 1, 1)
                hw = 1
                self.p.append({})
            elif kind in ("gemm", "matmul"):
                self.p.append({"w": self.rng.normal(0, np.sqrt(2 / c), (arg[0], c)), "b": np.zeros(arg[0])})
                c = arg[0]
            elif kind == "bn_rows":  # BN over axis 1 of the NHWC view: one statistic per image row
                self.p.append({"gamma": self.rng.uniform(0.6, 1.4, hw), "beta": self.rng.normal(0.1, 0.2, hw),
                               "mean": np.zeros(hw), "var": np.ones(hw), "eps": eps, "channels": hw})
            elif kind in ("bn", "bn_train", "bn_reduce"):
                self.p.append({"gamma": self.rng.uniform(0.6, 1.4, c), "beta": self.rng.normal(0.1, 0.2, c),
                               "mean": np.zeros(c), "var": np.ones(c), "eps": eps, "channels": c})
            else:
                self.p.append({})

    def forward(self, x, upto=None):
        for k, ((kind, *_), p) in enumerate(zip(self.plan, self.p)):
            if k == upto:
                return x
            if kind == "conv":
                x = conv(x, p["w"], p["b"])
            elif kind in ("bn", "bn_train", "bn_reduce"):
                x = bn(x, p)
            elif kind == "relu":
                x = np.maximum(x, 0)
            elif kind == "pool":
                x = pool(x)
            elif kind == "flatten":
                x = x.reshape(len(x), -1)
            elif kind == "gemm":
                x = x @ p["w"].T + p["b"]
            elif kind == "matmul":
                x = x @ p["w"].T
            elif kind == "bn_rows":
                x = bn(x.transpose(0, 2, 3, 1), p).transpose(0, 3, 1, 2)
            elif kind == "as4d":
                x = x.reshape(len(x), -1, 1, 1)
        return x

    def fit(self, x, y):
        """BN statistics: each layer's population statistics in order (a shared BN's pooled over its calls, to a
        fixed point); the last Gemm: least squares."""
        for _ in range(4 if any("share" in a for _, *a in self.plan) else 1):
            for k, (kind, *_) in enumerate(self.plan):
                if kind in ("bn", "bn_rows", "bn_train", "bn_reduce"):
                    calls = [j for j, q in enumerate(self.p) if q is self.p[k] and j <= k]
                    if calls[-1] != k:
                        continue
                    inputs = [self.forward(x, j) for j in calls]
                    if kind == "bn_rows":
                        inputs = [a.transpose(0, 2, 3, 1) for a in inputs]
                    m, v = zip(*[moments(a) for a in inputs])
                    self.p[k]["mean"], self.p[k]["var"] = np.mean(m, 0), np.mean(v, 0)
        self.fit_x = x
        last = len(self.plan) - 1
        f = self.forward(x, last)
        f1 = np.concatenate([f, np.ones((len(f), 1))], 1)
        target = np.eye(CLASSES)[y] * 2 - 1
        sol = np.linalg.solve(f1.T @ f1 + 1e-2 * np.eye(f1.shape[1]), f1.T @ target)
        self.p[last]["w"], self.p[last]["b"] = sol[:-1].T, sol[-1]
        return self


# --------------------------------------------------------------------------- ONNX graphs

class Graph:
    def __init__(self):
        self.nodes, self.inits, self.k = [], [], 0

    def name(self, base):
        self.k += 1
        return f"{base}_{self.k}"

    def init(self, base, value, dtype=np.float32):
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), n))
        return n

    def node(self, op, inputs, base=None, **attrs):
        out = self.name(base or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def model(self, inp, shape, out, producer="pytorch"):
        g = helper.make_graph(self.nodes, "net", [helper.make_tensor_value_info(inp, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", CLASSES])], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=producer)
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def to_onnx(net: Net, layout="NCHW"):
    """The ONNX graph of `net`. layout NHWC: input (N, 8, 8, 1) and a Transpose to NCHW first (tf2onnx's way).
    A shared conv or BN (the same parameters called twice) reads the same initializers each time."""
    g, x = Graph(), "input"
    shape = ["N", 1, SIZE, SIZE] if layout == "NCHW" else ["N", SIZE, SIZE, 1]
    if layout == "NHWC":
        x = g.node("Transpose", [x], perm=[0, 3, 1, 2])
    names = {}
    for (kind, *_), p in zip(net.plan, net.p):
        if kind == "conv":
            if id(p) not in names:
                names[id(p)] = [g.init("w", p["w"])] + ([g.init("b", p["b"])] if p["b"] is not None else [])
            x = g.node("Conv", [x, *names[id(p)]], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        elif kind == "bn_rows":
            x = g.node("Transpose", [x], perm=[0, 2, 3, 1])
            x = g.node("BatchNormalization", [x, *[g.init(q, p[q]) for q in ("gamma", "beta", "mean", "var")]],
                       "bn", epsilon=p["eps"])
            x = g.node("Transpose", [x], perm=[0, 3, 1, 2])
        elif kind == "bn":
            if id(p) not in names:
                names[id(p)] = [g.init(q, p[q]) for q in ("gamma", "beta", "mean", "var")]
            momentum = {} if p.get("momentum", 0.9) is None else {"momentum": p.get("momentum", 0.9)}
            x = g.node("BatchNormalization", [x, *names[id(p)]], "bn", epsilon=p["eps"], **momentum)
        elif kind == "bn_train":  # exported in training mode (torch.onnx.export, TrainingMode.TRAINING): 3 outputs
            ins = [x, *[g.init(q, p[q]) for q in ("gamma", "beta", "mean", "var")]]
            x = g.name("bn")
            g.nodes.append(helper.make_node("BatchNormalization", ins, [x, x + "_rm", x + "_rv"], name=x,
                                            epsilon=p["eps"], momentum=0.9, training_mode=1))
        elif kind == "bn_reduce":  # a "BN" written out of ReduceMean over the batch: each batch's own statistics
            x = _reduce_bn(g, x, p)
        elif kind == "relu":
            x = g.node("Relu", [x])
        elif kind == "pool":
            x = g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        elif kind == "flatten":
            x = g.node("Flatten", [x], axis=1)
        elif kind == "gemm":
            x = g.node("Gemm", [x, g.init("w", p["w"]), g.init("b", p["b"])], transB=1)
        elif kind == "matmul":
            x = g.node("MatMul", [x, g.init("w", p["w"].T)])
        elif kind == "t2":  # tf2onnx before its optimizer: to NHWC and back, around nothing
            x = g.node("Transpose", [g.node("Transpose", [x], perm=[0, 2, 3, 1])], perm=[0, 3, 1, 2])
        elif kind == "dropout":  # an inference graph that kept its Dropout (identity at inference)
            x = g.node("Dropout", [x])
        elif kind == "as4d":  # (N, C) -> (N, C, 1, 1), as a BatchNorm2d after a view
            x = g.node("Reshape", [x, g.init("shape", [0, -1, 1, 1], np.int64)])
    return g.model("input", shape, x, "pytorch" if layout == "NCHW" else "tf2onnx")


def _reduce_bn(g, x, p):
    shape = [1, -1, 1, 1]
    m = g.node("ReduceMean", [x], axes=[0, 2, 3], keepdims=1)
    d = g.node("Sub", [x, m])
    v = g.node("ReduceMean", [g.node("Mul", [d, d])], axes=[0, 2, 3], keepdims=1)
    sd = g.node("Sqrt", [g.node("Add", [v, g.init("eps", p["eps"])])])
    n = g.node("Div", [d, sd])
    return g.node("Add", [g.node("Mul", [n, g.init("g", p["gamma"].reshape(shape))]),
                          g.init("b", p["beta"].reshape(shape))])


CNN = [("conv", 6), ("bn",), ("relu",), ("pool",), ("conv", 8), ("bn",), ("relu",), ("flatten",), ("gemm", CLASSES)]
MLP = [("flatten",), ("gemm", 24), ("bn",), ("relu",), ("gemm", CLASSES)]
POOL_FIRST = [("conv", 6), ("pool",), ("bn",), ("relu",), ("flatten",), ("gemm", CLASSES)]
CNN2 = [("conv", 6), ("bn",), ("relu",), ("pool",), ("flatten",), ("gemm", 16), ("bn",), ("relu",), ("gemm", CLASSES)]
MATMUL = [("flatten",), ("matmul", 24), ("bn",), ("relu",), ("gemm", CLASSES)]
SHARED = [("conv", 6), ("bn",), ("relu",), ("conv", 6), ("bn",), ("relu",), ("conv", 6, "share", 3), ("bn", "share", 4),
          ("relu",), ("pool",), ("flatten",), ("gemm", CLASSES)]
TRANSPOSED = [("conv", 6), ("t2",), ("bn",), ("relu",), ("pool",), ("flatten",), ("gemm", CLASSES)]
GEMM_4D = [("flatten",), ("gemm", 24), ("as4d",), ("bn",), ("relu",), ("flatten",), ("gemm", CLASSES)]
TRAIN_MODE = [("conv", 6), ("bn_train",), ("relu",), ("pool",), ("conv", 8), ("bn",), ("relu",), ("flatten",),
              ("gemm", CLASSES)]
REDUCE_BN = [("conv", 6), ("bn_reduce",), ("relu",), ("pool",), ("flatten",), ("gemm", CLASSES)]
RELU_FIRST = [("conv", 6), ("relu",), ("bn",), ("pool",), ("conv", 8), ("bn",), ("relu",), ("flatten",),
              ("gemm", CLASSES)]
DROPOUT_BN = [("flatten",), ("dropout",), ("gemm", 24), ("bn",), ("relu",), ("gemm", CLASSES)]
WRONG_AXIS = [("conv", 6), ("bn_rows",), ("relu",), ("pool",), ("flatten",), ("gemm", CLASSES)]


# --------------------------------------------------------------------------- the corpus

def _bns(net):
    return [p for (kind, *_), p in zip(net.plan, net.p) if kind in ("bn", "bn_rows")]


def _stale(net, seed=5):
    """Running statistics that lag: means 1.5 standard deviations off, variances a third of the data's."""
    rng = np.random.default_rng(seed)
    for p in _bns(net):
        p["mean"] = p["mean"] + 1.5 * np.sqrt(p["var"]) * rng.choice([-1, 1], len(p["mean"]))
        p["var"] = p["var"] / 3
    return net


def _never_updated(net):
    for p in _bns(net):
        p["mean"], p["var"] = np.zeros_like(p["mean"]), np.ones_like(p["var"])
    return net


def _momentum(value):
    def change(net):  # the momentum attribute every BN node is written with (None: none written)
        for p in _bns(net):
            p["momentum"] = value
        return net
    return change


def _last_batch(value, images=32):
    """Running statistics that are one small batch's (what a decay of 0.1 leaves: ~1 batch), layer by layer."""
    def change(net):
        x = net.fit_x[-images:]
        for k, (kind, *_) in enumerate(net.plan):
            if kind == "bn":
                net.p[k]["mean"], net.p[k]["var"] = moments(net.forward(x, k))
        return _momentum(value)(net)
    return change


def _set(k, **values):
    def change(net):
        for q, (index, value) in values.items():
            net.p[k][q] = np.array(net.p[k][q], np.float64)
            net.p[k][q][index] = value
        return net
    return change


def _constant_channels(net):
    """Two of the first conv's six channels constant (zero weights): their variance 0 is below epsilon, but a lower
    epsilon changes nothing there (nothing varies); a positive shift keeps them alive after the ReLU."""
    return _set(1, beta=([0, 1], 0.5))(_set(0, w=([0, 1], 0.0))(net))


def _scaled_input(factor):
    def change(net):  # the first conv's weights scaled, its BN's statistics with them: another trained input scale
        net.p[0]["w"] = net.p[0]["w"] * factor
        return net
    return change


# name: (plan, layout, Net keywords, change before fitting, change after fitting, expected findings, diagnose kwargs)
# An empty expected set: a healthy model (no warning, no error).
CORPUS = {
    "cnn_nchw": (CNN, "NCHW", {}, None, None, set(), {}),
    "cnn_nhwc_tf2onnx": (CNN, "NHWC", {"seed": 2}, None, None, set(), {}),
    "mlp_gemm_bn": (MLP, "NCHW", {"seed": 3}, None, None, set(), {}),
    "matmul_bn": (MATMUL, "NCHW", {"seed": 4}, None, None, set(), {}),
    "cnn_gemm_bn": (CNN2, "NCHW", {"seed": 5}, None, None, set(), {}),
    "conv_bias": (CNN, "NCHW", {"seed": 6, "conv_bias": True}, None, None, set(), {}),
    "pool_then_bn_negative_gamma": (POOL_FIRST, "NCHW", {"seed": 7}, _set(2, gamma=([0, 1], [-0.8, -1.1])), None,
                                    set(), {}),
    "shared_bn": (SHARED, "NCHW", {"seed": 8}, None, None, set(), {}),
    "transposes_between": (TRANSPOSED, "NHWC", {"seed": 23}, None, None, set(), {}),
    "gemm_reshape_bn": (GEMM_4D, "NCHW", {"seed": 24}, None, None, set(), {}),
    "stale_gemm_reshape": (GEMM_4D, "NCHW", {"seed": 25}, None, _stale, {"inference_training_gap"}, {}),
    "never_updated": (CNN, "NCHW", {"seed": 9}, None, _never_updated, {"moving_statistics_never_updated"}, {}),
    "never_updated_mlp": (MLP, "NCHW", {"seed": 10}, None, _never_updated, {"moving_statistics_never_updated"}, {}),
    "stale": (CNN, "NCHW", {"seed": 11}, None, _stale, {"inference_training_gap"}, {}),
    "stale_nhwc": (CNN, "NHWC", {"seed": 12}, None, _stale, {"inference_training_gap"}, {}),
    "stale_mlp": (MLP, "NCHW", {"seed": 13}, None, _stale, {"inference_training_gap"}, {}),
    "wrong_axis": (WRONG_AXIS, "NCHW", {"seed": 14}, None, None, {"bn_wrong_axis"}, {}),
    "nan_statistics": (CNN, "NCHW", {"seed": 15}, None, _set(5, var=(2, np.nan)), {"non_finite_bn_values"}, {}),
    "negative_variance": (CNN, "NCHW", {"seed": 16}, None, _set(5, var=([1, 3], -0.5)),
                          {"negative_moving_variance"}, {}),
    "tiny_variance_big_epsilon": (CNN, "NCHW", {"seed": 17, "eps": 0.1}, _scaled_input(1e-2), None,
                                  {"epsilon_dominates"}, {}),
    "dead_channels": (CNN, "NCHW", {"seed": 18}, _set(5, gamma=([2, 5], 0.0)), None, {"dead_channels"}, {}),
    "dead_layer": (CNN, "NCHW", {"seed": 19}, _set(1, gamma=(slice(None), 0.0)), None, {"dead_bn_layer"}, {}),
    "extreme_values": (CNN, "NCHW", {"seed": 20}, _scaled_input(3e4), None, {"extreme_bn_values"}, {}),
    "inputs_on_another_scale": (CNN, "NCHW", {"seed": 21}, None, None, {"input_scale_mismatch"}, {"scale": 1.0}),
    "training_mode_export": (TRAIN_MODE, "NCHW", {"seed": 26}, None, None, {"batch_dependent_predictions"}, {}),
    "reduce_mean_bn": (REDUCE_BN, "NCHW", {"seed": 27}, None, None, {"batch_dependent_predictions"}, {}),
    "momentum_ported_wrong": (CNN, "NCHW", {"seed": 28}, None, _last_batch(0.1), {"decay_too_fast"}, {}),
    "momentum_fast_statistics_precise": (CNN, "NCHW", {"seed": 29}, None, _momentum(0.1), set(), {}),
    "momentum_absent": (CNN, "NCHW", {"seed": 34}, None, _last_batch(None), set(), {}),
    "relu_before_bn": (RELU_FIRST, "NCHW", {"seed": 30}, None, None, {"layer_order"}, {}),
    "dropout_before_bn": (DROPOUT_BN, "NCHW", {"seed": 31}, None, None, {"layer_order"}, {}),
    "constant_channels_epsilon": (CNN, "NCHW", {"seed": 32, "eps": 1e-2}, _constant_channels, None, set(), {}),
    "labels_of_other_data": (CNN, "NCHW", {"seed": 22}, None, None, {"accuracy_at_chance"}, {"shuffled": True}),
}


def workers(x, y, seed=33, apart=True):
    """Two ONNX models of one data-parallel training: the same weights; with `apart`, the second's running
    statistics are its own shard's (32 images of one class: shards not shuffled across workers), as a
    BN not synchronized across workers leaves them."""
    net = Net(CNN, seed=seed).fit(x[:, None].astype(np.float64) / 255, y)
    first = to_onnx(net)
    if apart:
        shard = x[y == 0][:32, None].astype(np.float64) / 255
        for k, (kind, *_) in enumerate(net.plan):
            if kind == "bn":
                net.p[k]["mean"], net.p[k]["var"] = moments(net.forward(shard, k))
    return first, to_onnx(net)


def build(name, x, y):
    """(ONNX model, the fitted Net) of corpus entry `name` on images `x` (N, 8, 8) 0-255 and labels `y`."""
    plan, layout, kw, before, after, _, _ = CORPUS[name]
    net = Net(plan, **kw)
    if before is not None:
        net = before(net)
    net.fit(x[:, None].astype(np.float64) / 255, y)
    if after is not None:
        net = after(net)
    return to_onnx(net, layout), net
