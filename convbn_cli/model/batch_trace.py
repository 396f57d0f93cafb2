"""The batch statistics a BN layer last normalized with, kept in the layer for the training's BN trace.

The batch mean and variance are computed anyway in every training step (the fused kernel returns them, Keras' layer
computes its moments); BN keeps them in two variables of the layer, so the trace (train/trace.py) reads them after
the step without a second forward pass. The variables are set as plain attributes, outside Keras' and
TensorFlow's tracking: they are not weights, not in checkpoints and not in .keras files (a checkpoint written
before they existed still restores, and exports are unchanged). Under tf.distribute they hold the first replica's
values: with synchronized BN every replica has the global batch's statistics, without it the first replica's
slice is the chief's own.

The variance kept is the biased one (divided by n = N*H*W), the one the step normalized with, whatever the layer's
`moving_variance` rule averages.
"""

from __future__ import annotations

import tensorflow as tf

ATTRIBUTE = "_convbn_batch_statistics"


def add_batch_variables(layer, channels: int) -> None:
    """Give `layer` its two (channels,) float32 variables, zero until its first training step."""
    with tf.init_scope():  # a layer first built inside a tf.function still makes them once, eagerly
        made = tuple(tf.Variable(tf.zeros((int(channels),), tf.float32), trainable=False, name=f"batch_{what}",
                                 synchronization=tf.VariableSynchronization.ON_WRITE,
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                     for what in ("mean", "variance"))
    object.__setattr__(layer, ATTRIBUTE, made)  # past Keras' __setattr__: tracked attributes become weights


def record(layer, mean, variance) -> None:
    """Keep this step's batch mean and (biased) variance in the layer (inside the training step's graph)."""
    made = getattr(layer, ATTRIBUTE, None)
    if made is None:
        return
    for variable, value in zip(made, (mean, variance)):
        variable.assign(tf.reshape(tf.cast(value, tf.float32), variable.shape))


def batch_variables(layer):
    """(batch mean, batch variance) variables of a convbn BN layer, or None (a plain Keras layer, or not built)."""
    return getattr(layer, ATTRIBUTE, None)
