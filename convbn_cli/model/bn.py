"""What a BN layer is, decided in one place (after fvcore's precise_bn: one BN type tuple, one query).

Every module that looks for BN layers (statistics, inspect-bn, precise BN, folding, the batch-statistics
forward) asks here, so that convbn's fused layer, Keras' layer and Keras' synchronized layer are always
treated alike.
"""

from __future__ import annotations

import keras

from .fused_bn import FusedBatchNorm
from .graph import all_layers
from .keras_bn import BatchNormalization

BN_TYPES = (FusedBatchNorm, keras.layers.BatchNormalization)


def is_bn(layer) -> bool:
    return isinstance(layer, BN_TYPES)


def bn_layers(model) -> list:
    """The model's BN layers (fused or Keras), in the model's (topological) layer order, those of models nested in
    it included (in their place)."""
    return [layer for layer in all_layers(model) if is_bn(layer)]


def snapshot_statistics(model) -> list:
    """[(variable, value)] of every non-trainable variable of every BN layer, to put back with restore_statistics:
    what is measured with other statistics (batch statistics, an in-memory precise BN) leaves the model as it was.

    All of them, not only the moving mean and variance: a training-mode call of a renorm layer also moves
    renorm_mean, renorm_stddev and moving_stddev, which the next training step reads (its r/d correction). The BN
    trace's batch-statistics variables (batch_trace.py) are not among them (they are not tracked) and are rightly
    left: they are no state any computation reads, only the record of the latest training-mode call, which the
    trace reads right after a training step (which rewrote them); restoring them would add two assignments per BN
    layer after every batch of the batch-statistics forward for nothing."""
    return [(v, v.numpy()) for layer in bn_layers(model) for v in layer.non_trainable_variables]


def restore_statistics(snapshot) -> None:
    for variable, value in snapshot:
        variable.assign(value)


def bn_impl(layer) -> str:
    """"fused" (convbn's FusedBatchNorm), "sync" (Keras' synchronized BN) or "keras"."""
    if isinstance(layer, FusedBatchNorm):
        return "fused"
    return "sync" if getattr(layer, "synchronized", False) else "keras"


def moving_variance_rule(layer) -> str:
    """"biased" (Keras 3, the default) or "unbiased" (TF1's fused batch_norm): what the moving variance averages."""
    return getattr(layer, "moving_variance_rule", "biased")


def channel_axis(layer, ndim: int) -> int:
    axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
    return axis % ndim


def reduction_axes(layer, ndim: int) -> list[int]:
    """The axes BN reduces over: all but the channel axis (batch, height and width for a conv output)."""
    axis = channel_axis(layer, ndim)
    return [i for i in range(ndim) if i != axis]


def make_bn_layer(bn, impl: str, axis: int, name: str, dtype=None):
    """The BN layer for one conv/dense output; `bn` holds the TF1-style settings (decay = Keras momentum)."""
    common = dict(axis=axis, momentum=bn.decay, epsilon=bn.epsilon, center=bn.center, scale=bn.scale,
                  moving_variance=bn.moving_variance, name=name, dtype=dtype)
    if impl == "fused":
        return FusedBatchNorm(**common)
    extra = {"synchronized": True} if impl == "sync" else {}  # all-reduced statistics under tf.distribute
    if bn.renorm:
        extra = dict(renorm=True, renorm_momentum=bn.renorm_momentum,
                     renorm_clipping=bn.renorm_clipping.model_dump() if bn.renorm_clipping else None, **extra)
    return BatchNormalization(**common, **extra)  # Keras' layer with convbn's corrections (keras_bn.py)
