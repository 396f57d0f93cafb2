"""An ONNX model measured on data through onnxruntime, on in-memory variants of its graph (onnx_graph.py): its
accuracy with the running statistics, with each batch's own, and after an in-memory precise BN (population
statistics recomputed layer by layer in topological order, as fvcore's precise BN does, each layer's with the
layers before it already recomputed); what every BN layer receives. The file is never changed.

OnnxContext is diagnose's Context (findings.py) for an ONNX model: its measurements are taken up front and
handed to the checks shared with Keras models through the same names (evaluate_bn, precise_bn_accuracy,
precise_statistics, population_stats).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data.external import external_data
from ..errors import TargetError
from ..formats import runtime
from .findings import Context
from .onnx_graph import OnnxModel, exposed, with_batch_statistics

BATCH = 128  # images per batch for a model from elsewhere (data/external.py's)


@dataclass
class _Shape:
    """What data/external.py asks of a model: its input (N, H, W, C) and output (N, classes) shapes."""

    input_shape: tuple
    output_shape: tuple


def inputs_of(m: OnnxModel, data, scale: float) -> tuple:
    """(--data, --scale) for `m`: a convbn export says which dataset it was trained on and whether it takes raw
    pixels (then it normalizes them itself: scale 1); a model from elsewhere needs --data."""
    if m.about.get("input") == "pixels":
        scale = 1.0
    data = data if data is not None else m.about.get("dataset")
    if data is None:
        raise TargetError(f"{m.path}: an ONNX model from outside convbn needs --data (mnist, fashion_mnist or an .npz "
                          "with x and y)")
    return data, scale


def onnx_data(m: OnnxModel, data, batches: int, scale: float, log=lambda s: None):
    """--data's images for `m`, as it takes them (NCHW or NHWC): external_data's, with their channels moved."""
    d = external_data(_Shape((None, *m.hwc), (None, m.classes)), data, batches, scale, log, BATCH)
    if m.layout == "NCHW":
        d.images = np.ascontiguousarray(np.moveaxis(d.images, -1, 1))
        d.calibration = [np.ascontiguousarray(np.moveaxis(x, -1, 1)) for x in d.calibration]
    return d


class Runner:
    """The model's in-memory variants, each opened once: `stats` (BN inputs and outputs exposed, running
    statistics fed per call) and `batch` (BN with each batch's own statistics)."""

    def __init__(self, m: OnnxModel):
        self.m = m
        self.bn_inputs = [n.input[0] for bn in m.bns for n in bn.nodes]
        self.bn_outputs = [n.output[0] for bn in m.bns for n in bn.nodes]
        self._stats = runtime.onnx_session(m.path, exposed(m, self.bn_inputs + self.bn_outputs, stats_fed=True))
        self._batch = self._exported = None
        m.runner = self

    def feeds(self, x, stats: dict | None = None) -> dict:
        """The input and every BN layer's (mean, var): `stats`' where it names the layer, else the model's own."""
        out = {self.m.input: np.asarray(x, np.float32)}
        for bn in self.m.bns:
            mean, var = (stats or {}).get(bn.name) or (bn.moving_mean.numpy(), bn.moving_variance.numpy())
            out[bn.names["mean"]] = np.asarray(mean, np.float32)
            # an epsilon changed for a measurement: the node adds its own, so the variance fed makes up the rest
            out[bn.names["var"]] = np.asarray(np.asarray(var, np.float64) + bn.epsilon - bn.node_epsilon, np.float32)
        return out

    def run(self, x, stats: dict | None = None) -> dict:
        """{tensor: value} of the output and every BN input and output, for images `x` (a BN straight on the
        model's input reads the images themselves)."""
        names = [t for t in dict.fromkeys([self.m.output, *self.bn_inputs, *self.bn_outputs]) if t != self.m.input]
        out = dict(zip(names, self._stats(names, self.feeds(x, stats))))
        out[self.m.input] = np.asarray(x, np.float32)
        return out

    def logits(self, x, stats: dict | None = None):
        return self.run(x, stats)[self.m.output]

    def batch_logits(self, x):
        if self._batch is None:
            first = self.run(x[:2])
            ranks = {t: first[t].ndim for t in self.bn_inputs}
            self._batch = runtime.onnx_session(self.m.path, with_batch_statistics(self.m, ranks))
        return self._batch([self.m.output], {self.m.input: np.asarray(x, np.float32)})[0]

    def exported_logits(self, x):
        """Logits of the graph as it was exported: a BatchNormalization in training mode normalizes with its
        batch's statistics (the other variants run it with its running statistics)."""
        if self._exported is None:
            self._exported = runtime.onnx_session(self.m.path, self.m.proto)
        return self._exported([self.m.output], {self.m.input: np.asarray(x, np.float32)})[0]


def channel_moments(value) -> tuple:
    """(mean, biased variance) float64 per channel of a BN input: ONNX's BN normalizes axis 1 (reduced in place
    of a moved copy: a conv's outputs over a batch are tens of megabytes)."""
    a = np.asarray(value)
    axes = (0, *range(2, a.ndim))
    mean = a.mean(axes, dtype=np.float64)
    shape = (1, -1, *([1] * (a.ndim - 2)))
    # the residuals in the input's float32, summed in float64: a tenth of the time, and within 1e-7 of each value
    return mean, np.square(a - mean.reshape(shape).astype(a.dtype)).mean(axes, dtype=np.float64)


def channel_max(value) -> np.ndarray:
    a = np.asarray(value)
    return a.max((0, *range(2, a.ndim))).astype(np.float64)


def score(logits_of, batches, classes: int) -> dict:
    """{loss, accuracy, count} of images -> logits over (images, labels) batches."""
    losses, right, n = 0.0, 0, 0
    for x, y in batches:
        z = np.asarray(logits_of(x), np.float64)
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        with np.errstate(invalid="ignore"):
            losses += float(-logp[np.arange(len(y)), y].sum())
        right += int((np.argmax(np.nan_to_num(z, nan=-np.inf), 1) == y).sum())
        n += len(y)
    return {"loss": losses / max(n, 1), "accuracy": right / max(n, 1), "count": n}


def precise_bn(runner: Runner, calibration, log=lambda s: None) -> dict:
    """{BN layer: (mean, var)} float64 that an in-memory precise BN computes: layer by layer in topological order,
    each the average over the calibration batches of their batch mean and (biased) variance per channel, pooled
    over a shared layer's nodes, with the layers before it already recomputed (fvcore's PreciseBN, one layer at a
    time as convbn's own precise BN does)."""
    stats = {}
    for bn in runner.m.bns:
        means, variances = [], []
        for x in calibration:
            out = runner.run(x, stats)
            for node in bn.nodes:
                mean, var = channel_moments(out[node.input[0]])
                means.append(mean)
                variances.append(var)
        stats[bn.name] = (np.mean(means, 0), np.mean(variances, 0))
    return stats


@dataclass
class OnnxContext(Context):
    """diagnose's Context for an ONNX model (model: the OnnxModel; bns: its OnnxBn layers)."""

    runner: Runner = None
    _peaks: dict = field(default_factory=dict)
    not_applied: dict = field(default_factory=dict)  # {check: why it does not apply to this model}

    def population_stats(self, bn):
        """Mean and (biased) variance per channel of what `bn` receives at inference (the running statistics of
        the layers before it), over the data; a shared layer's nodes pooled."""
        if not self._stats:  # every layer's in one pass; batches of one size: their moments combine exactly
            moments = {layer.name: [] for layer in self.bns}
            for x, _ in self.batches():
                out = self.runner.run(x)
                for layer in self.bns:
                    moments[layer.name] += [channel_moments(out[n.input[0]]) for n in layer.nodes]
            for name, found in moments.items():
                means, variances = np.array([m for m, _ in found]), np.array([v for _, v in found])
                self._stats[name] = (means.mean(0), variances.mean(0) + means.var(0))
        return self._stats[bn.name]

    def measure(self) -> None:
        """Every accuracy and statistic the shared checks ask for, taken once (findings.evaluate_bn and
        precise_bn_accuracy read them from _measured)."""
        batches = self.batches()
        self._measured["moving"] = score(self.runner.logits, batches, self.num_classes)
        self._measured["batch"] = score(self.runner.batch_logits, batches, self.num_classes)
        precise = precise_bn(self.runner, self.calibration)
        self._measured["precise_by_layer"] = precise
        self._measured["precise"] = score(lambda x: self.runner.logits(x, precise), batches, self.num_classes)

    def accuracy_with(self, stats: dict) -> float:
        """Accuracy with the running statistics replaced by `stats` {layer: (mean, var)} (decay_checks asks)."""
        return score(lambda x: self.runner.logits(x, stats), self.batches(), self.num_classes)["accuracy"]

    def epsilon_effect(self, bn, channels) -> dict:
        """batch_checks.epsilon_effect's measurement (a lower epsilon in `channels`, fed through the variance) on
        this model: the OnnxModel is called as a Keras model is."""
        from .batch_checks import epsilon_effect

        return epsilon_effect(self, bn, channels)

    def subbatch_means(self) -> dict:
        """decay_checks.subbatch_means for this model: {BN layer: (K, C) means of K sub-batches of SUB_BATCH
        images}, each layer's input measured with precise BN's statistics in the layers before it."""
        from .decay_checks import NOISE_IMAGES, SUB_BATCH

        images = self.images[:NOISE_IMAGES]
        n = (len(images) // SUB_BATCH) * SUB_BATCH
        found = {bn.name: [] for bn in self.bns}
        for i in range(0, n, self.batch_size):
            out = self.runner.run(images[i:min(i + self.batch_size, n)], self._measured["precise_by_layer"])
            for bn in self.bns:
                v = np.asarray(out[bn.nodes[0].input[0]], np.float64)
                found[bn.name].append(v.reshape(len(v), v.shape[1], -1).mean(2))
        return {name: (np.concatenate(m).reshape(-1, SUB_BATCH, m[0].shape[-1]).mean(1) if n >= 2 * SUB_BATCH
                       else np.zeros((0, 1))) for name, m in found.items()}

    def peaks(self, precise: bool) -> dict:
        """{BN layer: the largest value each channel of its output takes over the data}, with the running
        statistics or the precise ones."""
        if precise not in self._peaks:
            stats = self._measured["precise_by_layer"] if precise else None
            found = {bn.name: [] for bn in self.bns}
            for x, _ in self.batches():
                out = self.runner.run(x, stats)
                for bn in self.bns:
                    found[bn.name] += [channel_max(out[n.output[0]]) for n in bn.nodes]
            self._peaks[precise] = {name: np.max(maxima, 0) for name, maxima in found.items()}
        return self._peaks[precise]
