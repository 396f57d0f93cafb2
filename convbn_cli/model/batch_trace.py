"""The batch statistics a BN layer last normalized with, kept in the layer for the training's BN trace.

The batch mean and variance are computed anyway in every training step (the fused kernel returns them, Keras' layer
computes its moments); BN keeps them in two variables of the layer, so the trace (train/trace.py) reads them after
the step without a second forward pass. The variables are set as plain attributes, outside Keras' and
TensorFlow's tracking: they are not weights, not in checkpoints and not in .keras files (a checkpoint written
before they existed still restores, and exports are unchanged). Under tf.distribute they hold the first replica's
values: with synchronized BN every replica has the global batch's statistics, without it the first replica's
slice is the chief's own.

Only a layer asked to (keep_batch_statistics: train/trace.py's BNTrace does, when `output.bn_trace` is on) writes
them: without a trace the step does not spend two assignments per BN layer on them. The request is read when the
training step's function is traced, so it must come before that (BNTrace asks in on_start, before the first step);
asked later, the step already compiled keeps what it was traced with.

The variance kept is the biased one (divided by n = N*H*W), the one the step normalized with, whatever the layer's
`moving_variance` rule averages.
"""

from __future__ import annotations

import tensorflow as tf

ATTRIBUTE = "_convbn_batch_statistics"
KEEP = "_convbn_keep_batch_statistics"


def add_batch_variables(layer, channels: int) -> None:
    """Give `layer` its two (channels,) float32 variables, zero until its first training step."""
    with tf.init_scope():  # a layer first built inside a tf.function still makes them once, eagerly
        made = tuple(tf.Variable(tf.zeros((int(channels),), tf.float32), trainable=False, name=f"batch_{what}",
                                 synchronization=tf.VariableSynchronization.ON_WRITE,
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                     for what in ("mean", "variance"))
    object.__setattr__(layer, ATTRIBUTE, made)  # past Keras' __setattr__: tracked attributes become weights


def keep_batch_statistics(layer, keep: bool = True) -> None:
    """Have `layer` write its batch statistics in the training steps traced from now on (module docstring)."""
    object.__setattr__(layer, KEEP, bool(keep))  # a plain attribute, as the variables' (not in get_config)


def record(layer, mean, variance) -> None:
    """Keep this step's batch mean and (biased) variance in the layer (inside the training step's graph), if it was
    asked to (keep_batch_statistics)."""
    made = getattr(layer, ATTRIBUTE, None)
    if made is None or not getattr(layer, KEEP, False):
        return
    for variable, value in zip(made, (mean, variance)):
        variable.assign(tf.reshape(tf.cast(value, tf.float32), variable.shape))


def batch_variables(layer):
    """(batch mean, batch variance) variables of a convbn BN layer, or None (a plain Keras layer, or not built)."""
    return getattr(layer, ATTRIBUTE, None)
