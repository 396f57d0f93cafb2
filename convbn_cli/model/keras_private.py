"""The private Keras names convbn relies on, pinned in one place (Keras 3.15).

No public Keras API gives these; each use says why. tests/test_architecture.py checks that every one still exists
on the installed Keras, so that an upgrade that renames one fails there, by name, rather than deep in a command.
"""

from __future__ import annotations

import keras

# (owner, attribute): what each private name is used for
PRIVATE_NAMES = {
    (keras.KerasTensor, "_keras_history"): "the layer that made a symbolic tensor (graph.py: producers, consumers)",
    (keras.Model, "_run_through_graph"): "a functional model's forward pass with a training flag per layer "
                                         "(graph.run_graph)",
    (keras.layers.Layer, "_call_has_training_arg"): "whether a layer's call takes `training` (graph.run_graph)",
    (keras.layers.BatchNormalization, "_moments"): "BN's batch statistics, overridden for synchronized BN (keras_bn)",
    (keras.layers.BatchNormalization, "_reduction_axes"): "the axes BN reduces over, set in build (keras_bn)",
}


def made_by(tensor):
    """The operation (layer) that produced a symbolic tensor, or None."""
    history = getattr(tensor, "_keras_history", None)
    return history[0] if history else None


def takes_training(layer) -> bool:
    return bool(getattr(layer, "_call_has_training_arg", False))


def run_through_graph(model, x, operation_fn):
    """Keras' own functional forward (what `Functional.call` uses), calling `operation_fn(op)(*args, **kwargs)`."""
    return model._run_through_graph(x, operation_fn=operation_fn)
