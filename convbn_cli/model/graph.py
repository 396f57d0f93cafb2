"""Walking a Keras model's graph: what feeds a layer, a sub-model up to a layer's input, and a forward pass in
which each layer gets its own `training` flag. These work on functional graphs (branches, merges), not only
on the chains convbn builds, so that precise BN, the batch-statistics forward and BN folding serve any model.
"""

from __future__ import annotations

import keras

from .keras_private import made_by, run_through_graph, takes_training


def producer(layer):
    """The layer whose output `layer` takes as its (single) input, or None (the model's input, or several)."""
    try:
        tensor = layer.input
    except (AttributeError, ValueError):  # several inbound nodes (a shared layer): no single answer
        return None
    if isinstance(tensor, (list, tuple)):
        return None
    op = made_by(tensor)
    return None if op is None or isinstance(op, keras.layers.InputLayer) else op


def consumers(model, layer) -> list:
    """The layers of `model` that take `layer`'s output as their input."""
    out = []
    for other in model.layers:
        try:
            inputs = other.input
        except (AttributeError, ValueError):
            continue
        for t in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if made_by(t) is layer:
                out.append(other)
                break
    return out


def model_input(model):
    """The model's symbolic input(s). Not `model.input`: Keras 3.15 raises there for a Sequential model that was
    built with an Input but never called as a functional graph (every keras-io convnet loaded from a file)."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def input_model(model, layer) -> keras.Model:
    """A model sharing `model`'s layers that maps the model's input to `layer`'s input."""
    return keras.Model(model_input(model), layer.input)


def output_model(model, layer) -> keras.Model:
    """A model sharing `model`'s layers that maps the model's input to `layer`'s output."""
    return keras.Model(model_input(model), layer.output)


def run_graph(model, x, training_for):
    """The model's output for `x`, calling every layer `l` with training=training_for(l).

    Keras gives one `training` flag to a whole model; this walks its graph so that, e.g., BN layers use batch
    statistics while dropout stays off. (Keras' private `_run_through_graph`, keras_private.py, is what
    `Functional.call` itself uses; no public API takes a per-layer flag.)
    """

    def operation_fn(op):
        def call(*args, **kwargs):
            if takes_training(op):
                kwargs["training"] = training_for(op)
            return op(*args, **kwargs)

        return call

    if isinstance(model, keras.Sequential):
        for layer in model.layers:
            x = operation_fn(layer)(x)
        return x
    outputs = run_through_graph(model, x, operation_fn)
    return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs
